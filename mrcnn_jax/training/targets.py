"""Training targets with fixed shapes: anchor matching and sampling, RoI sampling, mask targets.

All functions are per image (vmap them over the batch, one PRNG key per image) and pure.

Why inside jit and not in tf.data (as the TPU references do): our anchors depend on each image's
padded size (torchvision's P6 stride quirk, see ops/anchors.py) and on the model config, and
RoI sampling needs the RPN's proposals anyway. Keeping all targets in the step keeps the input
pipeline model-agnostic; the [G, A] IoU is produced and reduced inside one XLA fusion, so it
costs compute, not memory traffic.

Matching follows torchvision's `Matcher`:
  * each anchor/proposal takes its highest-IoU GT; IoU < bg_thresh -> background,
    bg_thresh <= IoU < fg_thresh -> ignored, >= fg_thresh -> foreground;
  * low-quality matches (RPN): an anchor whose IoU with some GT equals that GT's best IoU is
    restored to its own best match. torchvision also does this for a GT whose best IoU is 0,
    which makes every non-overlapping anchor foreground; we require a positive best IoU.
  * crowd GT and padding rows take no part (torchvision and Detectron2 drop crowd annotations
    before matching); degenerate GT boxes (zero width or height) are excluded the same way.
Sampling (BalancedPositiveNegativeSampler): up to `num * positive_fraction` positives and the
rest negatives, uniformly at random without replacement, implemented as `lax.top_k` of uniform
random scores masked by eligibility.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops

BELOW_LOW = -1
BETWEEN = -2


def usable_gt(gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray, gt_is_crowd: jnp.ndarray) -> jnp.ndarray:
    """[..., G] bool: real, non-crowd, non-degenerate GT boxes (those that take part in matching)."""
    w = gt_boxes[..., 2] - gt_boxes[..., 0]
    h = gt_boxes[..., 3] - gt_boxes[..., 1]
    return gt_valid & ~gt_is_crowd & (w > 0) & (h > 0)


def match(iou: jnp.ndarray, gt_ok: jnp.ndarray, cand_ok: jnp.ndarray, fg_thresh: float, bg_thresh: float,
          allow_low_quality: bool) -> jnp.ndarray:
    """torchvision Matcher on a padded IoU matrix.

    iou [G, N]; gt_ok [G] bool; cand_ok [N] bool. Returns matches [N] int32: the matched GT index,
    BELOW_LOW (-1) or BETWEEN (-2). Candidates with cand_ok False get BETWEEN (ignored).
    """
    iou = jnp.where(gt_ok[:, None], iou, -1.0)
    iou = jnp.where(jnp.isnan(iou), 0.0, iou)
    best = jnp.max(iou, axis=0)                                 # [N]
    best_gt = jnp.argmax(iou, axis=0).astype(jnp.int32)          # first max, like torch
    matches = jnp.where(best < bg_thresh, BELOW_LOW, jnp.where(best < fg_thresh, BETWEEN, best_gt))
    if allow_low_quality:
        gt_best = jnp.max(jnp.where(cand_ok[None, :], iou, -1.0), axis=1)          # [G]
        is_best = (iou == gt_best[:, None]) & (gt_best[:, None] > 0) & gt_ok[:, None] & cand_ok[None, :]
        matches = jnp.where(jnp.any(is_best, axis=0), best_gt, matches)
    # No usable GT at all: everything is background (torchvision's empty-target branch).
    matches = jnp.where(jnp.any(gt_ok), matches, BELOW_LOW)
    return jnp.where(cand_ok, matches, BETWEEN).astype(jnp.int32)


def sample_balanced(key: jax.Array, positive: jnp.ndarray, negative: jnp.ndarray, num: int,
                    positive_fraction: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Fixed-size balanced sampling.

    positive, negative: [N] bool (disjoint). Returns (indices [num] int32, is_positive [num] bool,
    weight [num] float32): positives first, then negatives, then padding rows (weight 0). At most
    int(num * positive_fraction) positives; negatives fill the rest as available.
    """
    n = positive.shape[0]
    num_pos_max = int(num * positive_fraction)
    kp, kn = jax.random.split(key)
    up = jax.random.uniform(kp, (n,))
    un = jax.random.uniform(kn, (n,))
    kpos = min(num_pos_max, n)
    kneg = min(num, n)
    pos_score, pos_idx = jax.lax.top_k(jnp.where(positive, up, -1.0), kpos)
    neg_score, neg_idx = jax.lax.top_k(jnp.where(negative, un, -1.0), kneg)
    pos_ok = pos_score >= 0
    num_pos = jnp.sum(pos_ok)
    neg_ok = (neg_score >= 0) & (jnp.arange(kneg) < num - num_pos)
    idx = jnp.concatenate([pos_idx, neg_idx])
    ok = jnp.concatenate([pos_ok, neg_ok])
    is_pos = jnp.concatenate([pos_ok, jnp.zeros((kneg,), bool)])
    # Compact to `num` slots, valid rows first in their original order (positives, negatives).
    slots = idx.shape[0]
    order_key = jnp.where(ok, slots - jnp.arange(slots), -jnp.arange(slots) - 1)
    _, sel = jax.lax.top_k(order_key, min(num, slots))
    idx, ok, is_pos = idx[sel], ok[sel], is_pos[sel]
    if idx.shape[0] < num:
        pad = num - idx.shape[0]
        idx = jnp.pad(idx, (0, pad))
        ok = jnp.pad(ok, (0, pad))
        is_pos = jnp.pad(is_pos, (0, pad))
    return idx.astype(jnp.int32), is_pos & ok, ok.astype(jnp.float32)


