"""A tiny Keypoint R-CNN for fast tests: narrow ResNet-18 FPN on 128 px stick figures (13 joints)."""

from configs import common
from mrcnn_jax.config import default_config


def get_config():
    c = default_config()
    common.small_resnet18_fpn(c, width=16, fpn_channels=32)
    common.synthetic_keypoints(c, image_size=128)
    m = c.model
    m.rpn.pre_nms_topk_train = 256
    m.rpn.pre_nms_topk_test = 200
    m.rpn.post_nms_topk_train = 256
    m.rpn.post_nms_topk_test = 100
    m.rpn.batch_size_per_image = 64
    m.roi.batch_size_per_image = 64
    m.roi.fc_dim = 64
    m.roi.keypoint_head_convs = 2
    m.roi.keypoint_head_channels = 32
    m.roi.max_mask_rois = 8
    m.roi.detections_per_img = 20
    m.roi.pre_nms_candidates = 512
    d = c.data
    d.max_instances = 6
    d.synthetic_num_train = 16
    d.synthetic_num_val = 6
    c.train.batch_size = 2
    c.train.steps = 10
    c.train.base_lr = 0.01
    c.train.warmup_steps = 2
    c.train.decay_steps = ()
    c.train.checkpoint_every = 5
    c.train.log_every = 1
    c.eval.batch_size = 2
    return c
