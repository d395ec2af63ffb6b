"""Pasting fixed-size mask predictions into the image, on the host, as torchvision does.

The mask head predicts an M x M (M = 28) probability map per detection, aligned with its box. To
score it against COCO ground truth it has to be resampled into the box's pixels of the original
image. `paste_masks` reproduces `torchvision.models.detection.roi_heads.paste_masks_in_image`
within float rounding (tested to 1e-6), but for all instances at once: the bilinear resize is
separable (`Wy @ mask @ Wx^T`, each row of Wy and Wx holding two taps), so it is two batched
gathers and weighted sums, evaluated only over the part of the image that each box covers.

torchvision's recipe, quirks included (each reproduced below):
  1. pad the mask with `padding` zeros on every side (M -> M + 2p), so that the bilinear
     resize fades to 0 at the border instead of smearing the edge values outwards;
  2. scale the box about its centre by (M + 2p) / M so that the padded mask still covers it;
  3. cast the box to int64, which truncates toward zero (-0.7 -> 0, not -1);
  4. resize the padded mask to (y2 - y1 + 1, x2 - x1 + 1) pixels (the "+1" is the legacy
     TO_REMOVE convention: integer boxes are inclusive), at least 1 x 1, with
     `F.interpolate(mode='bilinear', align_corners=False)`;
  5. copy the part inside the image into a zero image.

Host-side numpy: this runs after the compiled `predict`, on variable numbers of detections. For
memory, work goes in chunks of instances (`iter_pasted_masks`); `paste_masks_to_rle` pastes,
thresholds and RLE-encodes chunk by chunk, so only one chunk of full-image masks exists at a time.
"""

from typing import Iterator, Literal

import numpy as np

# Default number of instances pasted together: 16 x 1333 x 800 float32 is 68 MB.
DEFAULT_CHUNK_SIZE = 16


