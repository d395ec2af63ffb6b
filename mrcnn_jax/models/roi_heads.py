"""RoI heads: what runs on the proposals. `StandardRoIHeads` composes a box head, a box predictor,
an optional mask head and an optional keypoint head (Keypoint R-CNN; pluggable modules,
`models/heads/`) with their poolers and test-time settings; `postprocess_detections` is a pure
function of the box branch's outputs, `heads.keypoint.heatmaps_to_keypoints` of the keypoint
branch's.

Kinds of RoI heads are registered in `ROI_HEADS` under `model.roi.heads`: 'standard'
(`StandardRoIHeads`, FPN), 'res5' (`Res5RoIHeads`, the paper's C4 head) and 'cascade'
(`CascadeRoIHeads`), Detectron2's StandardROIHeads, Res5ROIHeads and CascadeROIHeads. A new kind
is a new module with the same methods (`box_predictions`, `mask_predictions`,
`train_predictions`, `detect`) and one line in the table; training calls `train_predictions`
(Cascade, whose stages re-match between them, has its own loss in `training/losses.py`).
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
    # Keypoint R-CNN's branch (None: no keypoints): pooled [B, R, S, S, C] -> heatmap logits
    # [B, R, K, 4S, 4S]; its own pooler; candidate cells of `heatmaps_to_keypoints`; the score
    # rule (conventions.keypoint_score).
    keypoint_head: Optional[nn.Module] = None
    keypoint_pooler: Optional[RoIPooler] = None
    keypoint_candidate_cells: int = 16
    keypoint_score: str = 'logit'

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
            mask_roi_chunk=r.mask_roi_chunk, **cls.keypoint_fields(cfg, conventions, dtype, pooler))

    @staticmethod
    def keypoint_fields(cfg, conventions: Conventions, dtype: Any, pooler) -> dict:
        """The keypoint branch's fields ({} without `model.keypoint_on`)."""
        if not cfg.keypoint_on:
            return {}
        return dict(keypoint_head=build_head('keypoint_head', cfg, dtype),
                    keypoint_pooler=pooler(cfg.roi.keypoint_pool_size),
                    keypoint_candidate_cells=cfg.roi.keypoint_candidate_cells,
                    keypoint_score=conventions.keypoint_score)

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
            return mdl.mask_head(mdl.mask_features(f, ro, valid_hw), cl)

        if not train:
            return self._chunked(pool_and_head, lambda sl: (feats, rois[:, sl], classes[:, sl]), active)
        pooled = self.mask_features(feats, rois, valid_hw)
        return self._chunked(lambda mdl, x, cl: mdl.mask_head(x, cl),
                             lambda sl: (pooled[:, sl], classes[:, sl]), active)

    def mask_features(self, feats, rois: jnp.ndarray, valid_hw) -> jnp.ndarray:
        """What the mask head consumes for rois [B, R, 4]: RoIAlign'd features [B, R, S, S, C]."""
        return self.mask_pooler(feats, rois, valid_hw)

    def _chunked(self, run, operands, active: Optional[jnp.ndarray]):
        """run(self, *operands(slice)) over RoI slices of `mask_roi_chunk`, skipping slices
        without an active RoI (see `mask_predictions`); one block without `active`."""
        full = operands(slice(None))
        c, r = self.mask_roi_chunk, full[-1].shape[1]
        if active is None or c <= 0 or c >= r:
            return run(self, *full)
        out = [run(self, *operands(slice(0, c)))]
        for s in range(c, r, c):
            sl = slice(s, s + c)
            zeros = jnp.zeros(out[0].shape[:1] + (min(c, r - s),) + out[0].shape[2:], out[0].dtype)
            out.append(nn.cond(jnp.any(active[:, sl]), run, lambda mdl, *a, z=zeros: z, self, *operands(sl)))
        return jnp.concatenate(out, axis=1)

    def keypoint_predictions(self, feats, rois: jnp.ndarray, padding: PaddingMask, active=None, train: bool = False):
        """rois [B, R, 4] -> heatmap logits [B, R, K, 56, 56] (chunks without an active RoI are
        skipped as in `mask_predictions`; in training RoIAlign runs outside the conditionals)."""
        valid_hw = self.keypoint_pooler.valid_hw(padding)
        if not train:
            return self._chunked(lambda mdl, f, ro: mdl.keypoint_head(mdl.keypoint_pooler(f, ro, valid_hw)),
                                 lambda sl: (feats, rois[:, sl]), active)
        pooled = self.keypoint_pooler(feats, rois, valid_hw)
        return self._chunked(lambda mdl, x: mdl.keypoint_head(x), lambda sl: (pooled[:, sl],), active)

    def keypoints(self, feats, boxes: jnp.ndarray, valid: jnp.ndarray, padding: PaddingMask) -> dict:
        """Keypoints of detections boxes [B, D, 4] (canvas pixels): {'keypoints' [B, D, K, 3]
        (x, y, 1) canvas pixels, 'keypoints_scores' [B, D, K]}; rows not `valid` are zero."""
        from mrcnn_jax.models.heads.keypoint import heatmaps_to_keypoints
        maps = self.keypoint_predictions(feats, boxes, padding, active=valid)
        b, d, k = maps.shape[:3]
        # the canvas, from the finest pooled level: boxes are clipped to it
        scale = self.keypoint_pooler.scales[0]
        canvas = (int(round(feats[0].shape[1] / scale)), int(round(feats[0].shape[2] / scale)))
        xy, logit, pool_softmax = heatmaps_to_keypoints(
            maps.reshape((b * d,) + maps.shape[2:]), boxes.reshape(b * d, 4), canvas,
            self.keypoint_candidate_cells)
        score = logit if self.keypoint_score == 'logit' else pool_softmax
        kps = jnp.concatenate([xy, jnp.ones_like(xy[..., :1])], axis=-1).reshape(b, d, k, 3)
        return {'keypoints': jnp.where(valid[..., None, None], kps, 0.0),
                'keypoints_scores': jnp.where(valid[..., None], score.reshape(b, d, k), 0.0)}

    def train_predictions(self, feats, rois: jnp.ndarray, mask_classes: Optional[jnp.ndarray],
                          mask_active: Optional[jnp.ndarray], padding: PaddingMask):
        """The training forward of sampled rois [B, S, 4] (positives first): (class_logits,
        box_deltas, mask logits of the first R = mask_classes.shape[1] RoIs or None)."""
        logits, deltas = self.box_predictions(feats, rois, padding)
        if self.mask_head is None or mask_classes is None:
            return logits, deltas, None
        k = mask_classes.shape[1]
        return logits, deltas, self.mask_predictions(feats, rois[:, :k], mask_classes, padding,
                                                     active=mask_active, train=True)

    def detect(self, feats, proposals: jnp.ndarray, proposal_valid: jnp.ndarray, image_hw: jnp.ndarray,
               padding: PaddingMask) -> dict[str, jnp.ndarray]:
        """Padded detections from proposals [B, P, 4] (see `MaskRCNN.__call__` for the keys)."""
        logits, deltas = self.box_predictions(feats, proposals, padding)
        d = self.detection
        det = postprocess_detections(
            logits, deltas, proposals, proposal_valid, image_hw, box_weights=self.box_weights,
            score_thresh=d.score_thresh, nms_thresh=d.nms_thresh, detections_per_img=d.detections_per_img,
            pre_nms_candidates=d.pre_nms_candidates, min_size=d.min_size)
        return self._with_masks(det, feats, padding)

    def _with_masks(self, det: dict, feats, padding: PaddingMask) -> dict:
        """det with 'masks' [B, D, M, M] (probabilities of each detection's class) when there is a
        mask head, and 'keypoints' / 'keypoints_scores' (`keypoints`) with a keypoint head."""
        if self.mask_head is not None:
            mask_logits = self.mask_predictions(feats, det['boxes'], det['labels'], padding, active=det['valid'])
            # padding rows are zero, like their boxes, scores and labels
            det['masks'] = jnp.where(det['valid'][..., None, None], jax.nn.sigmoid(mask_logits), 0.0)
        if self.keypoint_head is not None:
            det.update(self.keypoints(feats, det['boxes'], det['valid'], padding))
        return det

    def __call__(self, feats, proposals, proposal_valid, image_hw, padding):
        return self.detect(feats, proposals, proposal_valid, image_hw, padding)


