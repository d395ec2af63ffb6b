"""Pasting fixed-size mask predictions into the image, on the host and on the device, by one of two
rules: torchvision's (`rule='padded_resize'`, the default) or Detectron2's (`rule='pixel_centers'`).

The mask head predicts an M x M (M = 28) probability map per detection, aligned with its box. To
score it against COCO ground truth it has to be resampled into the box's pixels of the original
image. Both rules are bilinear resamplings of the map onto the box, evaluated for all instances
at once and only over the part of the image that each box can touch (its window); they differ in
where the box's pixels are and in how the map fades out at its border.

torchvision (`torchvision.models.detection.roi_heads.paste_masks_in_image`, reproduced within
float rounding, tested to 1e-6): the bilinear resize is separable (`Wy @ mask @ Wx^T`, each row of
Wy and Wx holding two taps), so it is two batched gathers and weighted sums. Its recipe, quirks
included (each reproduced below):
  1. pad the mask with `padding` zeros on every side (M -> M + 2p), so that the bilinear
     resize fades to 0 at the border instead of smearing the edge values outwards;
  2. scale the box about its centre by (M + 2p) / M so that the padded mask still covers it;
  3. cast the box to int64, which truncates toward zero (-0.7 -> 0, not -1);
  4. resize the padded mask to (y2 - y1 + 1, x2 - x1 + 1) pixels (the "+1" is the legacy
     TO_REMOVE convention: integer boxes are inclusive), at least 1 x 1, with
     `F.interpolate(mode='bilinear', align_corners=False)`;
  5. copy the part inside the image into a zero image;
  6. (COCO evaluation, `threshold`) foreground is `probability > threshold`.

Detectron2 (`detectron2.layers.mask_ops.paste_masks_in_image` and its `_do_paste_mask`,
reproduced bit for bit on the host, see below): no integer box, no padding, no "+1":
  1. each image pixel (x, y) is sampled at its centre (x + 0.5, y + 0.5), mapped into the float
     box's normalized coordinates in float32, one rounding per operation as torch evaluates them:
     gx = (x + 0.5 - x0) / (x1 - x0) * 2 - 1 (likewise gy with y0, y1);
  2. the unpadded M x M map is sampled there by `F.grid_sample(mode='bilinear',
     padding_mode='zeros', align_corners=False)`: ix = (gx + 1) * (M / 2) - 0.5 (mask-cell
     units; pixel centre x0 + (i + 0.5) (x1 - x0) / M is cell i), the four neighbour cells
     weighted by (1 - wx)(1 - wy), wx(1 - wy), (1 - wx)wy, wx wy, with wx = ix - floor(ix), and
     a cell outside the map counts as 0. So the map fades to 0 over half a cell outside the
     box, at any box size, where torchvision's fade is one padded cell wide on an integer box;
  3. on the CPU (Detectron2's path for every box, one box at a time: `skip_empty=True`) only the
     window x in [max(floor(x0) - 1, 0), min(ceil(x1) + 1, W)), y likewise, is sampled, and the
     rest of the image is 0 (see "the window" below);
  4. (`threshold`) foreground is `probability >= threshold` (torchvision: `>`), so a
     probability of exactly 0.5 is foreground.
  Torch's vectorized CPU kernel (x86-64 builds, AVX2 / AVX512; checked with torch 2.14) rounds
  with fused multiply-adds in two places, which the host reproduces (numpy has no float32 FMA; a
  float32 product is exact in float64, so the sum is formed in float64 and rounded to float32
  once): ix = fma(gx + 1, M / 2, -0.5), and the value
  fma(se_val, se, fma(sw_val, sw, fma(ne_val, ne, nw_val * nw))), each weight (nw = (1 - wy) *
  (1 - wx), ...) rounded to float32 first. Not separable: the weights are rounded products, so
  resizing x first and then y would round differently (by an ulp or so). (The emulated FMA rounds
  twice, float64 then float32, which can differ from one rounding only where the float64 sum
  lies within 2^-53 of a float32 midpoint without being on it: not seen in millions of tested
  pixels.) Thresholded, the host forms the sum in plain float32 (within 3.3e-7 of torch's for
  probabilities; the emulated FMAs cost 2-3 times as much) and redoes it exactly for the pixels
  within 1e-6 of the threshold only, so the masks are still torch's bit for bit.

The window (Detectron2's `skip_empty`): the sampled map is nonzero for ix in (-1, M), i.e. up to
half a mask cell, (x1 - x0) / 2M pixels, outside the box. The window's first excluded pixels,
floor(x0) - 2 and ceil(x1) + 1, have centres at least 1.5 pixels outside the box, so the window
cuts off part of that fade only when the box is more than 3M (84) pixels wide (or tall), and
only on sides where it does not reach the image border. Can this change anything? Probabilities:
yes, for such boxes pixels just outside the window are 0 on Detectron2's CPU path (and here) but
small positive values on its GPU path (`skip_empty=False`, every pixel sampled). Thresholded
masks: not for a threshold >= 0.5: a cut-off pixel lies 1.5 pixels or more outside the box, so
its weight on the map's edge cells is wx < 0.5 - 1.5M / (x1 - x0) (likewise wy), and its
probability is below 0.5 times the largest edge probability, < 0.5 (for any box narrower than
~10^8 pixels, beyond which float32 rounds the bound up to 0.5). For a threshold below 0.5 the
window can decide pixels of boxes wider or taller than 84 pixels. Both paths here follow
Detectron2's CPU path (the window), which is also what makes the host paste cheap.

Degenerate boxes, where Detectron2 and the two rules part: a box with x1 <= x0 or y1 <= y0
(Detectron2's predictor clips boxes and drops the empty ones, so it never pastes these) or so thin
that its coordinates overflow pastes nothing here (all 0 / False). Detectron2 gives NaN
probabilities in its window for a zero-width box (its thresholded mask is False: NaN >= t is
false), samples an inverted box mirrored, and raises (an empty `torch.arange`) for a box whose
window is inverted, e.g. one wholly right of or below the image; here such boxes paste nothing.
torchvision's rule keeps its own handling (below).

Two implementations of each rule, side by side, sharing the box arithmetic
(`expand_boxes_to_pixels`; `detectron2_windows`, `detectron2_taps`) and torchvision's bilinear taps
(`ops.resample.linear_taps`):

  * host (numpy): `paste_masks`, `iter_pasted_masks`. Runs after the compiled `predict`, on
    variable numbers of detections, with torch's CPU arithmetic bit for bit. For memory, work goes
    in chunks of instances (`iter_pasted_masks`); `evaluation.rle.paste_masks_to_rle` pastes,
    thresholds and RLE-encodes chunk by chunk, so only one chunk of full-image masks exists at a
    time.
  * device (jnp): `paste_masks_to_canvas`. Inside XLA on fixed shapes (a padded batch of
    detections onto the raw image canvas, `ops.resample.raw_canvas`; the host crops each mask to
    its image), so that a GPU never waits for host numpy; equal to the host paste to float32
    rounding (see `ops.resample`; for Detectron2's rule XLA may or may not fuse the multiply-adds,
    a difference of an ulp of the sampling coordinate, ~1e-6 in probability at most).
"""

