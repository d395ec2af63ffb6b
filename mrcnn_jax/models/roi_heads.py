"""RoI heads: what runs on the proposals. `StandardRoIHeads` composes a box head, a box predictor
and an optional mask head (pluggable modules, `models/heads/`) with their poolers and test-time
settings; `postprocess_detections` is a pure function of the box branch's outputs.

Kinds of RoI heads are registered in `ROI_HEADS` under `model.roi.heads` (Detectron2 has
StandardROIHeads, Res5ROIHeads for C4 and CascadeROIHeads): a new kind is a new module with the
same methods (`box_predictions`, `mask_predictions`, `detect`) and one line in the table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mrcnn_jax.models.conventions import Conventions
from mrcnn_jax.models.heads import build_head
from mrcnn_jax.models.layers import PaddingMask
from mrcnn_jax.models.poolers import RoIPooler
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.nms import nms


@dataclasses.dataclass(frozen=True)
class DetectionSettings:
    """Test-time postprocessing of the box branch (`postprocess_detections`)."""
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    pre_nms_candidates: int = 4096         # (proposal, class) pairs entering per-class NMS
    min_size: float = 1e-2


class StandardRoIHeads(nn.Module):
    """Box branch (+ mask branch) on pooled RoI features (torchvision's RoIHeads, Detectron2's
    StandardROIHeads).

    box_head: pooled [B, R, S, S, C] -> features [B, R, D];  box_predictor: features ->
    (class_logits [B, R, K], box_deltas [B, R, K, 4]);  mask_head: (pooled [B, R, S', S', C],
    classes [B, R]) -> mask logits [B, R, M, M] (None: Faster R-CNN).
    """
    box_head: nn.Module
    box_predictor: nn.Module
    mask_head: Optional[nn.Module]
    box_pooler: RoIPooler
    mask_pooler: RoIPooler
    # How box deltas are parametrized: decoded here, encoded by the training targets (losses.py
    # reads this field, so the two always agree).
    box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    detection: DetectionSettings = DetectionSettings()
    # The mask head takes its RoIs this many at a time and skips chunks without an active RoI
    # (see `mask_predictions`); 0: one block, always run.
    mask_roi_chunk: int = 32

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, conventions: Conventions, dtype: Any
                    ) -> 'StandardRoIHeads':
        r = cfg.roi

        def pooler(size):
            return RoIPooler(output_size=size, sampling_ratio=conventions.sampling_ratio,
                             aligned=conventions.roi_align_aligned, canonical_scale=r.canonical_scale,
                             canonical_level=r.canonical_level, level_eps=conventions.level_eps,
                             level_eps_in_log=conventions.level_eps_in_log,
                             max_sampling_ratio=r.max_sampling_ratio, method=r.roi_align_method)
        return cls(
            box_head=build_head('box_head', cfg, dtype),
            box_predictor=build_head('box_predictor', cfg, dtype),
            mask_head=build_head('mask_head', cfg, dtype) if cfg.mask_on else None,
            box_pooler=pooler(r.box_pool_size), mask_pooler=pooler(r.mask_pool_size),
            box_weights=tuple(r.box_weights),
            detection=DetectionSettings(score_thresh=r.score_thresh, nms_thresh=r.nms_thresh,
                                        detections_per_img=r.detections_per_img,
                                        pre_nms_candidates=r.pre_nms_candidates, min_size=r.min_size),
            mask_roi_chunk=r.mask_roi_chunk)

    def box_predictions(self, feats: Sequence[jnp.ndarray], rois: jnp.ndarray, padding: PaddingMask):
        """rois [B, R, 4] -> class_logits [B, R, K], box_deltas [B, R, K, 4] (float32)."""
        pooled = self.box_pooler(feats, rois, self.box_pooler.valid_hw(padding))
        return self.box_predictor(self.box_head(pooled))

    def mask_predictions(self, feats, rois: jnp.ndarray, classes: jnp.ndarray, padding: PaddingMask,
                         active: Optional[jnp.ndarray] = None, train: bool = False):
        """rois [B, R, 4], classes [B, R] -> mask logits [B, R, M, M] of each RoI's class.

        active [B, R] bool (optional): the RoIs whose logits are needed, packed first along R
        (sampled positives, valid detections). With `mask_roi_chunk` = C > 0 the RoIs are taken C
        at a time and a chunk without an active RoI in any image of the batch is skipped at run
        time (`nn.cond`; its logits are 0). Shapes stay static; the mask head's work follows the
        actual number of positives, as torchvision's does, instead of always `max_mask_rois`. The
        first chunk always runs (it also creates the variables at init).

        train: RoIAlign runs once on all R RoIs, outside the conditionals, and only the mask head's
        convolutions are skipped. Inside a conditional, RoIAlign's backward would give each chunk
        its own gradient of the whole FPN (zeros when skipped), written and summed per chunk:
        measured ~0.6 s of a 17 s R50-FPN step on 2 CPU cores (docs/performance.md, change 14).
        At inference (no backward) pooling inside the conditional skips it too.
        """
        valid_hw = self.mask_pooler.valid_hw(padding)

        def pool_and_head(mdl, f, ro, cl):
            return mdl.mask_head(mdl.mask_pooler(f, ro, valid_hw), cl)

        c, r = self.mask_roi_chunk, rois.shape[1]
        if active is None or c <= 0 or c >= r:
            return pool_and_head(self, feats, rois, classes)
        if train:
            pooled = self.mask_pooler(feats, rois, valid_hw)

            def run(mdl, x, cl):
                return mdl.mask_head(x, cl)

            def operands(sl):
                return (pooled[:, sl], classes[:, sl])
        else:
            run = pool_and_head

            def operands(sl):
                return (feats, rois[:, sl], classes[:, sl])
        out = [run(self, *operands(slice(0, c)))]
        for s in range(c, r, c):
            sl = slice(s, s + c)
            zeros = jnp.zeros(out[0].shape[:1] + (min(c, r - s),) + out[0].shape[2:], out[0].dtype)
            out.append(nn.cond(jnp.any(active[:, sl]), run, lambda mdl, *a, z=zeros: z, self, *operands(sl)))
        return jnp.concatenate(out, axis=1)

    def detect(self, feats, proposals: jnp.ndarray, proposal_valid: jnp.ndarray, image_hw: jnp.ndarray,
               padding: PaddingMask) -> dict[str, jnp.ndarray]:
        """Padded detections from proposals [B, P, 4] (see `MaskRCNN.__call__` for the keys)."""
        logits, deltas = self.box_predictions(feats, proposals, padding)
        d = self.detection
        det = postprocess_detections(
            logits, deltas, proposals, proposal_valid, image_hw, box_weights=self.box_weights,
            score_thresh=d.score_thresh, nms_thresh=d.nms_thresh, detections_per_img=d.detections_per_img,
            pre_nms_candidates=d.pre_nms_candidates, min_size=d.min_size)
        if self.mask_head is not None:
            mask_logits = self.mask_predictions(feats, det['boxes'], det['labels'], padding, active=det['valid'])
            # padding rows are zero, like their boxes, scores and labels
            det['masks'] = jnp.where(det['valid'][..., None, None], jax.nn.sigmoid(mask_logits), 0.0)
        return det

    def __call__(self, feats, proposals, proposal_valid, image_hw, padding):
        return self.detect(feats, proposals, proposal_valid, image_hw, padding)


ROI_HEADS = {'standard': StandardRoIHeads}


def build_roi_heads(cfg: ml_collections.ConfigDict, conventions: Conventions, dtype: Any) -> nn.Module:
    """The RoI heads that `cfg.roi.heads` names, built from the model config."""
    name = cfg.roi.heads
    if name not in ROI_HEADS:
        raise ValueError(f'unknown model.roi.heads {name!r} (known: {", ".join(sorted(ROI_HEADS))})')
    return ROI_HEADS[name].from_config(cfg, conventions, dtype)


def postprocess_detections(
    class_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    image_hw: jnp.ndarray,
    *,
    box_weights: Sequence[float],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    pre_nms_candidates: int,
    min_size: float = 1e-2,
) -> dict[str, jnp.ndarray]:
    """torchvision's `RoIHeads.postprocess_detections` with static shapes.

    Softmax, per-class decode (weights 10, 10, 5, 5), clip, drop background, keep
    score > score_thresh and sides >= min_size, per-class NMS, top detections_per_img.

    Static-shape note: torchvision runs NMS on every (proposal, class) pair above the
    threshold. We first keep the `pre_nms_candidates` best pairs. Greedy NMS only ever lets a
    box be suppressed by a higher-scoring one, so the result equals torchvision's whenever its
    last kept detection ranks within those candidates (true unless > pre_nms_candidates pairs
    outscore it, i.e. thousands of heavily-suppressed boxes).

    class_logits [B, R, K]; box_deltas [B, R, K, 4]; proposals [B, R, 4]; proposal_valid [B, R];
    image_hw [B, 2]. Returns {'boxes' [B, D, 4], 'scores' [B, D], 'labels' [B, D] int32,
    'valid' [B, D] bool}, sorted by score, D = detections_per_img; invalid rows are zero.
    """
    b, r, k = class_logits.shape
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    boxes = box_ops.decode_boxes(box_deltas, proposals[:, :, None, :], box_weights)   # [B, R, K, 4]
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, None, :])
    boxes = boxes[:, :, 1:].reshape(b, r * (k - 1), 4)
    scores = scores[:, :, 1:].reshape(b, r * (k - 1))
    labels = jnp.broadcast_to(jnp.arange(1, k, dtype=jnp.int32), (b, r, k - 1)).reshape(b, r * (k - 1))
    valid = jnp.repeat(proposal_valid, k - 1, axis=1)
    valid = valid & (scores > score_thresh) & box_ops.nonsmall_boxes(boxes, min_size)

    n = min(pre_nms_candidates, r * (k - 1))
    _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), n)
    boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
    scores = jnp.take_along_axis(scores, idx, axis=1)
    labels = jnp.take_along_axis(labels, idx, axis=1)
    valid = jnp.take_along_axis(valid, idx, axis=1)

    keep, keep_valid = jax.vmap(
        lambda bx, s, v, l: nms(bx, s, v, nms_thresh, detections_per_img, idxs=l))(boxes, scores, valid, labels)
    out_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1)
    out = {
        'boxes': jnp.where(keep_valid[..., None], out_boxes, 0.0),
        'scores': jnp.where(keep_valid, jnp.take_along_axis(scores, keep, axis=1), 0.0),
        'labels': jnp.where(keep_valid, jnp.take_along_axis(labels, keep, axis=1), 0),
        'valid': keep_valid,
    }
    return out
