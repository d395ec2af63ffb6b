"""Inference pre- and post-processing on the device: the image resize and the mask paste in jnp.

The host versions (`preprocess.resize_bilinear`, `ops.masks.paste_masks`) reproduce torch's CPU
kernels bit for bit in numpy; these compute the same functions inside XLA, so that a GPU or TPU
never waits for the host's numpy (on an H100-class GPU the R50-FPN forward takes ~7 ms while the
host resize and paste of one COCO photo take ~200 ms). Equal to the host versions to float32
rounding (one ulp of the sampling coordinate at most: XLA may or may not fuse `scale * x - 0.5`
into one FMA, where torch's kernel always does).

Static shapes: the raw uint8 images arrive padded to a canvas (`raw_canvas`), with their true
sizes as data; the resized image is written onto the model's canvas bucket, zero beyond the
resized size; masks are pasted onto the raw canvas and the host crops each to its image. One
program per (raw canvas, model canvas) pair, compiled on first use like the model's buckets.

Both resamplings use only row gathers (contiguous slices) and transposes, which XLA lowers to
copies on every backend, and never a matmul (whose TF32 default on GPUs would round the data).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# Raw images are padded to multiples of this before upload: few programs, little padding.
RAW_CANVAS_MULTIPLE = 64


def raw_canvas(h: int, w: int, multiple: int = RAW_CANVAS_MULTIPLE) -> tuple[int, int]:
    """The padded (H, W) on which a raw h x w image is uploaded and its masks are pasted."""
    return int(math.ceil(h / multiple) * multiple), int(math.ceil(w / multiple) * multiple)


def linear_taps(dst: jnp.ndarray, out_size: jnp.ndarray, in_size: jnp.ndarray):
    """jnp twin of `ops.masks.linear_taps` (torch's bilinear, align_corners=False).

    Args:
      dst: [..., S] int32 destination indices; out_size, in_size: int32 broadcastable to dst's
        leading dims + [1] (dynamic values: one program serves every size).

    Returns:
      (i0, i1, w0, w1): int32 input taps and float32 weights, shaped like dst.
    """
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    src = jnp.maximum(scale * (dst.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
    w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
    return i0, i1, 1.0 - w1, w1


def _take_rows(x: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """x [N, R, ...], idx [N, S] -> [N, S, ...]: whole rows per instance (contiguous slices)."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode='clip'))(x, idx)


def normalize_resize_to_canvas(images: jnp.ndarray, sizes: jnp.ndarray, canvas_hw: tuple[int, int], *,
                               pixel_scale: float, mean: Sequence[float], std: Sequence[float],
                               channel_order: str = 'RGB') -> jnp.ndarray:
    """uint8 raw images -> the model's float32 input canvas, as `Predictor.preprocess` on the host.

    Args:
      images: [B, Hr, Wr, 3] uint8 RGB, each image at the top-left of its raw canvas.
      sizes: [B, 4] int32 (h, w, rh, rw): the image's size and its resized size (rh <= canvas H,
        rw <= canvas W).
      canvas_hw: static (H, W) of the model's canvas.
      pixel_scale, mean, std, channel_order: as `preprocess.normalize`.

    Returns:
      [B, H, W, 3] float32: (x * scale - mean) / std resized bilinearly (align_corners=False,
      no antialias) to (rh, rw) at the top-left, zero elsewhere.
    """
    x = images.astype(jnp.float32)
    if channel_order == 'BGR':
        x = x[..., ::-1]
    if abs(pixel_scale * 255.0 - 1.0) < 1e-12:
        x = x / jnp.float32(255)      # torchvision's to_tensor divides: same rounding as the host
    elif pixel_scale != 1.0:
        x = x * jnp.float32(pixel_scale)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    ch, cw = canvas_hw
    h, w, rh, rw = (sizes[:, k:k + 1] for k in range(4))                  # [B, 1] each
    y0, y1, wy0, wy1 = linear_taps(jnp.arange(ch, dtype=jnp.int32)[None], rh, h)   # [B, H]
    x0, x1, wx0, wx1 = linear_taps(jnp.arange(cw, dtype=jnp.int32)[None], rw, w)   # [B, W]
    # x first, then y (the order of torch's separable kernel); columns are gathered as rows of
    # the transposed image.
    cols = jnp.swapaxes(x, 1, 2)                                          # [B, Wr, Hr, 3]
    xr = _take_rows(cols, x0) * wx0[..., None, None] + _take_rows(cols, x1) * wx1[..., None, None]
    xr = jnp.swapaxes(xr, 1, 2)                                           # [B, Hr, W, 3]
    out = _take_rows(xr, y0) * wy0[..., None, None] + _take_rows(xr, y1) * wy1[..., None, None]
    inside = ((jnp.arange(ch)[None, :, None] < rh[:, :, None]) &
              (jnp.arange(cw)[None, None, :] < rw[:, :, None]))           # [B, H, W]
    return jnp.where(inside[..., None], out, 0.0)


def expand_boxes_to_pixels(boxes: jnp.ndarray, mask_size: int, padding: int = 1) -> jnp.ndarray:
    """jnp twin of `ops.masks.expand_boxes_to_pixels`: [..., 4] float32 -> int32 inclusive boxes."""
    scale = jnp.float32(float(mask_size + 2 * padding) / mask_size)
    w_half = (boxes[..., 2] - boxes[..., 0]) * 0.5 * scale
    h_half = (boxes[..., 3] - boxes[..., 1]) * 0.5 * scale
    x_c = (boxes[..., 2] + boxes[..., 0]) * 0.5
    y_c = (boxes[..., 3] + boxes[..., 1]) * 0.5
    expanded = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=-1)
    return jnp.trunc(expanded).astype(jnp.int32)       # torchvision's int64 cast truncates


