"""A small Mask R-CNN on the built-in synthetic shapes dataset, trainable on a 2-core CPU.

    mrcnn-jax train --config configs/shapes_tiny.py --workdir W --config.train.steps=20

ResNet-18 at half width with GroupNorm (trained from scratch: there are no pretrained weights
to freeze), a 64-channel FPN and light heads, on 256 x 256 images of 4 shape classes. The
dataset is generated into data.synthetic_dir (a cache folder by default) when missing.
"""

from configs import common
from mrcnn_jax.config import default_config


def get_config():
    c = default_config()
    c.seed = 0
    common.small_resnet18_fpn(c, width=32, fpn_channels=64)
    common.synthetic_shapes(c, image_size=256)
    m = c.model
    m.rpn.pre_nms_topk_train = 1000
    m.rpn.post_nms_topk_train = 500
    m.rpn.pre_nms_topk_test = 500
    m.rpn.post_nms_topk_test = 300
    m.rpn.batch_size_per_image = 128
    m.roi.batch_size_per_image = 128
    m.roi.fc_dim = 256
    m.roi.mask_head_convs = 2
    m.roi.mask_head_channels = 64
    m.roi.max_mask_rois = 32
    m.roi.detections_per_img = 50
    m.roi.pre_nms_candidates = 1000

    d = c.data
    d.synthetic_num_train = 400
    d.synthetic_num_val = 50
    d.max_instances = 12
    d.mask_size = 56

    t = c.train
    t.batch_size = 4
    t.steps = 2200                          # ~25 min on 2 cores at ~0.7 s/step
    t.base_lr = 0.02
    t.warmup_steps = 100
    t.decay_steps = (1700, 2000)
    t.checkpoint_every = 250
    t.log_every = 50
    t.eval_every = 250                      # COCO AP on the held-out split, for the curve
    c.eval.batch_size = 4
    return c