def expand_boxes_to_pixels(boxes: np.ndarray, mask_size: int, padding: int = 1) -> np.ndarray:
    """The integer pixel boxes into which torchvision pastes padded masks.

    Args:
      boxes: [N, 4] float xyxy, in pixels of the image the masks are pasted into.
      mask_size: M, the width of the (unpadded) square mask predictions.
      padding: zeros added on each side of the mask before pasting.

    Returns:
      [N, 4] int64 inclusive pixel boxes (x1, y1, x2, y2): the box scaled about its centre by
      (M + 2 * padding) / M in float32, then truncated toward zero.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    # torchvision: `scale = float(M + 2p) / M` is a Python float, but multiplying a float32
    # tensor by it computes in float32, so the scale is rounded to float32 first.
    scale = np.float32(float(mask_size + 2 * padding) / mask_size)
    half = np.float32(0.5)
    w_half = (boxes[:, 2] - boxes[:, 0]) * half * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * half * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * half
    y_c = (boxes[:, 3] + boxes[:, 1]) * half
    expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    # torchvision: `.to(torch.int64)` truncates toward zero, unlike floor, for negative coords.
    return np.trunc(expanded).astype(np.int64)


def linear_taps(dst: np.ndarray, out_size: np.ndarray,
                in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two input taps and weights of bilinear (align_corners=False) resizing in_size -> out_size.

    Args:
      dst: [N, S] int64 destination pixel indices, 0 <= dst < out_size for the pixels that matter.
      out_size: [N] int64 output length per instance, >= 1.
      in_size: input length (M + 2p).

    Returns:
      (i0, i1, w0, w1): [N, S] int64 input indices and [N, S] float32 weights; output pixel
      dst[n, s] is w0 * input[i0] + w1 * input[i1], with the indices and weights exactly as
      torch's CPU `upsample_bilinear2d` computes them.
    """
    # torch (UpSample.h): scale = float(in) / out, all in float32;
    # src = scale * (dst + 0.5) - 0.5, clamped at 0; i0 = min(floor(src), in - 1);
    # lambda = clamp(src - i0, 0, 1); the second tap is i0 + 1, or i0 again at the last pixel.
    scale = np.float32(in_size) / out_size.astype(np.float32)
    # torch's kernel is compiled with FMA, so `scale * (dst + 0.5) - 0.5` is rounded once. The
    # product of a float32 and a half-integer below 2^24 is exact in float64, so computing in
    # float64 and rounding to float32 once reproduces it bit for bit (checked for every output
    # size up to 3000; a plain float32 expression differs by an ulp at some pixels).
    src = (scale[:, None].astype(np.float64) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    w0 = np.float32(1) - w1
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, w0, w1


def _paste_chunk(padded: np.ndarray, int_boxes: np.ndarray, image_hw: tuple[int, int],
                 threshold: float | None, layout: str) -> np.ndarray:
    """Pastes [n, P, P] padded masks into int boxes; see `iter_pasted_masks` for the result."""
    n, p_h, p_w = padded.shape
    im_h, im_w = image_hw
    out_dtype = np.float32 if threshold is None else np.bool_
    out_shape = (n, im_h, im_w) if layout == 'nhw' else (n, im_w, im_h)
    x1, y1, x2, y2 = int_boxes.T
    # torchvision: the mask is resized to w = max(int(x2 - x1 + 1), 1) columns; then the window
    # [max(x1, 0), min(x2 + 1, W)) of the image receives columns (window - x1) of it. (An
    # inverted box, x2 < x1, thus pastes nothing though it is resized to one pixel.)
    box_w = np.maximum(x2 - x1 + 1, 1)
    box_h = np.maximum(y2 - y1 + 1, 1)
    win_x0 = np.clip(x1, 0, im_w)
    win_y0 = np.clip(y1, 0, im_h)
    win_w = np.maximum(np.clip(x2 + 1, 0, im_w) - win_x0, 0)
    win_h = np.maximum(np.clip(y2 + 1, 0, im_h) - win_y0, 0)
    max_w, max_h = int(win_w.max(initial=0)), int(win_h.max(initial=0))
    if max_w <= 0 or max_h <= 0:
        return np.zeros(out_shape, out_dtype)  # no instances, or every box outside the image
    # Only the window of each box is computed: [n, max_h, max_w] instead of [n, H, W].
    cols = np.arange(max_w)
    rows = np.arange(max_h)
    # Separable bilinear resize with two taps per output pixel, x first, then y: the order in
    # which torch's kernel rounds. (Gathers rather than `Wy @ mask @ Wx^T` with interpolation
    # matrices: as fast here, and each pixel's value does not depend on the chunk's shapes, as
    # BLAS's blocking would make it.)
    tx0, tx1, wx0, wx1 = linear_taps(win_x0[:, None] - x1[:, None] + cols, box_w, p_w)  # [n, max_w]
    ty0, ty1, wy0, wy1 = linear_taps(win_y0[:, None] - y1[:, None] + rows, box_h, p_h)  # [n, max_h]
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
    if threshold is not None:
        resized = resized > threshold
    # Scatter the windows into zero planes with one flat index per window pixel; pixels past an
    # instance's own window (the chunk's windows are padded to the largest) all go to one extra
    # element at the end, so no boolean selection or per-instance loop is needed.
    plane = im_h * im_w
    ys = win_y0[:, None, None] + rows[None, :, None]
    xs = win_x0[:, None, None] + cols[None, None, :]
    base = np.arange(n)[:, None, None] * plane
    flat = base + (ys * im_w + xs if layout == 'nhw' else xs * im_h + ys)  # [n, max_h, max_w]
    outside = (rows[None, :, None] >= win_h[:, None, None]) | (cols[None, None, :] >= win_w[:, None, None])
    flat[outside] = n * plane
    buffer = np.zeros(n * plane + 1, out_dtype)
    buffer[flat] = resized
    return buffer[:-1].reshape(out_shape)


def iter_pasted_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int],
                      padding: int = 1, threshold: float | None = None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE,
                      layout: Literal['nhw', 'nwh'] = 'nhw') -> Iterator[np.ndarray]:
    """Pastes masks chunk by chunk, to bound memory to chunk_size full-image masks.

    Args:
      masks: [N, M, M] float32 mask probabilities, aligned with `boxes`.
      boxes: [N, 4] float32 xyxy in pixels of the target image.
      image_hw: (H, W) of the target image.
      padding: zeros added around each mask before resizing (torchvision's default 1).
      threshold: None for probabilities; else a value >= 0, and masks come back as
        `probability > threshold` (torchvision's COCO evaluation uses `> 0.5`).
      chunk_size: instances per yielded array.
      layout: 'nhw' yields [n, H, W]; 'nwh' yields [n, W, H] C-contiguous, whose
        `.transpose(2, 1, 0)` is the Fortran-ordered [H, W, n] that pycocotools encodes.

    Yields:
      [n, H, W] (or [n, W, H]) arrays, n <= chunk_size, covering the instances in order:
      float32 in [0, 1] when threshold is None, else bool.
    """
    masks = np.asarray(masks, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f'expected masks [N, M, M] and boxes [N, 4], got {masks.shape} and {boxes.shape}')
    if threshold is not None and threshold < 0:
        raise ValueError(f'threshold must be >= 0 (pixels outside the box are 0), got {threshold}')
    if layout not in ('nhw', 'nwh'):
        raise ValueError(f"layout must be 'nhw' or 'nwh', got {layout!r}")
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    # torchvision takes the scale from the last (width) axis for both axes.
    int_boxes = expand_boxes_to_pixels(boxes, masks.shape[-1], padding)
    chunk_size = max(int(chunk_size), 1)
    for start in range(0, masks.shape[0], chunk_size):
        chunk = masks[start:start + chunk_size]
        padded = np.pad(chunk, ((0, 0), (padding, padding), (padding, padding)))
        yield _paste_chunk(padded, int_boxes[start:start + chunk_size], (im_h, im_w), threshold, layout)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], padding: int = 1,
                threshold: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """Pastes per-box mask predictions into the image, as torchvision's `paste_masks_in_image`.

    Equal (to float rounding, < 1e-6) to
    `torchvision.models.detection.roi_heads.paste_masks_in_image(masks[:, None], boxes, image_hw,
    padding)[:, 0]` for every box that overlaps the image; a box entirely outside the image gives
    an all-zero mask (where torchvision raises or returns zeros, depending on the side).

    Args:
      masks: [N, M, M] float32 probabilities in [0, 1] (M = 28 for Mask R-CNN).
      boxes: [N, 4] float32 xyxy in pixels of the target (original) image.
      image_hw: (H, W) of the target image.
      padding: zeros added around each mask before resizing.
      threshold: None returns probabilities; a value >= 0 returns `probability > threshold`.
      chunk_size: instances pasted together; bounds the temporary memory, not the result's.

    Returns:
      [N, H, W] float32 in [0, 1], or bool when threshold is given.
    """
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    dtype = np.float32 if threshold is None else np.bool_
    chunks = list(iter_pasted_masks(masks, boxes, (im_h, im_w), padding, threshold, chunk_size))
    if not chunks:
        return np.zeros((0, im_h, im_w), dtype)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)


