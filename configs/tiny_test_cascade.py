"""tiny_test.py with Cascade R-CNN's three box stages (roi.heads='cascade'), for fast CPU tests."""

from configs import common
from configs import tiny_test


def get_config():
    c = common.cascade(tiny_test.get_config())
    c.model.rpn.post_nms_topk_train = 256
    return c