from __future__ import annotations

from typing import Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.resample import linear_taps, resample_separable

# Default number of instances pasted together on the host: 16 x 1333 x 800 float32 is 68 MB.
DEFAULT_CHUNK_SIZE = 16

# The paste rules (`models.conventions.Conventions.mask_paste`).
RULES = ('padded_resize', 'pixel_centers')
Rule = Literal['padded_resize', 'pixel_centers']


def check_rule(rule: str) -> str:
    """rule, if it is one of `RULES`; else ValueError."""
    if rule not in RULES:
        raise ValueError(f'mask paste rule must be one of {RULES}, got {rule!r}')
    return rule


def _check_threshold(threshold: float | None, rule: str) -> None:
    # torchvision's `>`: pixels outside the box are 0, so a threshold >= 0 keeps them background.
    # Detectron2's `>=`: a threshold of 0 would make its whole window foreground (and not the rest
    # of the image), so it must be positive.
    if threshold is None or not isinstance(threshold, (int, float, np.number)):
        return  # (a traced threshold on the device is the caller's to check)
    if rule == 'pixel_centers' and not threshold > 0:
        raise ValueError(f"rule 'pixel_centers' thresholds with >=: threshold must be > 0, got {threshold}")
    if not threshold >= 0:
        raise ValueError(f'threshold must be >= 0 (pixels outside the box are 0), got {threshold}')


