"""RoI pooling settings: which feature levels, output size and RoIAlign conventions.

`RoIPooler` is a frozen dataclass, not a Module: pooling has no parameters. It is the analogue
of torchvision's `MultiScaleRoIAlign` and Detectron2's `ROIPooler`; the conventions that differ
between them (the half-pixel `aligned` shift, the sampling ratio, where the level-assignment eps
goes) are fields, filled from `models/conventions.py` by `build_model`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp

from mrcnn_jax.models.layers import PaddingMask
from mrcnn_jax.ops.roi_align import multilevel_roi_align

FPN_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)   # RoIs are pooled from P2..P5 (not P6)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoIPooler:
    """Multi-level RoIAlign of boxes into `output_size` x `output_size` features.

    Each box is pooled from one level of `scales` (finest first), chosen by the FPN paper's
    eq. 1 (`ops.roi_align.box_levels`); with one scale (C4) every box uses that map. The fields
    that differ between the references have no default: they come from the conventions.
    """
    output_size: int
    sampling_ratio: int                    # <= 0: adaptive ceil(roi_size / output_size)
    aligned: bool
    level_eps: float
    level_eps_in_log: bool
    scales: tuple[float, ...] = FPN_SCALES
    canonical_scale: float = 224
    canonical_level: int = 4
    max_sampling_ratio: int = 8            # static bound of the adaptive grid
    method: str = 'gather'                 # or 'einsum' (ops/roi_align.py)

    def valid_hw(self, padding: PaddingMask) -> Optional[list[jnp.ndarray]]:
        """Per pooled level [B, 2] int32 valid size of each image's map, or None (no masking)."""
        if padding.pad_hw is None:
            return None
        return [padding.region_hw(int(round(1 / s))) for s in self.scales]

    def __call__(self, feats: Sequence[jnp.ndarray], boxes: jnp.ndarray,
                 valid_hw: Optional[Sequence[jnp.ndarray]] = None) -> jnp.ndarray:
        """feats: levels [B, H_l, W_l, C] (those beyond `scales` are ignored); boxes [B, R, 4]
        xyxy in input pixels; valid_hw: from `valid_hw(padding)`. Returns [B, R, S, S, C]."""
        return multilevel_roi_align(
            feats[:len(self.scales)], boxes, (self.output_size, self.output_size), self.sampling_ratio,
            self.aligned, scales=self.scales, canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level, level_eps=self.level_eps,
            level_eps_in_log=self.level_eps_in_log, valid_hw=valid_hw,
            max_sampling_ratio=self.max_sampling_ratio, method=self.method)
