"""Pasting fixed-size mask predictions into the image as torchvision does, on the host and on the device.

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

Two implementations of this recipe, side by side, sharing steps 2-3 (`expand_boxes_to_pixels`)
and the bilinear taps of step 4 (`ops.resample.linear_taps`):

  * host (numpy): `paste_masks`, `iter_pasted_masks`. Runs after the compiled `predict`, on
    variable numbers of detections, with torch's CPU taps bit for bit. For memory, work goes in
    chunks of instances (`iter_pasted_masks`); `evaluation.rle.paste_masks_to_rle` pastes,
    thresholds and RLE-encodes chunk by chunk, so only one chunk of full-image masks exists at a
    time.
  * device (jnp): `paste_masks_to_canvas`. Inside XLA on fixed shapes (a padded batch of
    detections onto the raw image canvas, `ops.resample.raw_canvas`; the host crops each mask to
    its image), so that a GPU never waits for host numpy; equal to the host paste to float32
    rounding (see `ops.resample`).
"""

from __future__ import annotations

from typing import Iterator, Literal

import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.resample import linear_taps, resample_separable

# Default number of instances pasted together on the host: 16 x 1333 x 800 float32 is 68 MB.
DEFAULT_CHUNK_SIZE = 16


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


# ----------------------------------------------------------------------------------------------
# Host (numpy)


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


# ----------------------------------------------------------------------------------------------
# Device (jnp)


def paste_masks_to_canvas(masks: jnp.ndarray, boxes: jnp.ndarray, canvas_hw: tuple[int, int],
                          padding: int = 1, threshold: float | None = None) -> jnp.ndarray:
    """Device twin of `paste_masks` for a batch of fixed-size mask predictions.

    Args:
      masks: [..., N, M, M] float probabilities; boxes: [..., N, 4] float32 xyxy in pixels of the
        original image.
      canvas_hw: static (H, W) >= the image's size; pixels past the image are meaningless (the
        caller crops to the image, as torchvision's window does).
      padding: zeros around each mask before resizing (torchvision: 1).
      threshold: None gives float32 probabilities; else bool `probability > threshold`.

    Returns:
      [..., N, H, W] float32 (or bool): each mask resized to its expanded integer box and zero
      outside it (torchvision's recipe, see the module docstring). Every box is resampled over the
      whole canvas (static shapes), not only over its window as on the host.
    """
    lead = masks.shape[:-2]
    m = masks.shape[-1]
    ch, cw = canvas_hw
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
