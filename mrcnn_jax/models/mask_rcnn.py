"""Mask R-CNN (and Faster R-CNN without a mask head) composed from its stages.

```python
model = build_model(cfg.model)                        # MaskRCNN, a flax.linen Module
variables = init_variables(model, key, (512, 512))     # {'params': ..., 'frozen': ...}
out = model.apply(variables, images, image_info)      # padded detections + 'valid'
feats = model.apply(variables, images, image_info, method=MaskRCNN.features)
```
Every stage is a method usable alone with the same variables: `features` (backbone + FPN),
`rpn` (head outputs), `anchors`, `proposals`, `box_predictions`, `mask_predictions`,
`keypoint_predictions`, `detect`.

Composition only: `MaskRCNN` holds modules (backbone, FPN, RPN head, RoI heads) and frozen
settings objects (anchors, proposal selection); `build_model` makes them from a config and its
conventions (`models/conventions.py`). Which heads run is the RoI heads' business
(`models/roi_heads.py`, `models/heads/`), so a new head or a new kind of RoI heads is a new
module and a config value, not a branch here.

Inputs: images [B, H, W, 3] normalized, on a static canvas (H, W multiples of 32);
image_info [B, 6] float32 = (orig_h, orig_w, resized_h, resized_w, scale_h, scale_w).
Boxes in and out are xyxy float32 in canvas pixels (the resized image's frame).

Padding: with `mask_padding`, activations outside each image's `size_divisible`-padded region
are zeroed before every spatial op, so an image on a larger static canvas computes exactly what
torchvision computes on its own padded tensor (models/layers.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mrcnn_jax.models.conventions import Conventions
from mrcnn_jax.models.fpn import FPN
from mrcnn_jax.models.layers import PaddingMask, padded_size
from mrcnn_jax.models.resnet import ResNet
from mrcnn_jax.models.roi_heads import build_roi_heads
from mrcnn_jax.models.rpn import AnchorGenerator, RPNHead, RPNSettings, select_proposals


class MaskRCNN(nn.Module):
    backbone: nn.Module                    # images -> [C2, C3, C4, C5]
    fpn: Optional[nn.Module]               # [C2..C5] -> [P2..P6]; None: the backbone's maps (C4: [res4])
    rpn_head: nn.Module                    # per level objectness + deltas
    roi_heads: nn.Module                   # proposals -> detections (models/roi_heads.py)
    anchor_generator: AnchorGenerator
    rpn_settings: RPNSettings
    size_divisible: int = 32
    mask_padding: bool = True

    # -- helpers -------------------------------------------------------------------------------
    @property
    def mask_head(self) -> Optional[nn.Module]:
        """The RoI heads' mask head, or None (Faster R-CNN)."""
        return getattr(self.roi_heads, 'mask_head', None)

    @property
    def keypoint_head(self) -> Optional[nn.Module]:
        """The RoI heads' keypoint head, or None."""
        return getattr(self.roi_heads, 'keypoint_head', None)

    def pad_hw(self, image_info: jnp.ndarray) -> Optional[jnp.ndarray]:
        """[B, 2] int32 size torchvision would pad each image to, or None without masking."""
        if not self.mask_padding:
            return None
        return padded_size(image_info[:, 2:4], self.size_divisible)

    def padding(self, image_info: jnp.ndarray) -> PaddingMask:
        return PaddingMask(self.pad_hw(image_info))

    @staticmethod
    def image_hw(image_info: jnp.ndarray) -> jnp.ndarray:
        return image_info[:, 2:4]

    # -- stages --------------------------------------------------------------------------------
    def features(self, images: jnp.ndarray, image_info: jnp.ndarray) -> list[jnp.ndarray]:
        """Backbone + FPN: [P2, P3, P4, P5, P6], each [B, H / s, W / s, C_fpn]."""
        mask = self.padding(image_info)
        feats = self.backbone(images, mask)
        return feats if self.fpn is None else self.fpn(feats, mask)

    def rpn(self, feats: Sequence[jnp.ndarray], image_info: jnp.ndarray):
        """RPN head: per level objectness [B, N_l] and deltas [B, N_l, 4] (float32)."""
        return self.rpn_head(feats, self.padding(image_info))

    def anchors(self, feats: Sequence[jnp.ndarray], image_info: jnp.ndarray):
        """Per level anchors [B or 1, N_l, 4] and validity [B or 1, N_l] (see ops/anchors.py)."""
        return self.anchor_generator([f.shape[1:3] for f in feats], self.pad_hw(image_info))

    def proposals(self, feats, image_info, train: bool = False):
        """(boxes [B, P, 4], scores [B, P], valid [B, P], rpn_outputs) with P post-NMS proposals;
        rpn_outputs = (objectness, deltas, anchors, anchor_valid), per level, for the losses."""
        logits, deltas = self.rpn(feats, image_info)
        anchors, anchor_valid = self.anchors(feats, image_info)
        pre, post = self.rpn_settings.topk(train)
        boxes, scores, valid = select_proposals(
            logits, deltas, anchors, anchor_valid, self.image_hw(image_info), pre_nms_topk=pre,
            post_nms_topk=post, nms_thresh=self.rpn_settings.nms_thresh, min_size=self.rpn_settings.min_size,
            min_size_strict=self.rpn_settings.min_size_strict)
        return boxes, scores, valid, (logits, deltas, anchors, anchor_valid)

    def box_predictions(self, feats, rois: jnp.ndarray, image_info: jnp.ndarray):
        """rois [B, R, 4] -> class_logits [B, R, K], box_deltas [B, R, K, 4]."""
        return self.roi_heads.box_predictions(feats, rois, self.padding(image_info))

    def mask_predictions(self, feats, rois: jnp.ndarray, classes: jnp.ndarray, image_info: jnp.ndarray,
                         active: Optional[jnp.ndarray] = None, train: bool = False):
        """rois [B, R, 4], classes [B, R] -> mask logits [B, R, M, M] of each RoI's class
        (`StandardRoIHeads.mask_predictions` explains `active` and `train`)."""
        return self.roi_heads.mask_predictions(feats, rois, classes, self.padding(image_info),
                                               active=active, train=train)

    def keypoint_predictions(self, feats, rois: jnp.ndarray, image_info: jnp.ndarray):
        """rois [B, R, 4] -> keypoint heatmap logits [B, R, K, 56, 56] (Keypoint R-CNN)."""
        return self.roi_heads.keypoint_predictions(feats, rois, self.padding(image_info))

    def detect(self, feats, image_info):
        """Inference from features: padded detections (see __call__)."""
        boxes, _, valid, _ = self.proposals(feats, image_info, train=False)
        return self.roi_heads.detect(feats, boxes, valid, self.image_hw(image_info), self.padding(image_info))

    def __call__(self, images: jnp.ndarray, image_info: jnp.ndarray):
        """Inference. Returns {'boxes' [B, D, 4] canvas pixels, 'scores' [B, D], 'labels' [B, D]
        int32 (model class index), 'valid' [B, D] bool, and with a mask head 'masks' [B, D, 28, 28]
        float32 probabilities of the predicted class, and with a keypoint head 'keypoints'
        [B, D, K, 3] (x, y, 1) canvas pixels and 'keypoints_scores' [B, D, K]}; D =
        detections_per_img, sorted by score."""
        return self.detect(self.features(images, image_info), image_info)