def apply_threshold(probs, threshold: float, rule: Rule = 'padded_resize'):
    """Foreground of pasted probabilities by the rule's comparison: torchvision `probs > threshold`,
    Detectron2 `probs >= threshold` (numpy or jnp arrays alike)."""
    return probs >= threshold if check_rule(rule) == 'pixel_centers' else probs > threshold


def expand_boxes_to_pixels(boxes, mask_size: int, padding: int = 1, xp=np):
    """The integer pixel boxes into which torchvision pastes padded masks.

    Args:
      boxes: [..., 4] float xyxy, in pixels of the image the masks are pasted into.
      mask_size: M, the width of the (unpadded) square mask predictions.
      padding: zeros added on each side of the mask before pasting.
      xp: the array namespace, `numpy` on the host or `jax.numpy` on the device.

    Returns:
      [..., 4] inclusive pixel boxes (x1, y1, x2, y2) in xp's default int (int64 in numpy, int32
      in jax without x64): the box scaled about its centre by (M + 2 * padding) / M in float32,
      then truncated toward zero.
    """
    boxes = xp.asarray(boxes, dtype=xp.float32)
    # torchvision: `scale = float(M + 2p) / M` is a Python float, but multiplying a float32
    # tensor by it computes in float32, so the scale is rounded to float32 first.
    scale = xp.float32(float(mask_size + 2 * padding) / mask_size)
    half = xp.float32(0.5)
    w_half = (boxes[..., 2] - boxes[..., 0]) * half * scale
    h_half = (boxes[..., 3] - boxes[..., 1]) * half * scale
    x_c = (boxes[..., 2] + boxes[..., 0]) * half
    y_c = (boxes[..., 3] + boxes[..., 1]) * half
    expanded = xp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=-1)
    # torchvision: `.to(torch.int64)` truncates toward zero, unlike floor, for negative coords.
    return xp.trunc(expanded).astype(int)


def detectron2_windows(boxes, image_hw: tuple[int, int], xp=np):
    """The pixel windows that Detectron2's CPU paste samples (`_do_paste_mask`, skip_empty).

    Args:
      boxes: [..., 4] float xyxy in pixels of the target image.
      image_hw: (H, W) of the target image (on the device: of the canvas).
      xp: `numpy` or `jax.numpy`.

    Returns:
      [..., 4] int (x_start, y_start, x_stop, y_stop), stops exclusive: [max(floor(x0) - 1, 0),
      min(ceil(x1) + 1, W)) and likewise in y, in [0, W] and [0, H]; an empty window (stop <=
      start) for a box with x1 <= x0 or y1 <= y0 (see the module docstring), or one wholly outside
      the image.
    """
    boxes = xp.asarray(boxes, dtype=xp.float32)
    h, w = float(image_hw[0]), float(image_hw[1])
    x0, y0, x1, y1 = (boxes[..., k] for k in range(4))
    # Clipped in float before the int cast (int32 on the device); NaN becomes an empty window.
    starts = [xp.clip(xp.nan_to_num(xp.floor(v) - 1, nan=size), 0, size) for v, size in ((x0, w), (y0, h))]
    stops = [xp.clip(xp.nan_to_num(xp.ceil(v) + 1, nan=0), 0, size) for v, size in ((x1, w), (y1, h))]
    nonempty = (x1 > x0) & (y1 > y0)
    stops = [xp.where(nonempty, stop, start) for start, stop in zip(starts, stops)]
    return xp.stack(starts + stops, axis=-1).astype(int)


