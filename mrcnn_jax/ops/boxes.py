"""Box arithmetic on xyxy float32 arrays: area, IoU, encode/decode, clip, size filters.

All functions are pure jax.numpy and broadcast over leading dimensions, so they work per image,
per batch (`[B, N, 4]`) and under `vmap`. Conventions follow torchvision's `box_ops` and
`det_utils.BoxCoder` (no "+1" in widths: the TO_REMOVE = 1 convention of old Detectron is gone).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# Box-size deltas are clamped here before exp (torchvision and Detectron2 both use log(1000/16)).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """boxes [..., 4] xyxy -> [...] area (x2 - x1) * (y2 - y1); may be negative for inverted boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """IoU matrix as torchvision.ops.box_iou.

    boxes1 [..., N, 4], boxes2 [..., M, 4] float32 xyxy -> [..., N, M] float32.
    0/0 (two empty boxes) gives nan as in torchvision; callers that match mask such pairs.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def encode_boxes(
    boxes: jnp.ndarray, reference: jnp.ndarray, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> jnp.ndarray:
    """Regression targets that take `reference` boxes to `boxes` (torchvision `encode_boxes`).

    boxes, reference: [..., 4] float32 xyxy (broadcastable) -> [..., 4] (dx, dy, dw, dh) * weights.
    """
    wx, wy, ww, wh = weights
    ex_w = reference[..., 2] - reference[..., 0]
    ex_h = reference[..., 3] - reference[..., 1]
    ex_cx = reference[..., 0] + 0.5 * ex_w
    ex_cy = reference[..., 1] + 0.5 * ex_h
    gt_w = boxes[..., 2] - boxes[..., 0]
    gt_h = boxes[..., 3] - boxes[..., 1]
    gt_cx = boxes[..., 0] + 0.5 * gt_w
    gt_cy = boxes[..., 1] + 0.5 * gt_h
    return jnp.stack([
        wx * (gt_cx - ex_cx) / ex_w,
        wy * (gt_cy - ex_cy) / ex_h,
        ww * jnp.log(gt_w / ex_w),
        wh * jnp.log(gt_h / ex_h),
    ], axis=-1)


def decode_boxes(
    deltas: jnp.ndarray,
    reference: jnp.ndarray,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = BBOX_XFORM_CLIP,
) -> jnp.ndarray:
    """Apply regression deltas to reference boxes (torchvision `BoxCoder.decode_single`).

    deltas [..., 4] (dx, dy, dw, dh), reference [..., 4] xyxy (broadcastable) -> [..., 4] xyxy.
    dw, dh are divided by their weights and clamped from above at `clip` before exp. Computed in
    float32 whatever the deltas' dtype (box maths stays f32 under bf16 compute).
    """
    deltas = deltas.astype(jnp.float32)
    reference = reference.astype(jnp.float32)
    wx, wy, ww, wh = weights
    widths = reference[..., 2] - reference[..., 0]
    heights = reference[..., 3] - reference[..., 1]
    ctr_x = reference[..., 0] + 0.5 * widths
    ctr_y = reference[..., 1] + 0.5 * heights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([pred_ctr_x - half_w, pred_ctr_y - half_h,
                      pred_ctr_x + half_w, pred_ctr_y + half_h], axis=-1)


def clip_boxes(boxes: jnp.ndarray, image_hw: jnp.ndarray) -> jnp.ndarray:
    """Clip xyxy boxes to [0, W] x [0, H] (torchvision `clip_boxes_to_image`).

    boxes [..., 4]; image_hw [..., 2] (height, width), broadcast against boxes' leading dims
    (e.g. boxes [B, N, 4] with image_hw [B, 1, 2]).
    """
    h = image_hw[..., 0].astype(boxes.dtype)
    w = image_hw[..., 1].astype(boxes.dtype)
    x1 = jnp.clip(boxes[..., 0], 0.0, w)
    y1 = jnp.clip(boxes[..., 1], 0.0, h)
    x2 = jnp.clip(boxes[..., 2], 0.0, w)
    y2 = jnp.clip(boxes[..., 3], 0.0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def nonsmall_boxes(boxes: jnp.ndarray, min_size: float, strict: bool = False) -> jnp.ndarray:
    """[..., 4] -> [...] bool: both sides >= min_size (torchvision `remove_small_boxes`, as a
    mask), or with `strict` both sides > min_size (Detectron2 `Boxes.nonempty(threshold)`)."""
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    if strict:
        return (ws > min_size) & (hs > min_size)
    return (ws >= min_size) & (hs >= min_size)


def scale_boxes(boxes: jnp.ndarray, scale_hw: jnp.ndarray) -> jnp.ndarray:
    """Multiply x by scale_hw[..., 1] and y by scale_hw[..., 0]. boxes [..., 4], scale [..., 2]."""
    sy = scale_hw[..., 0]
    sx = scale_hw[..., 1]
    return boxes * jnp.stack([sx, sy, sx, sy], axis=-1)