class Res5RoIHeads(StandardRoIHeads):
    """The Mask R-CNN paper's C4 head (Detectron2's `Res5ROIHeads`): RoIs are pooled from the
    single res4 map (14 x 14), the backbone's last stage `res5` runs on every pooled RoI, and both
    branches read its output [B, R, 7, 7, 2048]: the box predictor its spatial mean, the mask
    head (a deconv and the class's 1x1 logits, no convs: 14 x 14 masks) the map itself. At
    inference the mask branch reruns res5 on the final boxes (Detectron2's
    `forward_with_given_boxes`); in training it reuses the positives' res5 features from the box
    branch (`train_predictions`), as Detectron2 does.

    `box_head` is unused (None); `box_pooler` serves both branches (`mask_pooler` is the same).
    """
    res5: Optional[nn.Module] = None

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, conventions: Conventions, dtype: Any
                    ) -> 'Res5RoIHeads':
        from mrcnn_jax.models.resnet import Res5
        if cfg.fpn.enabled or tuple(cfg.backbone.return_levels) != (4,):
            raise ValueError("model.roi.heads 'res5' (C4) needs model.fpn.enabled = False and "
                             'model.backbone.return_levels = (4,)')
        if cfg.keypoint_on:
            raise ValueError("model.keypoint_on needs model.roi.heads 'standard' or 'cascade' (Detectron2's "
                             'Res5ROIHeads has no keypoint branch either)')
        std = StandardRoIHeads.from_config(cfg, conventions, dtype)
        b = cfg.backbone
        res5 = Res5(depth=b.depth, width=b.width, groups=b.groups, width_per_group=b.width_per_group,
                    stride_in_1x1=conventions.stride_in_1x1, norm=b.norm, norm_eps=b.norm_eps, dtype=dtype)
        pooler = dataclasses.replace(std.box_pooler, scales=(1 / 16,))
        return cls(box_head=None, box_predictor=std.box_predictor, mask_head=std.mask_head,
                   box_pooler=pooler, mask_pooler=pooler, box_weights=std.box_weights,
                   detection=std.detection, mask_roi_chunk=std.mask_roi_chunk, res5=res5)

    def roi_features(self, feats, rois: jnp.ndarray, padding: PaddingMask) -> jnp.ndarray:
        """res5 of the RoIAlign'd res4 features: [B, R, S / 2, S / 2, C5]."""
        return self.res5(self.box_pooler(feats, rois, self.box_pooler.valid_hw(padding)))

    def box_predictions(self, feats, rois: jnp.ndarray, padding: PaddingMask):
        return self.box_predictor(jnp.mean(self.roi_features(feats, rois, padding), axis=(2, 3)))

    def mask_features(self, feats, rois: jnp.ndarray, valid_hw) -> jnp.ndarray:
        return self.res5(self.mask_pooler(feats, rois, valid_hw))

    def train_predictions(self, feats, rois, mask_classes, mask_active, padding):
        x = self.roi_features(feats, rois, padding)
        logits, deltas = self.box_predictor(jnp.mean(x, axis=(2, 3)))
        if self.mask_head is None or mask_classes is None:
            return logits, deltas, None
        k = mask_classes.shape[1]
        masks = self._chunked(lambda mdl, f, cl: mdl.mask_head(f, cl),
                              lambda sl: (x[:, :k][:, sl], mask_classes[:, sl]), mask_active)
        return logits, deltas, masks