def _fma32(a, b, c):
    """float32 a * b + c rounded once, as a fused multiply-add (numpy has none): a * b of two
    float32 is exact in float64, the sum is rounded to float64 and then to float32."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def detectron2_taps(pixels, lo, hi, mask_size: int, xp=np):
    """Detectron2's bilinear taps along one axis: the cells of the zero-bordered map sampled at
    each pixel centre of `pixels` for a box spanning [lo, hi] (`grid_sample`, align_corners=False).

    Args:
      pixels: [..., S] int pixel indices (columns for x, rows for y).
      lo, hi: [..., 1] float32 box edges (x0, x1 or y0, y1), hi > lo for the boxes that matter.
      mask_size: M along this axis.
      xp: `numpy` (torch's CPU arithmetic bit for bit, its FMA included) or `jax.numpy` (plain
        float32: XLA may or may not fuse the multiply-add).

    Returns:
      (j0, j1, u0, u1): indices into the map padded with one zero cell on each side ([M + 2]: cell
      i is j = i + 1, and every cell outside the map is one of the zero cells j = 0 or M + 1),
      xp's default int, and float32 weights u0 = 1 - u1, u1 = ix - floor(ix), shaped like pixels.
      Along x these are (west, east, e, w) in the names of torch's kernel, along y (north,
      south, s, n).
    """
    f32 = xp.float32
    lo = xp.asarray(lo, dtype=f32)
    hi = xp.asarray(hi, dtype=f32)
    centre = xp.asarray(pixels).astype(f32) + f32(0.5)
    size = hi - lo
    if xp is not np:
        # XLA rewrites a division by a broadcast, [n, S] / [n, 1], into a multiplication by the
        # reciprocal, two roundings (2e-7 off in g, 4e-6 in probability); dividing by an [n, S]
        # array that it cannot see through keeps the one correctly rounded division.
        size = jax.lax.optimization_barrier(xp.broadcast_to(size, np.broadcast_shapes(size.shape, centre.shape)))
    # (numpy: quiet about the empty boxes' inf and NaN, which are replaced below.)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        # Detectron2: `(img_x - x0) / (x1 - x0) * 2 - 1`, one float32 rounding per operation.
        g = (centre - lo) / size * f32(2) - f32(1)
        # grid_sample, align_corners=False: ((g + 1) * M - 1) / 2, computed as
        # (g + 1) * (M / 2) - 0.5, with one FMA by torch's vectorized CPU kernel.
        if xp is np:
            ix = _fma32(g + f32(1), f32(mask_size / 2), f32(-0.5))
        else:
            ix = (g + f32(1)) * f32(mask_size / 2) - f32(0.5)
    # Coordinates outside (-2, M + 1) only ever sample zero cells: clip them (exactly as far as the
    # result goes) before the int cast; NaN and inf (empty or absurdly thin boxes, which paste
    # nothing) likewise.
    ix = xp.clip(xp.nan_to_num(ix, nan=-2.0, posinf=mask_size + 1.0, neginf=-2.0), f32(-2), f32(mask_size + 1))
    left = xp.floor(ix)
    u1 = ix - left
    i0 = left.astype(int)
    j0 = xp.clip(i0 + 1, 0, mask_size + 1)
    j1 = xp.clip(i0 + 2, 0, mask_size + 1)
    return j0, j1, f32(1) - u1, u1


# ----------------------------------------------------------------------------------------------
# Host (numpy)


def _torchvision_windows(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], padding: int):
    """torchvision's paste of [n, M, M] masks over each box's window: (values [n, h, w] float32,
    windows [4, n] int (x_start, y_start, width, height)), h and w the largest window's."""
    n = masks.shape[0]
    im_h, im_w = image_hw
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    _, p_h, p_w = padded.shape
    # torchvision takes the scale from the last (width) axis for both axes.
    x1, y1, x2, y2 = expand_boxes_to_pixels(boxes, masks.shape[-1], padding).T
    # torchvision: the mask is resized to w = max(int(x2 - x1 + 1), 1) columns; then the window
    # [max(x1, 0), min(x2 + 1, W)) of the image receives columns (window - x1) of it. (An
    # inverted box, x2 < x1, thus pastes nothing though it is resized to one pixel.)
    box_w = np.maximum(x2 - x1 + 1, 1)
    box_h = np.maximum(y2 - y1 + 1, 1)
    win_x0 = np.clip(x1, 0, im_w)
    win_y0 = np.clip(y1, 0, im_h)
    win_w = np.maximum(np.clip(x2 + 1, 0, im_w) - win_x0, 0)
    win_h = np.maximum(np.clip(y2 + 1, 0, im_h) - win_y0, 0)
    windows = np.stack([win_x0, win_y0, win_w, win_h])
    max_w, max_h = int(win_w.max(initial=0)), int(win_h.max(initial=0))
    if max_w <= 0 or max_h <= 0:
        return None, windows
    # Only the window of each box is computed: [n, max_h, max_w] instead of [n, H, W].
    cols = np.arange(max_w)
    rows = np.arange(max_h)
    # Separable bilinear resize with two taps per output pixel, x first, then y: the order in
    # which torch's kernel rounds. (Gathers rather than `Wy @ mask @ Wx^T` with interpolation
    # matrices: as fast here, and each pixel's value does not depend on the chunk's shapes, as
    # BLAS's blocking would make it.)
    tx0, tx1, wx0, wx1 = linear_taps(win_x0[:, None] - x1[:, None] + cols, box_w[:, None], p_w)  # [n, max_w]
    ty0, ty1, wy0, wy1 = linear_taps(win_y0[:, None] - y1[:, None] + rows, box_h[:, None], p_h)  # [n, max_h]
    inst = np.arange(n)[:, None]
    columns = padded.transpose(0, 2, 1)  # [n, P(x), P(y)]
    resized_x = columns[inst, tx0] * wx0[:, :, None]
    resized_x += columns[inst, tx1] * wx1[:, :, None]  # [n, max_w, P(y)]
    resized_x = resized_x.transpose(0, 2, 1)  # [n, P(y), max_w]
    resized = resized_x[inst, ty0]
    resized *= wy0[:, :, None]
    lower = resized_x[inst, ty1]
    lower *= wy1[:, :, None]
    resized += lower  # [n, max_h, max_w]
    return resized, windows


