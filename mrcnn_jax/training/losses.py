"""Mask R-CNN losses and the loss function.

```python
loss_fn = make_loss_fn(model, LossSettings.from_config(cfg.model))
total, aux = loss_fn(variables, batch, key)      # pure; jit / grad / shard as you like
```
The loss function calls the model's stages (`features`, `proposals`, `box_predictions`,
`mask_predictions`), then the targets (training/targets.py) and the loss terms below, with the
thresholds, sample sizes and loss forms it is given (`LossSettings`). Normalization as torchvision
(sums over the whole global batch, so data-parallel sharding does not change the numbers):
  * RPN objectness: BCE averaged over all sampled anchors; RPN box: smooth L1 (beta 1/9) summed
    over positive anchors / number of sampled anchors (Detectron2: both divided by
    batch_size_per_image x images, `normalizer='nominal'`);
  * box head: cross entropy averaged over sampled RoIs; box: smooth L1 (beta 1/9) of the GT
    class's deltas summed over positives / number of sampled RoIs;
  * mask: per-pixel BCE of the GT class's logits averaged over positive RoIs x 28 x 28;
  * keypoints: cross entropy over the 56 x 56 heatmap cells of each keypoint that is labelled
    and inside its positive RoI, averaged over those keypoints of the batch (torchvision's
    `keypointrcnn_loss`; Detectron2's `keypoint_rcnn_loss` with its default normalizer, the
    visible keypoints, is the same number).
Detectron2's forms (L1, i.e. smooth L1 with beta 0, hard mask targets) come from its conventions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mrcnn_jax.models.conventions import Conventions
from mrcnn_jax.models.roi_heads import CascadeRoIHeads
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.training import targets as tgt


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Matching thresholds and balanced sampling of one stage (RPN anchors or RoIs)."""
    fg_iou_thresh: float
    bg_iou_thresh: float
    batch_size_per_image: int
    positive_fraction: float


@dataclasses.dataclass(frozen=True)
class RegressionLoss:
    """Box regression loss: 'smooth_l1' with `beta` (0 is L1) or 'l1'."""
    kind: str
    beta: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSettings:
    """Everything the loss function needs besides the model: targets and loss forms (no
    defaults: `from_config` takes them from the config and its conventions). The box-delta
    weights are the model's (`roi_heads.box_weights`), which decodes what these targets encode."""
    rpn: Sampling
    roi: Sampling
    rpn_box_loss: RegressionLoss
    box_loss: RegressionLoss
    rpn_normalizer: str                    # 'sampled' (torchvision) or 'nominal' (Detectron2)
    max_mask_rois: int                     # positives per image carried to the mask loss
    mask_resolution: int
    soft_mask_targets: bool                # torchvision: RoIAlign of the 0/1 mask; Detectron2: >= 0.5

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> 'LossSettings':
        """From a `config.model` section and its conventions."""
        conv = Conventions.from_config(cfg.conventions)
        rp, r = cfg.rpn, cfg.roi
        return cls(
            rpn=Sampling(rp.fg_iou_thresh, rp.bg_iou_thresh, rp.batch_size_per_image, rp.positive_fraction),
            roi=Sampling(r.fg_iou_thresh, r.bg_iou_thresh, r.batch_size_per_image, r.positive_fraction),
            rpn_box_loss=RegressionLoss(conv.rpn_loss_type, conv.rpn_smooth_l1_beta),
            box_loss=RegressionLoss(conv.box_loss_type, conv.box_smooth_l1_beta),
            rpn_normalizer=conv.rpn_loss_normalizer,
            max_mask_rois=r.max_mask_rois, mask_resolution=r.mask_resolution,
            soft_mask_targets=conv.mask_targets == 'soft')


def smooth_l1(x: jnp.ndarray, beta: float) -> jnp.ndarray:
    """torch.nn.functional.smooth_l1_loss elementwise; beta 0 is L1."""
    ax = jnp.abs(x)
    if beta <= 0:
        return ax
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _reg_loss(x, loss_type: str, beta: float):
    if loss_type not in ('smooth_l1', 'l1'):   # a typo must not silently train with L1
        raise ValueError(f"unknown regression loss_type {loss_type!r}: 'smooth_l1' or 'l1'")
    return smooth_l1(x, beta if loss_type == 'smooth_l1' else 0.0)


