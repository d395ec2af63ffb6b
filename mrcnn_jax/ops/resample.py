"""Bilinear resampling as torch's `upsample_bilinear2d` (align_corners=False), and the image resize
on the device.

`linear_taps` is the one definition of the sampling positions and weights; every bilinear resize
in the package uses it, in numpy on the host and in jnp on the device: the host image resize
(`preprocess.resize_bilinear`), the device image resize here (`normalize_resize_to_canvas`) and
both mask pastes (`ops.paste`). The host versions reproduce torch's CPU kernels bit for bit; the
device versions compute the same functions inside XLA, so that a GPU or TPU never waits for the
host's numpy (on an H100-class GPU the R50-FPN forward takes ~7 ms while the host resize and paste
of one COCO photo take ~200 ms), equal to the host versions to float32 rounding (one ulp of the
sampling coordinate at most: XLA may or may not fuse `scale * x - 0.5` into one FMA, where torch's
kernel always does).

Static shapes: the raw uint8 images arrive padded to a canvas (`raw_canvas`), with their true
sizes as data; the resized image is written onto the model's canvas bucket, zero beyond the
resized size (masks are pasted back onto the raw canvas: `ops.paste.paste_masks_to_canvas`). One
program per (raw canvas, model canvas) pair, compiled on first use like the model's buckets.

On the device, resampling uses only row gathers (contiguous slices) and transposes, which XLA
lowers to copies on every backend, and never a matmul (whose TF32 default on GPUs would round the
data).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Raw images are padded to multiples of this before upload: few programs, little padding.
RAW_CANVAS_MULTIPLE = 64


def raw_canvas(h: int, w: int, multiple: int = RAW_CANVAS_MULTIPLE) -> tuple[int, int]:
    """The padded (H, W) on which a raw h x w image is uploaded and its masks are pasted."""
    return int(math.ceil(h / multiple) * multiple), int(math.ceil(w / multiple) * multiple)


def linear_taps(dst, out_size, in_size, xp=np):
    """The two input taps and weights of bilinear (align_corners=False) resizing in_size -> out_size.

    Args:
      dst: [..., S] int destination pixel indices, 0 <= dst < out_size for the pixels that matter.
      out_size: int output length, >= 1, broadcastable to dst (e.g. [N, 1] per instance).
      in_size: int input length, broadcastable to dst. On the device out_size and in_size may be
        traced values: one program serves every size.
      xp: the array namespace, `numpy` on the host or `jax.numpy` on the device.

    Returns:
      (i0, i1, w0, w1): input indices in xp's default int (int64 in numpy, int32 in jax without
      x64) and float32 weights, shaped like dst; output pixel dst is w0 * input[i0] + w1 * input[i1].
      In numpy, the indices and weights are exactly those torch's CPU kernel computes.
    """
    # torch (UpSample.h): scale = float(in) / out, all in float32;
    # src = scale * (dst + 0.5) - 0.5, clamped at 0; i0 = min(floor(src), in - 1);
    # lambda = clamp(src - i0, 0, 1); the second tap is i0 + 1, or i0 again at the last pixel.
    scale = xp.asarray(in_size).astype(xp.float32) / xp.asarray(out_size).astype(xp.float32)
    if xp is np:
        # torch's kernel is compiled with FMA, so `scale * (dst + 0.5) - 0.5` is rounded once, and
        # numpy has no float32 FMA. The product of a float32 and a half-integer below 2^24 is exact
        # in float64, so computing in float64 and rounding to float32 once reproduces it bit for
        # bit (checked for every output size up to 3000; a plain float32 expression differs by an
        # ulp at some pixels).
        src = (scale.astype(np.float64) * (dst + 0.5) - 0.5).astype(np.float32)
    else:
        # Plain float32 on the device: float64 is off in JAX by default (x64), missing on TPUs and
        # slow on GPUs; the device paths promise float32 rounding, not torch's bits.
        src = scale * (xp.asarray(dst).astype(xp.float32) + 0.5) - 0.5
    src = xp.maximum(src, xp.float32(0))
    i0 = xp.minimum(xp.floor(src).astype(int), in_size - 1)
    w1 = xp.clip(src - i0.astype(xp.float32), xp.float32(0), xp.float32(1))
    i1 = i0 + (i0 < in_size - 1).astype(i0.dtype)
    return i0, i1, xp.float32(1) - w1, w1


def _take_rows(x: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """x [N, R, ...], idx [N, S] -> [N, S, ...]: whole rows per instance (contiguous slices)."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode='clip'))(x, idx)


def _interpolate_rows(x: jnp.ndarray, taps) -> jnp.ndarray:
    """x [N, R, ...] -> [N, S, ...]: w0 * x[i0] + w1 * x[i1] per instance, taps each [N, S]."""
    i0, i1, w0, w1 = taps
    trailing = (Ellipsis,) + (None,) * (x.ndim - 2)
    return _take_rows(x, i0) * w0[trailing] + _take_rows(x, i1) * w1[trailing]


def resample_separable(x: jnp.ndarray, y_taps, x_taps) -> jnp.ndarray:
    """x [N, Hin, Win, ...] -> [N, Hout, Wout, ...] with per-instance `linear_taps` (each [N, Hout]
    or [N, Wout]): x first, then y, the order in which torch's separable kernel rounds. Columns are
    gathered as rows of the transposed array."""
    resized_x = _interpolate_rows(jnp.swapaxes(x, 1, 2), x_taps)         # [N, Wout, Hin, ...]
    return _interpolate_rows(jnp.swapaxes(resized_x, 1, 2), y_taps)      # [N, Hout, Wout, ...]


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
    y_taps = linear_taps(jnp.arange(ch, dtype=jnp.int32)[None], rh, h, xp=jnp)     # [B, H]
    x_taps = linear_taps(jnp.arange(cw, dtype=jnp.int32)[None], rw, w, xp=jnp)     # [B, W]
    out = resample_separable(x, y_taps, x_taps)                           # [B, H, W, 3]
    inside = ((jnp.arange(ch)[None, :, None] < rh[:, :, None]) &
              (jnp.arange(cw)[None, None, :] < rw[:, :, None]))           # [B, H, W]
    return jnp.where(inside[..., None], out, 0.0)