def _detectron2_windows(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int],
                        threshold: float | None = None):
    """Detectron2's paste of [n, Mh, Mw] masks over each box's window, as `_torchvision_windows`;
    thresholded (bool, `>= threshold`) when a threshold is given."""
    n, m_h, m_w = masks.shape
    x_start, y_start, x_stop, y_stop = detectron2_windows(boxes, image_hw).T
    win_w = np.maximum(x_stop - x_start, 0)
    win_h = np.maximum(y_stop - y_start, 0)
    windows = np.stack([x_start, y_start, win_w, win_h])
    max_w, max_h = int(win_w.max(initial=0)), int(win_h.max(initial=0))
    if max_w <= 0 or max_h <= 0:
        return None, windows
    bordered = np.pad(masks, ((0, 0), (1, 1), (1, 1)))  # cells outside the map are 0
    west, east, e, w = detectron2_taps(x_start[:, None] + np.arange(max_w), boxes[:, 0:1], boxes[:, 2:3], m_w)
    north, south, s, nn = detectron2_taps(y_start[:, None] + np.arange(max_h), boxes[:, 1:2], boxes[:, 3:4], m_h)
    inst = np.arange(n)[:, None]
    columns = bordered.transpose(0, 2, 1)  # [n, Mw + 2 (x), Mh + 2 (y)]
    west_cols = columns[inst, west].transpose(0, 2, 1)  # [n, Mh + 2, max_w]
    east_cols = columns[inst, east].transpose(0, 2, 1)
    # torch's kernel: nw = s * e, ne = s * w, sw = n * e, se = n * w, then
    # (nw_val * nw) + (ne_val * ne) + (sw_val * sw) + (se_val * se), compiled to one product and
    # three FMAs (module docstring).
    corners = ((west_cols, north, s, e), (east_cols, north, s, w),
               (west_cols, south, nn, e), (east_cols, south, nn, w))
    if threshold is None:
        return _detectron2_sum([(cols[inst, rows], y_weight[:, :, None] * x_weight[:, None, :])
                                for cols, rows, y_weight, x_weight in corners]), windows
    # Thresholded: the float32 sum without FMAs is within 11 roundings of 2^-25 |mask| (3.3e-7 for
    # probabilities) of torch's, so it decides every pixel but those near the threshold, whose
    # sums are then formed exactly as torch does (the emulated FMAs are several times as slow).
    value = None
    weight = np.empty((n, max_h, max_w), np.float32)
    for cols, rows, y_weight, x_weight in corners:
        term = cols[inst, rows]  # [n, max_h, max_w]
        term *= np.multiply(y_weight[:, :, None], x_weight[:, None, :], out=weight)
        if value is None:
            value = term
        else:
            value += term
    near = np.abs(value - np.float32(threshold)) <= 1e-6 * float(np.abs(masks).max())
    binary = value >= threshold
    near = np.flatnonzero(near)
    if near.size:
        i, y, x = np.unravel_index(near, value.shape)
        exact = _detectron2_sum([(cols[i, rows[i, y], x], y_weight[i, y] * x_weight[i, x])
                                 for cols, rows, y_weight, x_weight in corners])
        binary.reshape(-1)[near] = exact >= threshold
    return binary, windows


