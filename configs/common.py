"""Fields that several configs share: the small CPU models and the synthetic datasets."""

import ml_collections


def small_resnet18_fpn(c: ml_collections.ConfigDict, *, width: int, fpn_channels: int) -> ml_collections.ConfigDict:
    """A narrow ResNet-18 FPN trained from scratch (GroupNorm: no pretrained statistics to freeze)
    with anchors for small images and 5 classes (background + circle, square, triangle, star)."""
    m = c.model
    m.num_classes = 5
    m.backbone.depth = 18
    m.backbone.width = width
    m.backbone.norm = 'gn'
    m.backbone.frozen_stages = 0
    m.fpn.channels = fpn_channels
    m.anchors.sizes = (16, 32, 64, 128, 256)
    return c


def synthetic_shapes(c: ml_collections.ConfigDict, *, image_size: int) -> ml_collections.ConfigDict:
    """The built-in synthetic shapes dataset at image_size x image_size, trained and evaluated at
    that size on a canvas of the same size."""
    d = c.data
    d.source = 'synthetic'
    d.synthetic_task = 'shapes'
    d.synthetic_image_size = image_size
    d.canvas = (image_size, image_size)
    d.min_size = (image_size,)
    d.max_size = image_size
    d.test_min_size = image_size
    d.test_max_size = image_size
    return c


def synthetic_keypoints(c: ml_collections.ConfigDict, *, image_size: int) -> ml_collections.ConfigDict:
    """The built-in synthetic keypoint dataset (stick figures, one class 'person' with 13
    keypoints: `mrcnn_jax/data/synthetic_keypoints.py`) at image_size x image_size, and a
    Keypoint R-CNN for it: keypoint head on, no masks, 2 classes (background + person)."""
    synthetic_shapes(c, image_size=image_size)
    c.data.synthetic_task = 'keypoints'
    c.data.keypoints = True
    c.data.num_keypoints = 13
    m = c.model
    m.num_classes = 2
    m.mask_on = False
    m.keypoint_on = True
    m.num_keypoints = 13
    return c


def detectron2_rcnn(c: ml_collections.ConfigDict, *, depth: int) -> ml_collections.ConfigDict:
    """What Detectron2's zoo R-CNNs share (`Base-RCNN-*.yaml` on its defaults): its conventions
    (BGR 0-255 input, stride in the 1x1, exact anchors, RoIAlignV2, L1 box losses, ...),
    FrozenBN eps 1e-5 with stem and res2 frozen, 80 COCO classes, multi-scale training
    (640-800, max 1333) and the 3x schedule (270k steps of 16 images, decays at 210k and 250k)."""
    m = c.model
    m.conventions.name = 'detectron2'
    m.num_classes = 81
    m.backbone.depth = depth
    m.backbone.norm_eps = 1e-5
    m.backbone.frozen_stages = 2
    m.rpn.min_size = 0.0
    m.roi.min_size = 0.0
    d = c.data
    d.source = 'coco_json'
    d.class_index = 'contiguous'
    d.min_size = (640, 672, 704, 736, 768, 800)
    d.max_size = 1333
    d.canvas = (1344, 1344)
    d.buckets = ((832, 1344), (1344, 832))
    t = c.train
    t.batch_size = 16
    t.steps = 270000
    t.decay_steps = (210000, 250000)
    return c


def c4(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The Mask R-CNN paper's C4 layout (Detectron2's `Base-RCNN-C4.yaml`): RPN and RoI heads on
    res4 (stride 16, 15 anchors per cell), res5 run per RoI on 14 x 14 RoIAlign features
    (`roi.heads='res5'`), a conv-free mask head giving 14 x 14 masks, and the RPN's C4 top-k
    (12000 / 6000 before NMS, 2000 / 1000 after). Detectron2 pads C4 inputs to no multiple."""
    m = c.model
    m.backbone.return_levels = (4,)
    m.fpn.enabled = False
    m.size_divisible = 1
    m.anchors.sizes = ((32, 64, 128, 256, 512),)
    m.rpn.pre_nms_topk_train, m.rpn.pre_nms_topk_test = 12000, 6000
    m.rpn.post_nms_topk_train, m.rpn.post_nms_topk_test = 2000, 1000
    r = m.roi
    r.heads = 'res5'
    r.box_pool_size = r.mask_pool_size = r.mask_resolution = 14
    r.mask_head_convs = 0
    r.roi_align_method = C4_ROI_ALIGN_METHOD
    return c


# C4 pools 14 x 14 bins from one 1024-channel map: the separable interpolation matrices
# ('einsum', ops/roi_align.py) pool 1000 RoIs in 1.7 s on 2 CPU cores where the gather form takes
# 17.8 s (measured at 320/512, adaptive grid bounded at 8; docs/performance.md).
C4_ROI_ALIGN_METHOD = 'einsum'


def cascade(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Cascade R-CNN's box branch (Detectron2's `CascadeROIHeads`): three stages matched at IoU
    0.5 / 0.6 / 0.7, class-agnostic regression with weights (10, 10, 5, 5) x 1 / 2 / 3; the RPN
    keeps 2000 proposals after NMS in training."""
    m = c.model
    m.roi.heads = 'cascade'
    m.roi.cascade_ious = (0.5, 0.6, 0.7)
    m.roi.cascade_box_weights = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
    m.rpn.post_nms_topk_train = 2000
    return c


def detectron2_keypoints(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Keypoint R-CNN as Detectron2's `Base-Keypoint-RCNN-FPN.yaml`: one class (person) and no
    mask head, the keypoint head (8 x 512 3x3 convs on 14 x 14 RoIAlign, 56 x 56 heatmaps of
    COCO's 17 keypoints), box regression smooth L1 beta 0.5 (the yaml's: keypoint AP degrades
    with plain L1), 1500 proposals per image after NMS in training; data with keypoints."""
    m = c.model
    m.num_classes = 2
    m.mask_on = False
    m.keypoint_on = True
    m.num_keypoints = 17
    m.conventions.box_smooth_l1_beta = 0.5
    m.rpn.post_nms_topk_train = 1500
    r = m.roi
    r.keypoint_head_convs, r.keypoint_head_channels, r.keypoint_pool_size = 8, 512, 14
    c.data.keypoints = True
    c.data.num_keypoints = 17
    return c
