"""Anchors for a static canvas, with torchvision's or Detectron2's rules (chosen by the caller
from `models/conventions.py`: `rounded` and `stride_rule`).

Ordering (both references): for each level, anchors are laid out (y, x, a) row-major, the
anchor index `a` running over aspect ratios (0.5, 1, 2 by default) fastest. This matches an
NHWC conv output `[B, H, W, A * 4]` reshaped to `[B, H * W * A, 4]`.

torchvision (`AnchorGenerator`; rounded=True, stride_rule='padded'):
  * cell anchors are `round([-w, -h, w, h] / 2)` with h = size * sqrt(ar), w = size / sqrt(ar);
  * the stride of a level is `padded_size // feature_size`, where padded_size is the size of the
    batch tensor torchvision built (the image padded up to a multiple of 32). For P2..P5 that is
    exactly 4..32, but for P6 (max-pool k=1 s=2 of P5, so ceil(padded / 64) cells) it is *not*
    64 when padded / 32 is odd: an 800-px side gives 13 cells of stride 800 // 13 = 61. Anchors
    therefore depend on each image's padded size; we compute them per image inside jit from
    `pad_hw` so one compiled program serves every image of a canvas bucket;
  * anchors exist only inside torchvision's padded tensor; cells of our larger static canvas
    beyond it are marked invalid (they would produce proposals torchvision never makes).
Detectron2 (`DefaultAnchorGenerator`, offset 0.0; rounded=False, stride_rule='nominal'): cell anchors are exact (not rounded),
w = sqrt(size^2 / ar), h = ar * w, and strides are the nominal 4, 8, 16, 32, 64.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def cell_anchors(size: float, aspect_ratios: Sequence[float], rounded: bool = True) -> np.ndarray:
    """Zero-centred anchors of one level. Returns [A, 4] float32 xyxy, A = len(aspect_ratios).

    rounded: torchvision's (float32 arithmetic, then rounded to integers); False: Detectron2's
    exact anchors (float64 arithmetic, then float32)."""
    ar = np.asarray(aspect_ratios, np.float32)
    if rounded:
        # Computed in float32 like torch, then rounded (half to even, as torch.round).
        h_ratios = np.sqrt(ar)
        w_ratios = np.float32(1) / h_ratios
        ws = w_ratios * np.float32(size)
        hs = h_ratios * np.float32(size)
        base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
        return np.round(base).astype(np.float32)
    area = float(size) ** 2
    out = []
    for a in aspect_ratios:
        w = np.sqrt(area / a)
        h = a * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(out, np.float32)


def level_grid_size(padded: jnp.ndarray, level: int) -> jnp.ndarray:
    """Feature-map size of pyramid level `level` (2..6) for a padded input size (int array).

    Each stride-2 layer of the ResNet/FPN maps n -> ceil(n / 2), so level l has ceil(n / 2^l)
    cells (P6 included: max-pool k=1 s=2 of P5).
    """
    n = padded
    for _ in range(level):
        n = (n + 1) // 2
    return n


def level_anchors(
    grid_hw: tuple[int, int],
    base: np.ndarray,
    level: int,
    pad_hw: jnp.ndarray | None,
    stride_rule: str = 'padded',
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Anchors of one level on a static grid, per image.

    grid_hw: static (H_l, W_l) of the canvas's feature map; base: [A, 4] cell anchors;
    pad_hw: [B, 2] int32 padded (size_divisible) size of each image, or None for "the whole
    canvas" (fixed nominal strides, all valid).
    stride_rule: 'padded' (torchvision: padded size // cells) or 'nominal' (Detectron2: 2^level).
    Returns anchors [B or 1, H_l * W_l * A, 4] float32 and valid [B or 1, H_l * W_l * A] bool.
    """
    gh, gw = grid_hw
    a = base.shape[0]
    iy = jnp.arange(gh, dtype=jnp.int32)
    ix = jnp.arange(gw, dtype=jnp.int32)
    nominal = 2 ** level
    if pad_hw is None:
        stride = jnp.full((1, 2), nominal, jnp.int32)
        cells = jnp.asarray([[gh, gw]], jnp.int32)
    else:
        pad_hw = pad_hw.astype(jnp.int32)
        cells = level_grid_size(pad_hw, level)                     # [B, 2]
        if stride_rule == 'padded':
            stride = pad_hw // jnp.maximum(cells, 1)               # the P6 quirk lives here
        elif stride_rule == 'nominal':
            stride = jnp.broadcast_to(jnp.int32(nominal), pad_hw.shape)
        else:
            raise ValueError(f"stride_rule must be 'padded' or 'nominal', got {stride_rule!r}")
    # Shifts are integer cell index * integer stride (exact), then offset by float32 base anchors.
    sy = (iy[None, :] * stride[:, 0:1]).astype(jnp.float32)      # [B, H]
    sx = (ix[None, :] * stride[:, 1:2]).astype(jnp.float32)      # [B, W]
    nb = sy.shape[0]
    shift = jnp.stack([
        jnp.broadcast_to(sx[:, None, :], (nb, gh, gw)),
        jnp.broadcast_to(sy[:, :, None], (nb, gh, gw)),
    ], axis=-1)                                                     # [B, H, W, 2] (x, y)
    shift = jnp.concatenate([shift, shift], axis=-1)               # [B, H, W, 4]
    anchors = shift[:, :, :, None, :] + jnp.asarray(base)[None, None, None]  # [B, H, W, A, 4]
    valid = (iy[None, :, None] < cells[:, 0, None, None]) & (ix[None, None, :] < cells[:, 1, None, None])
    valid = jnp.broadcast_to(valid[..., None], (nb, gh, gw, a))
    return anchors.reshape(nb, gh * gw * a, 4), valid.reshape(nb, gh * gw * a)