def rpn_losses(objectness: jnp.ndarray, deltas: jnp.ndarray, t: tgt.AnchorTargets, *,
               loss_type: str = 'smooth_l1', beta: float = 1 / 9,
               normalizer: str = 'sampled') -> tuple[jnp.ndarray, jnp.ndarray]:
    """objectness [B, A] logits, deltas [B, A, 4]; t batched [B, S]. Returns (objectness, box) losses.

    normalizer: 'sampled' divides both sums by the anchors sampled (torchvision), 'nominal' by
    S x B, the sample size asked for (Detectron2's batch_size_per_image x images)."""
    logit = jnp.take_along_axis(objectness, t.indices, axis=1)
    pred = jnp.take_along_axis(deltas, t.indices[..., None], axis=1)
    if normalizer == 'sampled':
        n = jnp.maximum(jnp.sum(t.weights), 1.0)
    elif normalizer == 'nominal':
        n = float(t.weights.size)
    else:
        raise ValueError(f"unknown RPN loss normalizer {normalizer!r}: 'sampled' or 'nominal'")
    bce = optax.sigmoid_binary_cross_entropy(logit, t.labels)
    obj = jnp.sum(bce * t.weights) / n
    reg = _reg_loss(pred - t.box_targets, loss_type, beta).sum(-1)
    box = jnp.sum(reg * t.labels * t.weights) / n
    return obj, box


def box_head_losses(class_logits: jnp.ndarray, box_deltas: jnp.ndarray, t: tgt.RoiTargets, *,
                    loss_type: str = 'smooth_l1', beta: float = 1 / 9) -> tuple[jnp.ndarray, jnp.ndarray]:
    """class_logits [B, S, K], box_deltas [B, S, K or 1 (class-agnostic), 4]; t batched [B, S]
    (only labels, weights and box_targets are read). Returns (cls, box) losses."""
    n = jnp.maximum(jnp.sum(t.weights), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, t.labels)
    cls = jnp.sum(ce * t.weights) / n
    if box_deltas.shape[2] == 1:
        pred = box_deltas[:, :, 0]
    else:
        pred = jnp.take_along_axis(box_deltas, t.labels[..., None, None], axis=2)[:, :, 0]   # [B, S, 4]
    pos = (t.labels > 0).astype(jnp.float32) * t.weights
    reg = _reg_loss(pred - t.box_targets, loss_type, beta).sum(-1)
    return cls, jnp.sum(reg * pos) / n


