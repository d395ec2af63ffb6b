"""A small Keypoint R-CNN on the built-in synthetic stick-figure dataset, trainable on a 2-core CPU.

    mrcnn-jax demo --task keypoints                       # or: make demo-keypoints
    mrcnn-jax train --config configs/keypoints_tiny.py --workdir W

The `make demo-keypoints` model: ResNet-18 at half width with GroupNorm, trained from scratch, a
64-channel FPN, light box head, and a narrow keypoint head (4 convs of 64 channels on 14 x 14
RoIAlign features, 56 x 56 heatmaps) for the 13 joints of 256 x 256 stick figures
(`mrcnn_jax/data/synthetic_keypoints.py`; generated into data.synthetic_dir, a cache folder by
default, when missing). No mask head. The schedule fits the demo's budget (train.max_seconds
stops it earlier on a slower machine); `--config.train.eval_every=100` records the AP curve.
"""

from configs import common
from mrcnn_jax.config import default_config


def get_config():
    c = default_config()
    c.seed = 0
    common.small_resnet18_fpn(c, width=32, fpn_channels=64)
    common.synthetic_keypoints(c, image_size=256)
    m = c.model
    m.rpn.pre_nms_topk_train = 1000
    m.rpn.post_nms_topk_train = 500
    m.rpn.pre_nms_topk_test = 500
    m.rpn.post_nms_topk_test = 300
    m.rpn.batch_size_per_image = 128
    m.roi.batch_size_per_image = 128
    m.roi.fc_dim = 256
    m.roi.keypoint_head_convs = 4
    m.roi.keypoint_head_channels = 64
    m.roi.max_mask_rois = 32                # positives per image carried to the keypoint loss
    m.roi.detections_per_img = 20           # COCO's keypoint AP counts 20 per image
    m.roi.pre_nms_candidates = 1000

    d = c.data
    d.synthetic_num_train = 500
    d.synthetic_num_val = 60
    d.max_instances = 6                     # images hold 1-3 figures

    t = c.train
    t.batch_size = 4
    t.steps = 700
    t.base_lr = 0.02
    t.warmup_steps = 50
    t.decay_steps = (600,)
    t.max_seconds = 480.0                   # the demo's training budget (10 min in all)
    t.checkpoint_every = 100
    t.log_every = 25
    t.eval_every = 0                        # the demo evaluates once, after training
    c.eval.batch_size = 4
    return c