def _detectron2_sum(terms) -> np.ndarray:
    """torch's fused sum of (value, weight) pairs: fma(v3, w3, fma(v2, w2, fma(v1, w1, v0 * w0)))."""
    value = terms[0][0] * terms[0][1]
    for val, weight in terms[1:]:
        value = _fma32(val, weight, value)
    return value


def _scatter_windows(values: np.ndarray | None, windows: np.ndarray, image_hw: tuple[int, int],
                     layout: str, dtype) -> np.ndarray:
    """Writes each instance's window [h, w] of values (already thresholded or not) into zero
    planes: [n, H, W] for 'nhw', [n, W, H] for 'nwh'."""
    n = windows.shape[1]
    im_h, im_w = image_hw
    out_shape = (n, im_h, im_w) if layout == 'nhw' else (n, im_w, im_h)
    if values is None:
        return np.zeros(out_shape, dtype)  # no instances, or every window empty
    win_x0, win_y0, win_w, win_h = windows[:, :, None, None]
    _, max_h, max_w = values.shape
    rows = np.arange(max_h)[:, None]
    cols = np.arange(max_w)[None, :]
    # Scatter the windows into zero planes with one flat index per window pixel; pixels past an
    # instance's own window (the chunk's windows are padded to the largest) all go to one extra
    # element at the end, so no boolean selection or per-instance loop is needed.
    plane = im_h * im_w
    ys = win_y0 + rows
    xs = win_x0 + cols
    base = np.arange(n)[:, None, None] * plane
    flat = base + (ys * im_w + xs if layout == 'nhw' else xs * im_h + ys)  # [n, max_h, max_w]
    flat[(rows >= win_h) | (cols >= win_w)] = n * plane
    buffer = np.zeros(n * plane + 1, dtype)
    buffer[flat] = values
    return buffer[:-1].reshape(out_shape)


