"""Host-side inference preprocessing: torchvision's GeneralizedRCNNTransform on a static canvas.

Variable-size work (decode, resize) happens on the host in numpy; the result is placed at the
top-left of a canvas chosen from a small set of buckets, so the compiled model sees a handful
of shapes. The numbers reproduce torchvision's:
  * scale = min(min_size / min(h, w), max_size / max(h, w)); the resized size is
    floor(h * scale) in double precision (torch.nn.functional.interpolate with
    recompute_scale_factor=True), or rounded with Detectron2's rule (`Conventions.resize_rule`);
  * bilinear, align_corners=False, no antialias, with the scale recomputed as in / out, all in
    float32 with the operation order and FMA rounding of torch's CPU kernels (`resize_bilinear`);
  * normalize before resizing ((x / 255 - mean) / std, RGB), pad with zeros.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mrcnn_jax.ops.resample import linear_taps


def resized_size(h: int, w: int, min_size: float, max_size: float, rule: str = 'floor') -> tuple[int, int]:
    """Output (height, width) of the shortest-edge resize (`Conventions.resize_rule`).

    'floor' (torchvision): scale = min(min_size / short, max_size / long), floor(side * scale)
    (F.interpolate with recompute_scale_factor=True). 'round' (Detectron2 ResizeShortestEdge):
    the short side becomes min_size, both shrink if the long one exceeds max_size, int(x + 0.5).
    """
    scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
    if rule == 'floor':
        return int(math.floor(h * scale)), int(math.floor(w * scale))
    if rule == 'round':
        size = float(min_size)
        s = size / min(h, w)
        newh, neww = (size, s * w) if h < w else (s * h, size)
        if max(newh, neww) > max_size:
            s = max_size * 1.0 / max(newh, neww)
            newh, neww = newh * s, neww * s
        return int(newh + 0.5), int(neww + 0.5)
    raise ValueError(f'unknown resize rule {rule!r}')


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add a * b + c, rounded once: the float32 product is exact in
    float64, so one float64 add and one rounding to float32 reproduce it (barring a double
    rounding that needs the sum to be inexact in float64 and then tie in float32)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c).astype(np.float32)


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """image [H, W, C] float32 -> [oh, ow, C] float32, as F.interpolate(bilinear, align_corners=False).

    Bit for bit what torch's CPU kernel computes with more than one thread. torch picks one of two
    kernels (UpSampleKernel.cpp), both compiled with FMA contraction, so rounding follows them:
      * oh + ow > 128: the generic separable kernel, `t0 * w0 + t1 * w1` per axis (x inner, y
        outer), contracted to fma(t0, w0, t1 * w1);
      * oh + ow <= 128: the channels-last kernel, `x00 * w00 + x01 * w01 + x10 * w10 + x11 * w11`
        with w_ij = wy_i * wx_j, contracted to fma(x11, w11, fma(x10, w10, fma(x00, w00, x01 * w01))).
    (torch with a single thread uses the channels-last kernel for 3-channel images of any size,
    so its own result then differs from this one by an ulp at some pixels.)
    """
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    oh, ow = out_hw
    y0, y1, wy0, wy1 = linear_taps(np.arange(oh), oh, h)
    x0, x1, wx0, wx1 = linear_taps(np.arange(ow), ow, w)
    wx0 = wx0[None, :, None]
    wx1 = wx1[None, :, None]
    wy0 = wy0[:, None, None]
    wy1 = wy1[:, None, None]
    rows0 = image[y0]
    rows1 = image[y1]
    if oh + ow > 128:
        top = _fma(rows0[:, x0], wx0, rows0[:, x1] * wx1)
        bot = _fma(rows1[:, x0], wx0, rows1[:, x1] * wx1)
        return _fma(top, wy0, bot * wy1)
    out = rows0[:, x1] * (wy0 * wx1)
    out = _fma(rows0[:, x0], wy0 * wx0, out)
    out = _fma(rows1[:, x0], wy1 * wx0, out)
    return _fma(rows1[:, x1], wy1 * wx1, out)


def default_buckets(min_size: int, max_size: int, size_divisible: int = 32) -> list[tuple[int, int]]:
    """Canvases for inference: short side ceil(min_size), long side 4:3, 3:2 or max, both
    orientations.

    With 800/1333: (800, 1088) fits a 4:3 photo (COCO's usual 640x480 -> 800x1066), (800, 1216)
    a 3:2 one (COCO's next most common 640x427 -> 800x1201, exactly torchvision's padded size)
    and (800, 1344) anything wider; portrait twins likewise. Each bucket compiles once, on first
    use; the 3:2 bucket saves the 10% of compute a 3:2 photo would spend on 1344's padding.
    """
    def up(x):
        return int(math.ceil(x / size_divisible) * size_divisible)
    short = up(min_size)
    longs = sorted({min(up(min_size * r), up(max_size)) for r in (4 / 3, 3 / 2)} | {up(max_size)})
    out = [(short, l) for l in longs] + [(l, short) for l in longs]
    return sorted(set(out), key=lambda hw: (hw[0] * hw[1], hw))


def resize_pil(image_u8: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [oh, ow, C] with PIL's bilinear filter: Detectron2's
    `ResizeTransform.apply_image` for uint8 images (`Image.fromarray(img).resize((w, h),
    Image.BILINEAR)`), which antialiases when shrinking (the filter support grows with the scale)
    and rounds to uint8. PIL filters each channel alike, so RGB in gives what BGR in would,
    channels swapped."""
    from PIL import Image
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if image_u8.shape[:2] == (oh, ow):
        return image_u8      # PIL returns a copy of the same pixels
    return np.asarray(Image.fromarray(np.ascontiguousarray(image_u8)).resize((ow, oh), Image.BILINEAR))


def choose_bucket(padded_hw: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """Smallest-area bucket that holds the padded image, or None."""
    fits = [b for b in buckets if b[0] >= padded_hw[0] and b[1] >= padded_hw[1]]
    return min(fits, key=lambda b: (b[0] * b[1], b)) if fits else None


def as_rgb_uint8(image) -> np.ndarray:
    """Accept HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) uint8; return HxWx3 uint8.

    Anything else raises ValueError naming the shape and dtype.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f'expected a uint8 image, got dtype {arr.dtype} with shape {arr.shape}')
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 4:
        return arr[:, :, :3]
    raise ValueError(f'expected an HxWx3 RGB (or HxW gray, HxWx4 RGBA) uint8 image, got shape {arr.shape}')


def normalize(image_u8: np.ndarray, pixel_scale: float, mean: Sequence[float], std: Sequence[float],
              channel_order: str = 'RGB') -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 (x * pixel_scale - mean) / std in the given channel order.

    pixel_scale 1/255 is applied as a division by 255 (torchvision's to_tensor rounding).
    """
    x = image_u8.astype(np.float32)
    if channel_order == 'BGR':
        x = x[:, :, ::-1]
    if abs(pixel_scale * 255.0 - 1.0) < 1e-12:
        x = x / np.float32(255)
    elif pixel_scale != 1.0:
        x = x * np.float32(pixel_scale)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def place_on_canvas(image: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
    """[h, w, C] -> [H, W, C] with the image at the top-left and zeros elsewhere."""
    out = np.zeros((canvas_hw[0], canvas_hw[1], image.shape[2]), np.float32)
    out[:image.shape[0], :image.shape[1]] = image
    return out