def build_model(cfg: ml_collections.ConfigDict) -> MaskRCNN:
    """MaskRCNN from a `config.model` section (see mrcnn_jax/config.py)."""
    conv = Conventions.from_config(cfg.conventions)
    dtype = jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32
    b = cfg.backbone
    levels = tuple(b.return_levels)
    backbone = ResNet(depth=b.depth, width=b.width, groups=b.groups, width_per_group=b.width_per_group,
                      stride_in_1x1=conv.stride_in_1x1, norm=b.norm, norm_eps=b.norm_eps,
                      frozen_stages=b.frozen_stages, return_levels=levels, dtype=dtype)
    if cfg.fpn.enabled:
        if levels != (2, 3, 4, 5):
            raise ValueError(f'the FPN takes C2..C5: model.backbone.return_levels = {levels}, expected (2, 3, 4, 5)')
        fpn, channels, first_level = FPN(cfg.fpn.channels, dtype=dtype), cfg.fpn.channels, 2
    else:   # C4: the RPN and the RoI heads read the backbone's maps (res4) themselves
        fpn, channels, first_level = None, backbone.out_channels[0], levels[0]
    anchor_generator = AnchorGenerator(sizes=tuple(cfg.anchors.sizes), aspect_ratios=tuple(cfg.anchors.aspect_ratios),
                                       rounded=conv.anchor_rounding, stride_rule=conv.anchor_strides,
                                       first_level=first_level)
    rp = cfg.rpn
    return MaskRCNN(
        backbone=backbone,
        fpn=fpn,
        rpn_head=RPNHead(anchor_generator.num_anchors, channels, first_level=first_level, dtype=dtype),
        roi_heads=build_roi_heads(cfg, conv, dtype),
        anchor_generator=anchor_generator,
        rpn_settings=RPNSettings(pre_nms_topk_train=rp.pre_nms_topk_train, pre_nms_topk_test=rp.pre_nms_topk_test,
                                 post_nms_topk_train=rp.post_nms_topk_train,
                                 post_nms_topk_test=rp.post_nms_topk_test, nms_thresh=rp.nms_thresh,
                                 min_size=rp.min_size, min_size_strict=conv.rpn_min_size_strict),
        size_divisible=cfg.size_divisible,
        mask_padding=cfg.mask_padding,
    )


# -- variables -------------------------------------------------------------------------------------
def dummy_inputs(canvas_hw: tuple[int, int], batch: int = 1) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Zero images [batch, H, W, 3] and image_info filling the canvas at scale 1: what `init`
    (and shape inference) needs. Variables do not depend on the canvas."""
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    images = jnp.zeros((batch, h, w, 3), jnp.float32)
    info = jnp.tile(jnp.asarray([[h, w, h, w, 1.0, 1.0]], jnp.float32), (batch, 1))
    return images, info


def init_variables(model: MaskRCNN, key: jax.Array, canvas_hw: tuple[int, int] = (64, 64)) -> dict:
    """Random variables of `model` (jit-compiled init: much faster than eager)."""
    images, info = dummy_inputs(canvas_hw)
    return jax.jit(model.init)(key, images, info)


def abstract_variables(cfg: ml_collections.ConfigDict, canvas_hw: tuple[int, int] = (64, 64)):
    """ShapeDtypeStructs of the variables of build_model(cfg) (a `config.model`), without running init."""
    model = build_model(cfg)
    images, info = dummy_inputs(canvas_hw)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, info))