def iter_pasted_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int],
                      padding: int = 1, threshold: float | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                      layout: Literal['nhw', 'nwh'] = 'nhw', rule: Rule = 'padded_resize') -> Iterator[np.ndarray]:
    """Pastes masks chunk by chunk, to bound memory to chunk_size full-image masks.

    Args:
      masks: [N, M, M] float32 mask probabilities, aligned with `boxes`.
      boxes: [N, 4] float32 xyxy in pixels of the target image.
      image_hw: (H, W) of the target image.
      padding: zeros added around each mask before resizing (torchvision's default 1); the
        torchvision rule only (Detectron2 does not pad: ignored).
      threshold: None for probabilities; else masks come back as bool: `probability > threshold`
        by the torchvision rule (threshold >= 0; its COCO evaluation uses `> 0.5`),
        `probability >= threshold` by the detectron2 rule (threshold > 0; Detectron2 uses 0.5).
      chunk_size: instances per yielded array.
      layout: 'nhw' yields [n, H, W]; 'nwh' yields [n, W, H] C-contiguous, whose
        `.transpose(2, 1, 0)` is the Fortran-ordered [H, W, n] that pycocotools encodes.
      rule: 'padded_resize' or 'pixel_centers' (see the module docstring).

    Yields:
      [n, H, W] (or [n, W, H]) arrays, n <= chunk_size, covering the instances in order:
      float32 in [0, 1] when threshold is None, else bool.
    """
    check_rule(rule)
    masks = np.asarray(masks, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f'expected masks [N, M, M] and boxes [N, 4], got {masks.shape} and {boxes.shape}')
    _check_threshold(threshold, rule)
    if layout not in ('nhw', 'nwh'):
        raise ValueError(f"layout must be 'nhw' or 'nwh', got {layout!r}")
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    dtype = np.float32 if threshold is None else np.bool_
    chunk_size = max(int(chunk_size), 1)
    for start in range(0, masks.shape[0], chunk_size):
        chunk, chunk_boxes = masks[start:start + chunk_size], boxes[start:start + chunk_size]
        if rule == 'padded_resize':
            values, windows = _torchvision_windows(chunk, chunk_boxes, (im_h, im_w), padding)
            if values is not None and threshold is not None:
                values = values > threshold
        else:
            values, windows = _detectron2_windows(chunk, chunk_boxes, (im_h, im_w), threshold)
        yield _scatter_windows(values, windows, (im_h, im_w), layout, dtype)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], padding: int = 1,
                threshold: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                rule: Rule = 'padded_resize') -> np.ndarray:
    """Pastes per-box mask predictions into the image, as torchvision's or Detectron2's
    `paste_masks_in_image`.

    rule='padded_resize': equal (to float rounding, < 1e-6) to
    `torchvision.models.detection.roi_heads.paste_masks_in_image(masks[:, None], boxes, image_hw,
    padding)[:, 0]` for every box that overlaps the image; a box entirely outside the image gives
    an all-zero mask (where torchvision raises or returns zeros, depending on the side).

    rule='pixel_centers': equal bit for bit to Detectron2's CPU paste,
    `detectron2.layers.mask_ops._do_paste_mask(masks[:, None], boxes, H, W, skip_empty=True)`
    per box written into a zero image (probabilities), and to
    `paste_masks_in_image(masks, boxes, image_hw, threshold)` with a threshold; degenerate boxes
    paste nothing (see the module docstring).

    Args:
      masks: [N, M, M] float32 probabilities in [0, 1] (M = 28 for Mask R-CNN).
      boxes: [N, 4] float32 xyxy in pixels of the target (original) image.
      image_hw: (H, W) of the target image.
      padding: zeros added around each mask before resizing (torchvision rule only).
      threshold: None returns probabilities; a value returns bool masks, `probability >
        threshold` (torchvision) or `probability >= threshold` (detectron2).
      chunk_size: instances pasted together; bounds the temporary memory, not the result's.
      rule: 'padded_resize' or 'pixel_centers'.

    Returns:
      [N, H, W] float32 in [0, 1], or bool when threshold is given.
    """
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    dtype = np.float32 if threshold is None else np.bool_
    chunks = list(iter_pasted_masks(masks, boxes, (im_h, im_w), padding, threshold, chunk_size, rule=rule))
    if not chunks:
        return np.zeros((0, im_h, im_w), dtype)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)


# ----------------------------------------------------------------------------------------------
# Device (jnp)