class AnchorTargets(NamedTuple):
    """Per image: `num` sampled anchors (positives first)."""
    indices: jnp.ndarray      # [S] int32 into the concatenated anchors
    labels: jnp.ndarray       # [S] float32 1 / 0
    weights: jnp.ndarray      # [S] float32, 0 for padding rows
    box_targets: jnp.ndarray  # [S, 4] encoded (weights 1,1,1,1); meaningful where labels == 1


def anchor_targets(key, anchors: jnp.ndarray, anchor_ok: jnp.ndarray, gt_boxes: jnp.ndarray,
                   gt_ok: jnp.ndarray, *, fg_thresh: float = 0.7, bg_thresh: float = 0.3,
                   num: int = 256, positive_fraction: float = 0.5) -> AnchorTargets:
    """RPN targets for one image. anchors [A, 4], anchor_ok [A] bool, gt_boxes [G, 4], gt_ok [G]."""
    iou = box_ops.pairwise_iou(gt_boxes, anchors)
    matches = match(iou, gt_ok, anchor_ok, fg_thresh, bg_thresh, allow_low_quality=True)
    idx, is_pos, w = sample_balanced(key, matches >= 0, matches == BELOW_LOW, num, positive_fraction)
    matched_gt = gt_boxes[jnp.maximum(matches[idx], 0)]
    targets = box_ops.encode_boxes(matched_gt, anchors[idx])
    targets = jnp.where(is_pos[:, None], targets, 0.0)
    return AnchorTargets(idx, is_pos.astype(jnp.float32), w, targets)


class RoiTargets(NamedTuple):
    """Per image: `num` sampled RoIs (positives first)."""
    rois: jnp.ndarray         # [S, 4] proposal (or GT) boxes
    labels: jnp.ndarray       # [S] int32 class (0 = background)
    weights: jnp.ndarray      # [S] float32, 0 for padding rows
    box_targets: jnp.ndarray  # [S, 4] encoded with the box weights; meaningful where labels > 0
    matched_gt: jnp.ndarray   # [S] int32 GT index (meaningful where labels > 0)
    indices: jnp.ndarray      # [S] int32 into the candidates [proposals (P); GT boxes (G)]


