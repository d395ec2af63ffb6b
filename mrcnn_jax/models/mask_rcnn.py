"""Mask R-CNN (and Faster R-CNN with `mask_head=None`) composed from its stages.

```python
model = build_model(cfg.model)                        # MaskRCNN, a flax.linen Module
variables = model.init(key, images, image_info)       # {'params': ..., 'frozen': ...}
out = model.apply(variables, images, image_info)      # padded detections + 'valid'
feats = model.apply(variables, images, image_info, method=MaskRCNN.features)
```
Every stage is a method usable alone with the same variables: `features` (backbone + FPN),
`rpn` (head outputs), `anchors`, `proposals`, `box_predictions`, `mask_predictions`, `detect`.

Inputs: images [B, H, W, 3] normalized, on a static canvas (H, W multiples of 32);
image_info [B, 6] float32 = (orig_h, orig_w, resized_h, resized_w, scale_h, scale_w).
Boxes in and out are xyxy float32 in canvas pixels (the resized image's frame).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mrcnn_jax.models.fpn import FPN
from mrcnn_jax.models.layers import PaddingMask, padded_size
from mrcnn_jax.models.resnet import ResNet
from mrcnn_jax.models.roi_heads import BoxHead, MaskHead, postprocess_detections
from mrcnn_jax.models.rpn import RPNHead, select_proposals
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops.roi_align import multilevel_roi_align

POOLER_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)   # RoIs are pooled from P2..P5 (not P6)


class MaskRCNN(nn.Module):
    backbone: nn.Module
    fpn: nn.Module
    rpn_head: nn.Module
    box_head: nn.Module
    mask_head: Optional[nn.Module] = None
    semantics: str = 'torchvision'
    anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512)
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    size_divisible: int = 32
    mask_padding: bool = True
    rpn_pre_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 2000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 1e-3
    box_pool_size: int = 7
    mask_pool_size: int = 14
    sampling_ratio: int = 2
    max_sampling_ratio: int = 8
    canonical_scale: float = 224
    canonical_level: int = 4
    roi_align_method: str = 'gather'
    box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    pre_nms_candidates: int = 4096
    det_min_size: float = 1e-2
    mask_roi_chunk: int = 32

    # -- helpers -------------------------------------------------------------------------------
    @property
    def aligned(self) -> bool:
        return self.semantics == 'detectron2'

    def pad_hw(self, image_info: jnp.ndarray) -> Optional[jnp.ndarray]:
        """[B, 2] int32 size torchvision would pad each image to, or None without masking."""
        if not self.mask_padding:
            return None
        return padded_size(image_info[:, 2:4], self.size_divisible)

    @staticmethod
    def image_hw(image_info: jnp.ndarray) -> jnp.ndarray:
        return image_info[:, 2:4]

    def _pool(self, feats, boxes, image_info, size):
        mask = PaddingMask(self.pad_hw(image_info))
        valid_hw = None
        if mask.pad_hw is not None:
            valid_hw = [mask.region_hw(int(round(1 / s))) for s in POOLER_SCALES]
        level_eps = 1e-6 if self.semantics == 'torchvision' else 1e-8
        return multilevel_roi_align(
            feats[:len(POOLER_SCALES)], boxes, (size, size), self.sampling_ratio, self.aligned,
            scales=POOLER_SCALES, canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level, level_eps=level_eps, valid_hw=valid_hw,
            max_sampling_ratio=self.max_sampling_ratio, method=self.roi_align_method)

    # -- stages --------------------------------------------------------------------------------
    def features(self, images: jnp.ndarray, image_info: jnp.ndarray) -> list[jnp.ndarray]:
        """Backbone + FPN: [P2, P3, P4, P5, P6], each [B, H / s, W / s, C_fpn]."""
        mask = PaddingMask(self.pad_hw(image_info))
        return self.fpn(self.backbone(images, mask), mask)

    def rpn(self, feats: Sequence[jnp.ndarray], image_info: jnp.ndarray):
        """RPN head: per level objectness [B, N_l] and deltas [B, N_l, 4] (float32)."""
        return self.rpn_head(feats, PaddingMask(self.pad_hw(image_info)))

    def anchors(self, feats: Sequence[jnp.ndarray], image_info: jnp.ndarray):
        """Per level anchors [B or 1, N_l, 4] and validity [B or 1, N_l] (see ops/anchors.py)."""
        pad_hw = self.pad_hw(image_info)
        out_a, out_v = [], []
        for i, (f, size) in enumerate(zip(feats, self.anchor_sizes)):
            base = anchor_ops.cell_anchors(size, self.aspect_ratios, self.semantics)
            a, v = anchor_ops.level_anchors(f.shape[1:3], base, i + 2, pad_hw, self.semantics)
            out_a.append(a)
            out_v.append(v)
        return out_a, out_v

    def proposals(self, feats, image_info, train: bool = False):
        """(boxes [B, P, 4], scores [B, P], valid [B, P], rpn_outputs) with P post-NMS proposals."""
        logits, deltas = self.rpn(feats, image_info)
        anchors, anchor_valid = self.anchors(feats, image_info)
        boxes, scores, valid = select_proposals(
            logits, deltas, anchors, anchor_valid, self.image_hw(image_info),
            pre_nms_topk=self.rpn_pre_nms_topk_train if train else self.rpn_pre_nms_topk_test,
            post_nms_topk=self.rpn_post_nms_topk_train if train else self.rpn_post_nms_topk_test,
            nms_thresh=self.rpn_nms_thresh, min_size=self.rpn_min_size)
        return boxes, scores, valid, (logits, deltas, anchors, anchor_valid)

    def box_predictions(self, feats, rois: jnp.ndarray, image_info: jnp.ndarray):
        """rois [B, R, 4] -> class_logits [B, R, K], box_deltas [B, R, K, 4]."""
        return self.box_head(self._pool(feats, rois, image_info, self.box_pool_size))

    def mask_predictions(self, feats, rois: jnp.ndarray, classes: jnp.ndarray, image_info: jnp.ndarray,
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
        def pool_and_head(mdl, f, ro, cl):
            return mdl.mask_head(mdl._pool(f, ro, image_info, mdl.mask_pool_size), cl)

        c, r = self.mask_roi_chunk, rois.shape[1]
        if active is None or c <= 0 or c >= r:
            return pool_and_head(self, feats, rois, classes)
        if train:
            pooled = self._pool(feats, rois, image_info, self.mask_pool_size)

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

    def detect(self, feats, image_info):
        """Inference from features: padded detections (see __call__)."""
        boxes, _, valid, _ = self.proposals(feats, image_info, train=False)
        logits, deltas = self.box_predictions(feats, boxes, image_info)
        det = postprocess_detections(
            logits, deltas, boxes, valid, self.image_hw(image_info), box_weights=self.box_weights,
            score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img, pre_nms_candidates=self.pre_nms_candidates,
            min_size=self.det_min_size)
        if self.mask_head is not None:
            mask_logits = self.mask_predictions(feats, det['boxes'], det['labels'], image_info,
                                                active=det['valid'])
            # padding rows are zero, like their boxes, scores and labels
            det['masks'] = jnp.where(det['valid'][..., None, None], jax.nn.sigmoid(mask_logits), 0.0)
        return det

    def __call__(self, images: jnp.ndarray, image_info: jnp.ndarray):
        """Inference. Returns {'boxes' [B, D, 4] canvas pixels, 'scores' [B, D], 'labels' [B, D]
        int32 (model class index), 'valid' [B, D] bool, and with a mask head 'masks' [B, D, 28, 28]
        float32 probabilities of the predicted class}; D = detections_per_img, sorted by score."""
        return self.detect(self.features(images, image_info), image_info)


def build_model(cfg: ml_collections.ConfigDict) -> MaskRCNN:
    """MaskRCNN from a `config.model` section (see mrcnn_jax/config.py)."""
    dtype = jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32
    b = cfg.backbone
    backbone = ResNet(depth=b.depth, width=b.width, groups=b.groups, width_per_group=b.width_per_group,
                      stride_in_1x1=b.stride_in_1x1, norm=b.get('norm', 'frozen_bn'), norm_eps=b.norm_eps,
                      frozen_stages=b.frozen_stages, dtype=dtype)
    r = cfg.roi
    num_anchors = len(cfg.anchors.aspect_ratios)
    mask_head = None
    if cfg.mask_on:
        mask_head = MaskHead(cfg.num_classes, r.mask_head_convs, r.mask_head_channels, dtype=dtype)
    rp = cfg.rpn
    return MaskRCNN(
        backbone=backbone,
        fpn=FPN(cfg.fpn.channels, dtype=dtype),
        rpn_head=RPNHead(num_anchors, cfg.fpn.channels, dtype=dtype),
        box_head=BoxHead(cfg.num_classes, r.fc_dim, dtype=dtype),
        mask_head=mask_head,
        semantics=cfg.semantics,
        anchor_sizes=tuple(cfg.anchors.sizes),
        aspect_ratios=tuple(cfg.anchors.aspect_ratios),
        size_divisible=cfg.size_divisible,
        mask_padding=cfg.mask_padding,
        rpn_pre_nms_topk_train=rp.pre_nms_topk_train,
        rpn_pre_nms_topk_test=rp.pre_nms_topk_test,
        rpn_post_nms_topk_train=rp.post_nms_topk_train,
        rpn_post_nms_topk_test=rp.post_nms_topk_test,
        rpn_nms_thresh=rp.nms_thresh,
        rpn_min_size=rp.min_size,
        box_pool_size=r.box_pool_size,
        mask_pool_size=r.mask_pool_size,
        sampling_ratio=r.sampling_ratio,
        max_sampling_ratio=r.max_sampling_ratio,
        canonical_scale=r.canonical_scale,
        canonical_level=r.canonical_level,
        roi_align_method=r.roi_align_method,
        box_weights=tuple(r.box_weights),
        score_thresh=r.score_thresh,
        nms_thresh=r.nms_thresh,
        detections_per_img=r.detections_per_img,
        pre_nms_candidates=r.pre_nms_candidates,
        det_min_size=r.min_size,
        mask_roi_chunk=r.get('mask_roi_chunk', MaskRCNN.mask_roi_chunk),
    )