def mask_head_loss(mask_logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """mask_logits, targets [B, R, M, M]; weights [B, R] (1 for positive RoIs). Mean BCE; 0 if none."""
    bce = optax.sigmoid_binary_cross_entropy(mask_logits, targets).mean(axis=(-1, -2))
    return jnp.sum(bce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def keypoint_head_loss(heatmaps: jnp.ndarray, index: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """heatmaps [B, R, K, H, W] logits; index [B, R, K] target cell; valid [B, R, K] (labelled,
    in the box, positive RoI). Mean cross entropy over the valid keypoints; 0 if none."""
    logits = heatmaps.reshape(heatmaps.shape[:3] + (-1,))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, index)
    w = valid.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def _forward_train(m, batch: dict, key: jax.Array, settings: LossSettings, *, with_targets: bool = False):
    """Runs inside model.apply (m is the bound MaskRCNN). Returns (losses dict, aux dict).

    with_targets: aux also holds 'targets' (for tests and debugging): 'anchors' AnchorTargets and
    'rois' RoiTargets (batched [B, S]), 'proposals' [B, P, 4], 'proposal_scores' / 'proposal_ok'
    [B, P], and with a mask head 'mask_targets' [B, R, 28, 28] / 'mask_weights' [B, R] of the
    first R = min(max_mask_rois, S) sampled RoIs (positives first), with a keypoint head
    'keypoint_index' / 'keypoint_valid' [B, R, K] of the same RoIs.
    """
    images, info = batch['images'], batch['image_info']
    b = images.shape[0]
    rs, ss = settings.rpn, settings.roi
    gt_boxes = batch['gt_boxes'].astype(jnp.float32)
    gt_ok = tgt.usable_gt(gt_boxes, batch['gt_valid'], batch['gt_is_crowd'])
    k_anchor, k_roi = jax.random.split(key)
    keys_anchor = jax.random.split(k_anchor, b)      # one key per image, never shared
    keys_roi = jax.random.split(k_roi, b)

    feats = m.features(images, info)
    proposals, proposal_scores, proposal_ok, (logits, deltas, anchors, anchor_ok) = m.proposals(
        feats, info, train=True)

    all_logits = jnp.concatenate(logits, axis=1)
    all_deltas = jnp.concatenate(deltas, axis=1)
    all_anchors = jnp.broadcast_to(jnp.concatenate(anchors, axis=1), (b,) + all_deltas.shape[1:])
    all_ok = jnp.broadcast_to(jnp.concatenate(anchor_ok, axis=1), all_logits.shape)
    at = jax.vmap(lambda k, a, ok, g, gok: tgt.anchor_targets(
        k, a, ok, g, gok, fg_thresh=rs.fg_iou_thresh, bg_thresh=rs.bg_iou_thresh,
        num=rs.batch_size_per_image, positive_fraction=rs.positive_fraction))(
            keys_anchor, all_anchors, all_ok, gt_boxes, gt_ok)
    loss_obj, loss_rpn_box = rpn_losses(all_logits, all_deltas, at, loss_type=settings.rpn_box_loss.kind,
                                        beta=settings.rpn_box_loss.beta, normalizer=settings.rpn_normalizer)

    rt = jax.vmap(lambda k, p, pok, g, c, gok: tgt.roi_targets(
        k, p, pok, g, c, gok, fg_thresh=ss.fg_iou_thresh, bg_thresh=ss.bg_iou_thresh,
        num=ss.batch_size_per_image, positive_fraction=ss.positive_fraction,
        box_weights=m.roi_heads.box_weights))(
            keys_roi, proposals, proposal_ok, gt_boxes, batch['gt_classes'].astype(jnp.int32), gt_ok)
    mt = mweights = mask_logits = None
    # Positives occupy the first slots of the sample; the mask and keypoint heads see up to
    # max_mask_rois of them.
    k = min(settings.max_mask_rois, rt.rois.shape[1])
    mlabels = rt.labels[:, :k]
    mweights = ((mlabels > 0) * rt.weights[:, :k]).astype(jnp.float32)
    mgt = rt.matched_gt[:, :k]
    if m.mask_head is not None:
        gt_b = jnp.take_along_axis(gt_boxes, mgt[..., None], axis=1)
        gt_m = jnp.take_along_axis(batch['gt_masks'], mgt[:, :, None, None], axis=1)
        mt = jax.vmap(lambda ro, gb, gm: tgt.mask_targets(
            ro, gb, gm, settings.mask_resolution, soft=settings.soft_mask_targets))(rt.rois[:, :k], gt_b, gt_m)
    losses = {'loss_objectness': loss_obj, 'loss_rpn_box_reg': loss_rpn_box}
    aux = {'num_pos_anchors': jnp.sum(at.labels * at.weights) / b,
           'num_pos_rois': jnp.sum((rt.labels > 0) * rt.weights) / b,
           'num_proposals': jnp.sum(proposal_ok) / b}
    if isinstance(m.roi_heads, CascadeRoIHeads):
        losses.update(_cascade_box_losses(m, feats, rt, gt_boxes, batch['gt_classes'].astype(jnp.int32), gt_ok,
                                          info, settings, aux))
        if m.mask_head is not None:   # on stage 0's sampled positives (Detectron2's choice)
            mask_logits = m.mask_predictions(feats, rt.rois[:, :k], mlabels, info, active=mweights > 0,
                                             train=True)
    else:
        class_logits, box_deltas, mask_logits = m.roi_heads.train_predictions(
            feats, rt.rois, None if mt is None else mlabels, None if mt is None else mweights > 0,
            m.padding(info))
        losses['loss_classifier'], losses['loss_box_reg'] = box_head_losses(
            class_logits, box_deltas, rt, loss_type=settings.box_loss.kind, beta=settings.box_loss.beta)
    if m.mask_head is not None:
        losses['loss_mask'] = mask_head_loss(mask_logits, mt, mweights)
    if m.keypoint_head is not None:
        if 'gt_keypoints' not in batch:
            raise ValueError("model.keypoint_on needs batches with 'gt_keypoints' (data.keypoints = True)")
        gt_k = jnp.take_along_axis(batch['gt_keypoints'].astype(jnp.float32), mgt[:, :, None, None], axis=1)
        heatmaps = m.roi_heads.keypoint_predictions(feats, rt.rois[:, :k], m.padding(info), active=mweights > 0,
                                                    train=True)
        kidx, kvalid = jax.vmap(lambda ro, g: tgt.keypoint_targets(ro, g, heatmaps.shape[-1]))(rt.rois[:, :k], gt_k)
        kvalid = kvalid & (mweights[..., None] > 0)
        losses['loss_keypoint'] = keypoint_head_loss(heatmaps, kidx, kvalid)
    if with_targets:
        aux['targets'] = {'anchors': at, 'rois': rt, 'proposals': proposals,
                          'proposal_scores': proposal_scores, 'proposal_ok': proposal_ok}
        if m.mask_head is not None:
            aux['targets'].update(mask_targets=mt, mask_weights=mweights)
        if m.keypoint_head is not None:
            aux['targets'].update(keypoint_index=kidx, keypoint_valid=kvalid)
    return losses, aux


def _cascade_box_losses(m, feats, rt: tgt.RoiTargets, gt_boxes, gt_classes, gt_ok, info,
                        settings: LossSettings, aux: dict) -> dict:
    """Cascade's box losses, `loss_classifier_stage{k}` / `loss_box_reg_stage{k}` (Detectron2's
    `CascadeROIHeads._forward_box` in training). Stage 0 sees the sampled RoIs `rt`; stage k > 0
    the boxes stage k - 1 regressed from them, without gradient, clipped, empty ones (a side <= 0)
    dropped, re-matched at IoU >= stage_ious[k] with no GT appended and no re-sampling. Each
    stage's losses are normalized by its own count of boxes, as Detectron2's. aux gets
    `num_pos_rois_stage{k}`."""
    heads = m.roi_heads
    image_hw = m.image_hw(info)
    rois, boxes, t, out = rt.rois, rt.rois, rt, {}
    for k in range(heads.num_stages):
        if k > 0:
            rois = box_ops.clip_boxes(jax.lax.stop_gradient(boxes), image_hw[:, None, :])
            ok = (t.weights > 0) & box_ops.nonsmall_boxes(rois, 0.0, strict=True)
            labels, targets = jax.vmap(lambda bx, o, g, c, gok, w=heads.stage_box_weights[k]: tgt.match_boxes(
                bx, o, g, c, gok, iou_thresh=heads.stage_ious[k], box_weights=w))(rois, ok, gt_boxes, gt_classes, gt_ok)
            t = t._replace(rois=rois, labels=labels, box_targets=targets, weights=ok.astype(jnp.float32))
        logits, deltas = heads.stage_predictions(k, feats, rois, m.padding(info), train=True)
        out[f'loss_classifier_stage{k}'], out[f'loss_box_reg_stage{k}'] = box_head_losses(
            logits, deltas, t, loss_type=settings.box_loss.kind, beta=settings.box_loss.beta)
        aux[f'num_pos_rois_stage{k}'] = jnp.sum((t.labels > 0) * t.weights) / rois.shape[0]
        boxes = heads.decode(k, deltas, rois)
    return out


def make_loss_fn(model, settings: LossSettings, *, with_targets: bool = False) -> Callable[..., Any]:
    """(variables, batch, key) -> (total loss, {'losses': per-term dict, **aux}), pure.

    settings: thresholds, sample sizes and loss forms (`LossSettings.from_config(cfg.model)`).
    with_targets: aux also carries the sampled targets (see `_forward_train`); for tests.
    """
    if not isinstance(settings, LossSettings):
        raise TypeError(f'make_loss_fn takes LossSettings (LossSettings.from_config(cfg.model)), '
                        f'got {type(settings).__name__}')

    def loss_fn(variables, batch, key):
        losses, aux = model.apply(variables, batch, key, settings, with_targets=with_targets,
                                  method=_forward_train)
        total = sum(losses.values())
        return total, {'losses': losses, **aux}
    return loss_fn