def paste_masks_to_canvas(masks: jnp.ndarray, boxes: jnp.ndarray, canvas_hw: tuple[int, int],
                          padding: int = 1, threshold: float | None = None) -> jnp.ndarray:
    """Device twin of `ops.masks.paste_masks` for a batch of fixed-size mask predictions.

    Args:
      masks: [..., N, M, M] float probabilities; boxes: [..., N, 4] float32 xyxy in pixels of the
        original image.
      canvas_hw: static (H, W) >= the image's size; pixels past the image are meaningless (the
        caller crops to the image, as torchvision's window does).
      padding: zeros around each mask before resizing (torchvision: 1).
      threshold: None gives float32 probabilities; else bool `probability > threshold`.

    Returns:
      [..., N, H, W] float32 (or bool): each mask resized to its expanded integer box and zero
      outside it (torchvision's recipe, see ops/masks.py).
    """
    lead = masks.shape[:-2]
    m = masks.shape[-1]
    ch, cw = canvas_hw
    padded = jnp.pad(masks.reshape((-1, m, m)).astype(jnp.float32), ((0, 0), (padding, padding), (padding, padding)))
    p = m + 2 * padding
    x1, y1, x2, y2 = jnp.moveaxis(expand_boxes_to_pixels(boxes.reshape((-1, 4)), m, padding), -1, 0)
    box_w = jnp.maximum(x2 - x1 + 1, 1)[:, None]
    box_h = jnp.maximum(y2 - y1 + 1, 1)[:, None]
    xs = jnp.arange(cw, dtype=jnp.int32)[None]
    ys = jnp.arange(ch, dtype=jnp.int32)[None]
    pin = jnp.int32(p)
    tx0, tx1, wx0, wx1 = linear_taps(jnp.clip(xs - x1[:, None], 0, box_w - 1), box_w, pin)   # [n, W]
    ty0, ty1, wy0, wy1 = linear_taps(jnp.clip(ys - y1[:, None], 0, box_h - 1), box_h, pin)   # [n, H]
    cols = jnp.swapaxes(padded, 1, 2)                                     # [n, P(x), P(y)]
    rx = _take_rows(cols, tx0) * wx0[..., None] + _take_rows(cols, tx1) * wx1[..., None]   # [n, W, P(y)]
    rx = jnp.swapaxes(rx, 1, 2)                                           # [n, P(y), W]
    out = _take_rows(rx, ty0) * wy0[..., None] + _take_rows(rx, ty1) * wy1[..., None]      # [n, H, W]
    inside = (((xs >= x1[:, None]) & (xs <= x2[:, None]))[:, None, :] &
              ((ys >= y1[:, None]) & (ys <= y2[:, None]))[:, :, None])
    if threshold is not None:
        out = out > threshold
        return (out & inside).reshape(lead + (ch, cw))
    return jnp.where(inside, out, 0.0).reshape(lead + (ch, cw))
