"""tiny_test.py in the C4 layout (res5 per RoI, roi.heads='res5'): a narrow ResNet-18 whose last
stage runs on 14 x 14 RoI features, for fast CPU tests of C4 training."""

from configs import common
from configs import tiny_test


def get_config():
    c = common.c4(tiny_test.get_config())
    m = c.model
    m.anchors.sizes = ((16, 32, 64, 128, 256),)
    m.rpn.pre_nms_topk_train, m.rpn.pre_nms_topk_test = 256, 200
    m.rpn.post_nms_topk_train, m.rpn.post_nms_topk_test = 128, 64
    m.roi.batch_size_per_image = 32
    m.roi.mask_head_channels = 32
    return c