def scale_gradient(x: jnp.ndarray, factor: float) -> jnp.ndarray:
    """Identity forward, gradient times `factor` backward (Detectron2's `_ScaleGradient`)."""
    return x * factor + jax.lax.stop_gradient(x * (1.0 - factor))


class CascadeRoIHeads(StandardRoIHeads):
    """Cascade R-CNN's box branch (Detectron2's `CascadeROIHeads`) + the standard mask branch.

    Stage k has its own box head and class-agnostic predictor (`box_heads[k]`,
    `box_predictors[k]`) and decodes with its own weights (`stage_box_weights[k]`); all share
    the box pooler. Inference: stage 0 runs on the proposals; stage k > 0 on stage k - 1's
    boxes, clipped to the image and not filtered (empty boxes keep their row, as Detectron2 keeps
    them so that every stage has the same rows); the class probabilities are the mean of the
    stages' softmax (background included), the boxes the last stage's regression of its own input
    boxes, one box for every class (`select_detections`). The mask head runs on the final
    detections. Training (`training/losses.py`): stage 0 on the sampled RoIs, stage k > 0
    re-matched at `stage_ious[k]` without re-sampling; each stage's pooled features pass
    `scale_gradient(1 / stages)`.

    `box_head` / `box_predictor` are unused (None); `box_weights` is stage 0's.
    """
    box_heads: tuple = ()
    box_predictors: tuple = ()
    stage_box_weights: tuple = ()
    stage_ious: tuple = ()

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, conventions: Conventions, dtype: Any
                    ) -> 'CascadeRoIHeads':
        from mrcnn_jax.models.heads.box import FastRCNNPredictor
        r = cfg.roi
        ious, weights = tuple(r.cascade_ious), tuple(tuple(w) for w in r.cascade_box_weights)
        if len(ious) != len(weights) or any(len(w) != 4 for w in weights):
            raise ValueError(f'model.roi.cascade_box_weights needs one (4 weights) per stage of '
                             f'model.roi.cascade_ious: {len(weights)} for {len(ious)} stages')
        if ious[0] != r.fg_iou_thresh:
            raise ValueError(f'cascade stage 0 matches at model.roi.fg_iou_thresh ({r.fg_iou_thresh}), '
                             f'not cascade_ious[0] = {ious[0]}')
        std = StandardRoIHeads.from_config(cfg, conventions, dtype)
        return cls(box_head=None, box_predictor=None, mask_head=std.mask_head, box_pooler=std.box_pooler,
                   mask_pooler=std.mask_pooler, box_weights=weights[0], detection=std.detection,
                   mask_roi_chunk=std.mask_roi_chunk, keypoint_head=std.keypoint_head,
                   keypoint_pooler=std.keypoint_pooler, keypoint_candidate_cells=std.keypoint_candidate_cells,
                   keypoint_score=std.keypoint_score,
                   box_heads=tuple(build_head('box_head', cfg, dtype) for _ in ious),
                   box_predictors=tuple(FastRCNNPredictor(cfg.num_classes, class_agnostic=True, dtype=dtype)
                                        for _ in ious),
                   stage_box_weights=weights, stage_ious=ious)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ious)

    def stage_predictions(self, k: int, feats, rois: jnp.ndarray, padding: PaddingMask, train: bool = False):
        """Stage k on rois [B, R, 4]: class_logits [B, R, K], agnostic box_deltas [B, R, 1, 4]."""
        pooled = self.box_pooler(feats, rois, self.box_pooler.valid_hw(padding))
        if train:
            pooled = scale_gradient(pooled, 1.0 / self.num_stages)
        return self.box_predictors[k](self.box_heads[k](pooled))

    def decode(self, k: int, deltas: jnp.ndarray, rois: jnp.ndarray) -> jnp.ndarray:
        """Stage k's boxes from its agnostic deltas [B, R, 1, 4] on rois [B, R, 4] (not clipped)."""
        return box_ops.decode_boxes(deltas[:, :, 0], rois, self.stage_box_weights[k])

    def box_predictions(self, feats, rois: jnp.ndarray, padding: PaddingMask):
        """Stage 0 (what the standard heads' box branch is)."""
        return self.stage_predictions(0, feats, rois, padding)

    def cascade(self, feats, proposals: jnp.ndarray, image_hw: jnp.ndarray, padding: PaddingMask):
        """Inference through every stage: (mean class probabilities [B, R, K], final boxes
        [B, R, 4], per stage (input boxes, class_logits, box_deltas))."""
        rois, boxes, probs, stages = proposals, proposals, 0.0, []
        for k in range(self.num_stages):
            if k > 0:
                rois = box_ops.clip_boxes(boxes, image_hw[:, None, :])
            logits, deltas = self.stage_predictions(k, feats, rois, padding)
            stages.append((rois, logits, deltas))
            probs = probs + jax.nn.softmax(logits, axis=-1)
            boxes = self.decode(k, deltas, rois)
        return probs / self.num_stages, boxes, stages

    def detect(self, feats, proposals, proposal_valid, image_hw, padding):
        probs, boxes, _ = self.cascade(feats, proposals, image_hw, padding)
        d = self.detection
        det = select_detections(probs, boxes[:, :, None, :], proposal_valid, image_hw,
                                score_thresh=d.score_thresh, nms_thresh=d.nms_thresh,
                                detections_per_img=d.detections_per_img,
                                pre_nms_candidates=d.pre_nms_candidates, min_size=d.min_size)
        return self._with_masks(det, feats, padding)


ROI_HEADS = {'standard': StandardRoIHeads, 'res5': Res5RoIHeads, 'cascade': CascadeRoIHeads}


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
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    boxes = box_ops.decode_boxes(box_deltas, proposals[:, :, None, :], box_weights)   # [B, R, K, 4]
    return select_detections(scores, boxes, proposal_valid, image_hw, score_thresh=score_thresh,
                             nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                             pre_nms_candidates=pre_nms_candidates, min_size=min_size)


def select_detections(scores: jnp.ndarray, boxes: jnp.ndarray, proposal_valid: jnp.ndarray,
                      image_hw: jnp.ndarray, *, score_thresh: float, nms_thresh: float,
                      detections_per_img: int, pre_nms_candidates: int, min_size: float = 1e-2
                      ) -> dict[str, jnp.ndarray]:
    """The selection half of `postprocess_detections`, from class probabilities scores [B, R, K]
    (background at 0) and decoded boxes [B, R, K, 4], or [B, R, 1, 4] for class-agnostic boxes
    (Cascade: the one box is every class's, as Detectron2's `fast_rcnn_inference` repeats it)."""
    b, r, k = scores.shape
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, None, :])
    boxes = jnp.broadcast_to(boxes, (b, r, k, 4))
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
