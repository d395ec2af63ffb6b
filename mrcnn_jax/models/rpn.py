"""Region Proposal Network: anchors and proposal settings (frozen dataclasses), the head (a
module) and proposal selection (a pure function)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.models.layers import PaddingMask, conv
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.nms import nms


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnchorGenerator:
    """Anchor sizes per feature level (finest first, level `first_level`), every aspect ratio
    (h / w) at each cell; the rounding and stride rules come from the conventions
    (`ops/anchors.py` explains both references) and have no default.

    `sizes` has one entry per level: a number (FPN: one size per level) or a tuple of sizes (the
    C4 models' single res4 level has 32..512). A cell's anchors run over sizes, then aspect
    ratios fastest (Detectron2's `generate_cell_anchors` order)."""
    rounded: bool                          # conventions.anchor_rounding
    stride_rule: str                       # conventions.anchor_strides
    sizes: tuple = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    first_level: int = 2                   # P2 (stride 4); res4 (stride 16) for C4

    def level_sizes(self) -> list[tuple[float, ...]]:
        return [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in self.sizes]

    @property
    def num_anchors(self) -> int:
        """Anchors per cell."""
        counts = {len(s) for s in self.level_sizes()}
        if len(counts) != 1:   # one RPN head is shared by all levels
            raise ValueError(f'every level needs as many anchor sizes, got {self.sizes}')
        return counts.pop() * len(self.aspect_ratios)

    def __call__(self, grid_shapes: Sequence[tuple[int, int]], pad_hw: Optional[jnp.ndarray]):
        """Per level anchors [B or 1, N_l, 4] and validity [B or 1, N_l] on static grids.

        pad_hw: [B, 2] int32 padded size of each image, or None for the whole canvas."""
        out_a, out_v = [], []
        for i, (grid, sizes) in enumerate(zip(grid_shapes, self.level_sizes())):
            base = np.concatenate([anchor_ops.cell_anchors(size, self.aspect_ratios, rounded=self.rounded)
                                   for size in sizes], axis=0)
            a, v = anchor_ops.level_anchors(tuple(grid), base, self.first_level + i, pad_hw, self.stride_rule)
            out_a.append(a)
            out_v.append(v)
        return out_a, out_v


@dataclasses.dataclass(frozen=True)
class RPNSettings:
    """Proposal selection (`select_proposals`): top-k per level before NMS, per image after."""
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    min_size_strict: bool = False          # conventions.rpn_min_size_strict: sides > min_size

    def topk(self, train: bool) -> tuple[int, int]:
        """(pre_nms_topk, post_nms_topk) for training or inference."""
        if train:
            return self.pre_nms_topk_train, self.post_nms_topk_train
        return self.pre_nms_topk_test, self.post_nms_topk_test

_RPN_INIT = nn.initializers.normal(0.01)   # torchvision RPNHead: normal(std=0.01), bias 0


class RPNHead(nn.Module):
    """One 3x3 conv + ReLU, then 1x1 objectness (A) and 1x1 deltas (4A), shared over levels.

    Returns, per level, objectness logits [B, H*W*A] and deltas [B, H*W*A, 4], both float32,
    ordered (y, x, anchor) like the anchors (torchvision's permute_and_flatten order).
    """
    num_anchors: int
    channels: int = 256
    first_level: int = 2                   # stride 2^first_level of feats[0]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jnp.ndarray], mask: Optional[PaddingMask] = None):
        mask = mask or PaddingMask(None)
        shared = conv(self.channels, 3, bias=True, dtype=self.dtype, name='conv', kernel_init=_RPN_INIT)
        cls = conv(self.num_anchors, 1, bias=True, dtype=self.dtype, name='cls_logits', kernel_init=_RPN_INIT)
        reg = conv(4 * self.num_anchors, 1, bias=True, dtype=self.dtype, name='bbox_pred',
                   kernel_init=_RPN_INIT)
        logits, deltas = [], []
        for i, f in enumerate(feats):
            t = nn.relu(shared(mask(f, 2 ** (self.first_level + i))))
            b, h, w, _ = t.shape
            logits.append(cls(t).astype(jnp.float32).reshape(b, h * w * self.num_anchors))
            deltas.append(reg(t).astype(jnp.float32).reshape(b, h * w * self.num_anchors, 4))
        return logits, deltas


def select_proposals(
    objectness: Sequence[jnp.ndarray],
    deltas: Sequence[jnp.ndarray],
    anchors: Sequence[jnp.ndarray],
    anchor_valid: Sequence[jnp.ndarray],
    image_hw: jnp.ndarray,
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float,
    min_size_strict: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """torchvision's `RegionProposalNetwork.filter_proposals` with static shapes.

    Per level: top `pre_nms_topk` valid anchors by objectness logit, decode (dw/dh clamped at
    log(1000/16)), clip to the image's valid size, drop boxes with a side < min_size (<= min_size with
    `min_size_strict`, Detectron2's `Boxes.nonempty`), NMS at
    `nms_thresh` (fixed-size output). Then the top `post_nms_topk` of all levels by probability.

    objectness: per level [B, N_l] logits; deltas: per level [B, N_l, 4];
    anchors: per level [B or 1, N_l, 4]; anchor_valid: per level [B or 1, N_l] bool;
    image_hw: [B, 2] valid (resized) image size.
    Returns boxes [B, P, 4] float32, scores [B, P] float32 (sigmoid), valid [B, P] bool,
    P = post_nms_topk, sorted by score; rows with valid False are padding. No gradient flows.
    """
    objectness = [jax.lax.stop_gradient(o) for o in objectness]
    deltas = [jax.lax.stop_gradient(d) for d in deltas]
    bsz = objectness[0].shape[0]
    ks = [min(pre_nms_topk, o.shape[1]) for o in objectness]
    kmax = max(ks)
    lvl_boxes, lvl_scores, lvl_valid = [], [], []
    for logit, delta, anc, avalid, k in zip(objectness, deltas, anchors, anchor_valid, ks):
        avalid = jnp.broadcast_to(avalid, logit.shape)
        top_logit, idx = jax.lax.top_k(jnp.where(avalid, logit, -jnp.inf), k)        # [B, k]
        valid = jnp.take_along_axis(avalid, idx, axis=1)
        d = jnp.take_along_axis(delta, idx[..., None], axis=1)
        a = jnp.take_along_axis(jnp.broadcast_to(anc, (bsz,) + anc.shape[1:]), idx[..., None], axis=1)
        boxes = box_ops.clip_boxes(box_ops.decode_boxes(d, a), image_hw[:, None, :])
        valid = valid & box_ops.nonsmall_boxes(boxes, min_size, strict=min_size_strict)
        pad = kmax - k   # coarse levels with fewer anchors: pad to a common size (invalid rows)
        lvl_boxes.append(jnp.pad(boxes, ((0, 0), (0, pad), (0, 0))))
        lvl_scores.append(jnp.pad(jax.nn.sigmoid(top_logit), ((0, 0), (0, pad))))
        lvl_valid.append(jnp.pad(valid, ((0, 0), (0, pad))))
    # NMS independently per level (torchvision's batched_nms over level ids), as one program
    # vmapped over images and levels rather than one NMS per level.
    boxes = jnp.stack(lvl_boxes, axis=1)                        # [B, L, K, 4]
    scores = jnp.stack(lvl_scores, axis=1)
    valid = jnp.stack(lvl_valid, axis=1)
    per_level = jax.vmap(jax.vmap(lambda b, s, v: nms(b, s, v, nms_thresh, kmax)))
    keep, keep_valid = per_level(boxes, scores, valid)          # [B, L, K]
    boxes = jnp.take_along_axis(boxes, keep[..., None], axis=2).reshape(bsz, -1, 4)
    scores = jnp.take_along_axis(scores, keep, axis=2).reshape(bsz, -1)
    valid = keep_valid.reshape(bsz, -1)
    p = min(post_nms_topk, boxes.shape[1])
    top, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), p)
    boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
    valid = jnp.take_along_axis(valid, idx, axis=1)
    scores = jnp.where(valid, top, 0.0)
    boxes = jnp.where(valid[..., None], boxes, 0.0)
    if p < post_nms_topk:  # fewer anchors than requested proposals (tiny canvases): pad
        pad = post_nms_topk - p
        boxes = jnp.pad(boxes, ((0, 0), (0, pad), (0, 0)))
        scores = jnp.pad(scores, ((0, 0), (0, pad)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    return boxes, scores, valid
