"""COCO run-length encoding of instance masks, as the COCO results format stores segmentations.

`encode_rle` encodes masks already pasted at the image size; `paste_masks_to_rle` pastes per-box
mask predictions (`ops.paste`), thresholds and encodes them chunk by chunk, so only one chunk of
full-image masks exists at a time. Both give `pycocotools.mask.encode`'s dicts with the counts as
str (JSON-ready). pycocotools is an optional dependency (mrcnn-jax[coco]), imported on first use.

`paste_rule` ('padded_resize' or 'pixel_centers', `ops.paste.RULES`) is the model's paste rule
(`Conventions.mask_paste`): it decides how masks are pasted and how probabilities are thresholded
(torchvision `> threshold`, Detectron2 `>= threshold`).
"""

import numpy as np

from mrcnn_jax.ops.paste import DEFAULT_CHUNK_SIZE, apply_threshold, check_rule, iter_pasted_masks


def _counts_as_str(rles: list[dict]) -> list[dict]:
    for rle in rles:
        rle['counts'] = rle['counts'].decode('ascii')
    return rles


def encode_rle(masks: np.ndarray, threshold: float = 0.5,
               chunk_size: int = DEFAULT_CHUNK_SIZE, paste_rule: str = 'padded_resize') -> list[dict]:
    """COCO compressed RLE of binary masks, counts as str (JSON-ready).

    Args:
      masks: [N, H, W] bool or uint8 (non-zero is foreground), or float (foreground is
        `value > threshold`, or `value >= threshold` with paste_rule 'pixel_centers').
      threshold: used for float masks only.
      chunk_size: instances converted to Fortran order and encoded together.
      paste_rule: the rule the float masks were pasted by, for its threshold comparison.

    Returns:
      N dicts {'size': [H, W], 'counts': str}, as `pycocotools.mask.encode` of each mask.
    """
    from pycocotools import mask as mask_util  # optional dependency: mrcnn-jax[coco]

    check_rule(paste_rule)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f'expected masks [N, H, W], got {masks.shape}')
    if masks.dtype.kind == 'f':
        masks = apply_threshold(masks, threshold, paste_rule)
    rles = []
    for start in range(0, masks.shape[0], max(int(chunk_size), 1)):
        chunk = masks[start:start + chunk_size]
        # pycocotools wants uint8 [H, W, n] in Fortran order (column-major runs).
        fortran = np.asfortranarray(chunk.transpose(1, 2, 0), dtype=np.uint8)
        rles.extend(mask_util.encode(fortran))
    return _counts_as_str(rles)


def paste_masks_to_rle(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int],
                       padding: int = 1, threshold: float = 0.5,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, paste_rule: str = 'padded_resize') -> list[dict]:
    """Pastes, thresholds and RLE-encodes masks chunk by chunk (no [N, H, W] array is built).

    Args:
      masks: [N, M, M] float32 probabilities; boxes: [N, 4] float32 xyxy in target pixels.
      image_hw: (H, W) of the target image.
      padding, threshold, chunk_size: as in `ops.paste.paste_masks` (foreground is
        `probability > threshold`, or `>= threshold` with paste_rule 'pixel_centers').
      paste_rule: 'padded_resize' or 'pixel_centers', `ops.paste.paste_masks`'s `rule`.

    Returns:
      N dicts {'size': [H, W], 'counts': str}, equal to
      `encode_rle(paste_masks(masks, boxes, image_hw, padding, threshold, rule=paste_rule))`.
    """
    from pycocotools import mask as mask_util

    if threshold is None or threshold < 0:
        raise ValueError(f'paste_masks_to_rle needs a threshold >= 0, got {threshold}')
    rles = []
    for chunk in iter_pasted_masks(masks, boxes, image_hw, padding, threshold, chunk_size, layout='nwh',
                                   rule=paste_rule):
        # [n, W, H] C-contiguous is [H, W, n] Fortran-contiguous: no copy before encoding.
        rles.extend(mask_util.encode(chunk.view(np.uint8).transpose(2, 1, 0)))
    return _counts_as_str(rles)