def encode_rle(masks: np.ndarray, threshold: float = 0.5,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[dict]:
    """COCO compressed RLE of binary masks, counts as str (JSON-ready).

    Args:
      masks: [N, H, W] bool or uint8 (non-zero is foreground), or float (foreground is
        `value > threshold`).
      threshold: used for float masks only.
      chunk_size: instances converted to Fortran order and encoded together.

    Returns:
      N dicts {'size': [H, W], 'counts': str}, as `pycocotools.mask.encode` of each mask.
    """
    from pycocotools import mask as mask_util  # optional dependency: mrcnn-jax[coco]

    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f'expected masks [N, H, W], got {masks.shape}')
    if masks.dtype.kind == 'f':
        masks = masks > threshold
    rles = []
    for start in range(0, masks.shape[0], max(int(chunk_size), 1)):
        chunk = masks[start:start + chunk_size]
        # pycocotools wants uint8 [H, W, n] in Fortran order (column-major runs).
        fortran = np.asfortranarray(chunk.transpose(1, 2, 0), dtype=np.uint8)
        rles.extend(mask_util.encode(fortran))
    for rle in rles:
        rle['counts'] = rle['counts'].decode('ascii')
    return rles


def paste_masks_to_rle(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int],
                       padding: int = 1, threshold: float = 0.5,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[dict]:
    """Pastes, thresholds and RLE-encodes masks chunk by chunk (no [N, H, W] array is built).

    Args:
      masks: [N, M, M] float32 probabilities; boxes: [N, 4] float32 xyxy in target pixels.
      image_hw: (H, W) of the target image.
      padding, threshold, chunk_size: as in `paste_masks` (foreground is `probability > threshold`).

    Returns:
      N dicts {'size': [H, W], 'counts': str}, equal to
      `encode_rle(paste_masks(masks, boxes, image_hw, padding, threshold))`.
    """
    from pycocotools import mask as mask_util

    if threshold is None or threshold < 0:
        raise ValueError(f'paste_masks_to_rle needs a threshold >= 0, got {threshold}')
    rles = []
    for chunk in iter_pasted_masks(masks, boxes, image_hw, padding, threshold, chunk_size, layout='nwh'):
        # [n, W, H] C-contiguous is [H, W, n] Fortran-contiguous: no copy before encoding.
        rles.extend(mask_util.encode(chunk.view(np.uint8).transpose(2, 1, 0)))
    for rle in rles:
        rle['counts'] = rle['counts'].decode('ascii')
    return rles