def _take_rows(x: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """x [N, R, ...], idx [N, S] -> [N, S, ...]: whole rows per instance (contiguous slices)."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode='clip'))(x, idx)


def _detectron2_canvas(masks: jnp.ndarray, boxes: jnp.ndarray, canvas_hw: tuple[int, int]) -> jnp.ndarray:
    """Detectron2's paste of [n, Mh, Mw] masks onto the whole [n, H, W] canvas, 0 outside each
    box's window (row gathers only, as `ops.resample`)."""
    _, m_h, m_w = masks.shape
    ch, cw = canvas_hw
    bordered = jnp.pad(masks.astype(jnp.float32), ((0, 0), (1, 1), (1, 1)))
    xs = jnp.arange(cw, dtype=jnp.int32)[None]
    ys = jnp.arange(ch, dtype=jnp.int32)[None]
    x0, y0, x1, y1 = (boxes[:, k:k + 1] for k in range(4))
    west, east, e, w = detectron2_taps(xs, x0, x1, m_w, xp=jnp)        # [n, W]
    north, south, s, nn = detectron2_taps(ys, y0, y1, m_h, xp=jnp)     # [n, H]
    columns = jnp.swapaxes(bordered, 1, 2)                              # [n, Mw + 2, Mh + 2]
    west_cols = jnp.swapaxes(_take_rows(columns, west), 1, 2)          # [n, Mh + 2, W]
    east_cols = jnp.swapaxes(_take_rows(columns, east), 1, 2)
    s, nn, e, w = s[:, :, None], nn[:, :, None], e[:, None, :], w[:, None, :]
    out = (_take_rows(west_cols, north) * (s * e) + _take_rows(east_cols, north) * (s * w)
           + _take_rows(west_cols, south) * (nn * e) + _take_rows(east_cols, south) * (nn * w))
    x_start, y_start, x_stop, y_stop = jnp.moveaxis(detectron2_windows(boxes, canvas_hw, xp=jnp), -1, 0)
    inside = (((xs >= x_start[:, None]) & (xs < x_stop[:, None]))[:, None, :] &
              ((ys >= y_start[:, None]) & (ys < y_stop[:, None]))[:, :, None])
    return jnp.where(inside, out, 0.0)


def paste_masks_to_canvas(masks: jnp.ndarray, boxes: jnp.ndarray, canvas_hw: tuple[int, int],
                          padding: int = 1, threshold: float | None = None,
                          rule: Rule = 'padded_resize') -> jnp.ndarray:
    """Device twin of `paste_masks` for a batch of fixed-size mask predictions.

    Args:
      masks: [..., N, M, M] float probabilities; boxes: [..., N, 4] float32 xyxy in pixels of the
        original image.
      canvas_hw: static (H, W) >= the image's size; pixels past the image are meaningless (the
        caller crops to the image, as torchvision's window does).
      padding: zeros around each mask before resizing (torchvision: 1; torchvision rule only).
      threshold: None gives float32 probabilities; else bool `probability > threshold`
        (torchvision) or `probability >= threshold` (detectron2).
      rule: static, 'padded_resize' or 'pixel_centers' (see the module docstring).

    Returns:
      [..., N, H, W] float32 (or bool): each mask resampled by the rule (torchvision: resized to
      its expanded integer box and zero outside it; Detectron2: sampled at the pixel centres of
      its window and zero outside it). Every box is resampled over the whole canvas (static
      shapes), not only over its window as on the host.
    """
    check_rule(rule)
    _check_threshold(threshold, rule)
    lead = masks.shape[:-2]
    m_h, m = masks.shape[-2:]
    ch, cw = canvas_hw
    if rule == 'pixel_centers':
        out = _detectron2_canvas(masks.reshape((-1, m_h, m)),
                                 jnp.asarray(boxes, jnp.float32).reshape((-1, 4)), canvas_hw)
        if threshold is not None:
            out = apply_threshold(out, threshold, rule)  # 0 outside the window: never >= a positive t
        return out.reshape(lead + (ch, cw))
    padded = jnp.pad(masks.reshape((-1, m, m)).astype(jnp.float32), ((0, 0), (padding, padding), (padding, padding)))
    p = m + 2 * padding
    x1, y1, x2, y2 = jnp.moveaxis(expand_boxes_to_pixels(boxes.reshape((-1, 4)), m, padding, xp=jnp), -1, 0)
    box_w = jnp.maximum(x2 - x1 + 1, 1)[:, None]
    box_h = jnp.maximum(y2 - y1 + 1, 1)[:, None]
    xs = jnp.arange(cw, dtype=jnp.int32)[None]
    ys = jnp.arange(ch, dtype=jnp.int32)[None]
    x_taps = linear_taps(jnp.clip(xs - x1[:, None], 0, box_w - 1), box_w, p, xp=jnp)   # [n, W]
    y_taps = linear_taps(jnp.clip(ys - y1[:, None], 0, box_h - 1), box_h, p, xp=jnp)   # [n, H]
    out = resample_separable(padded, y_taps, x_taps)                                    # [n, H, W]
    inside = (((xs >= x1[:, None]) & (xs <= x2[:, None]))[:, None, :] &
              ((ys >= y1[:, None]) & (ys <= y2[:, None]))[:, :, None])
    if threshold is not None:
        out = out > threshold
        return (out & inside).reshape(lead + (ch, cw))
    return jnp.where(inside, out, 0.0).reshape(lead + (ch, cw))