def roi_targets(key, proposals: jnp.ndarray, proposal_ok: jnp.ndarray, gt_boxes: jnp.ndarray,
                gt_classes: jnp.ndarray, gt_ok: jnp.ndarray, *, fg_thresh: float = 0.5,
                bg_thresh: float = 0.5, num: int = 512, positive_fraction: float = 0.25,
                box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> RoiTargets:
    """Box-head targets for one image: GT boxes are appended to the proposals (torchvision's
    add_gt_proposals), matched at fg_thresh / bg_thresh and sampled.

    proposals [P, 4], proposal_ok [P], gt_boxes [G, 4], gt_classes [G] int, gt_ok [G].
    """
    cands = jnp.concatenate([proposals, gt_boxes], axis=0)
    cand_ok = jnp.concatenate([proposal_ok, gt_ok], axis=0)
    iou = box_ops.pairwise_iou(gt_boxes, cands)
    matches = match(iou, gt_ok, cand_ok, fg_thresh, bg_thresh, allow_low_quality=False)
    idx, is_pos, w = sample_balanced(key, matches >= 0, matches == BELOW_LOW, num, positive_fraction)
    gt_idx = jnp.maximum(matches[idx], 0)
    rois = cands[idx]
    labels = jnp.where(is_pos, gt_classes[gt_idx], 0).astype(jnp.int32)
    targets = box_ops.encode_boxes(gt_boxes[gt_idx], rois, box_weights)
    targets = jnp.where(is_pos[:, None], targets, 0.0)
    return RoiTargets(rois, labels, w, targets, gt_idx.astype(jnp.int32), idx)


def match_boxes(boxes: jnp.ndarray, box_ok: jnp.ndarray, gt_boxes: jnp.ndarray, gt_classes: jnp.ndarray,
                gt_ok: jnp.ndarray, *, iou_thresh: float, box_weights: Sequence[float]
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Labels and regression targets of every box, without sampling or appended GT (Cascade's
    stages after the first, Detectron2's `_match_and_label_boxes`): IoU >= iou_thresh with the
    best GT is that GT's class, else background. boxes [R, 4], box_ok [R], gt_boxes [G, 4],
    gt_classes [G], gt_ok [G]. Returns labels [R] int32 (0 where not box_ok) and targets [R, 4]
    (0 for background)."""
    iou = box_ops.pairwise_iou(gt_boxes, boxes)
    matches = match(iou, gt_ok, box_ok, iou_thresh, iou_thresh, allow_low_quality=False)
    pos = (matches >= 0) & box_ok
    gt_idx = jnp.maximum(matches, 0)
    labels = jnp.where(pos, gt_classes[gt_idx], 0).astype(jnp.int32)
    targets = box_ops.encode_boxes(gt_boxes[gt_idx], boxes, box_weights)
    return labels, jax.lax.stop_gradient(jnp.where(pos[:, None], targets, 0.0))


def mask_targets(rois: jnp.ndarray, gt_boxes: jnp.ndarray, gt_masks: jnp.ndarray,
                 resolution: int = 28, soft: bool = True) -> jnp.ndarray:
    """Mask targets from box-cropped GT masks.

    rois [R, 4] xyxy; gt_boxes [R, 4] the matched GT box of each RoI; gt_masks [R, M, M]
    (uint8/float, the GT mask sampled at M x M cell centres of its box). The target at the
    centre of cell (i, j) of the RoI's resolution x resolution grid is the bilinear value of the
    crop at that point mapped into the GT box frame (0 outside the box). Returns [R, res, res]
    float32, thresholded at 0.5 unless soft. No gradient flows.
    """
    m = gt_masks.shape[-1]
    crops = gt_masks.astype(jnp.float32)

    def axis_weights(r0, r1, g0, g1):
        # Grid centres of the RoI in image coords -> continuous crop coords (cell centre k at k).
        t = (jnp.arange(resolution, dtype=jnp.float32) + 0.5) / resolution
        pos = r0[:, None] + t[None, :] * (r1 - r0)[:, None]                       # [R, res]
        u = (pos - g0[:, None]) / jnp.maximum(g1 - g0, 1e-6)[:, None] * m - 0.5   # [R, res]
        k = jnp.arange(m, dtype=jnp.float32)
        # Points beyond the half-cell border of the box read zero (outside the instance); between
        # the first/last cell centre and the border, the edge value is held.
        inside = (u >= -0.5) & (u <= m - 0.5)
        uc = jnp.clip(u, 0.0, m - 1.0)
        w_edge = jnp.maximum(0.0, 1.0 - jnp.abs(uc[:, :, None] - k[None, None, :]))
        return jnp.where(inside[:, :, None], w_edge, 0.0)

    wy = axis_weights(rois[:, 1], rois[:, 3], gt_boxes[:, 1], gt_boxes[:, 3])
    wx = axis_weights(rois[:, 0], rois[:, 2], gt_boxes[:, 0], gt_boxes[:, 2])
    out = jnp.einsum('rim,rmn,rjn->rij', wy, crops, wx)
    if not soft:
        out = (out >= 0.5).astype(jnp.float32)
    return jax.lax.stop_gradient(out)


def keypoint_targets(rois: jnp.ndarray, keypoints: jnp.ndarray, heatmap_size: int = 56
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Heatmap targets: torchvision's `keypoints_to_heatmap`, which is Detectron2's
    `Keypoints.to_heatmap` (the same function).

    rois [R, 4] xyxy; keypoints [R, K, 3] (x, y, v) of each RoI's matched GT, same frame.
    Returns (index [R, K] int32 of the target cell y * size + x, valid [R, K] bool). A keypoint
    is valid where it is labelled (v > 0) and falls in the RoI: its cell is floor((x - x1) *
    size / (x2 - x1)) (y likewise), x == x2 counts as the last cell, anything outside
    [0, size) is invalid. float32 arithmetic as the references'. No gradient flows.
    """
    x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(4))
    x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
    # a degenerate RoI divides by zero as the references do; its cells are then invalid
    fx = jnp.floor((x - x1) * (heatmap_size / (x2 - x1)))
    fy = jnp.floor((y - y1) * (heatmap_size / (y2 - y1)))
    fx = jnp.where(x == x2, heatmap_size - 1, fx)
    fy = jnp.where(y == y2, heatmap_size - 1, fy)
    ok = (fx >= 0) & (fy >= 0) & (fx < heatmap_size) & (fy < heatmap_size) & (v > 0)
    index = jnp.where(ok, fy * heatmap_size + fx, 0).astype(jnp.int32)
    return jax.lax.stop_gradient(index), jax.lax.stop_gradient(ok)
