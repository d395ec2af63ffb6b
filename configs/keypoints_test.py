"""A tiny Keypoint R-CNN for fast tests: `configs/tiny_test.py`'s model and schedule on 128 px stick
figures (13 joints), with a 2 x 32 keypoint head in place of the mask head (whose fields stay, unused)."""

from configs import common, tiny_test


def get_config():
    c = tiny_test.get_config()
    common.synthetic_keypoints(c, image_size=128)
    r = c.model.roi
    r.keypoint_head_convs = 2
    r.keypoint_head_channels = 32
    r.max_mask_rois = 8                    # positives per image carried to the keypoint loss
    d = c.data
    d.max_instances = 6
    d.synthetic_num_val = 6
    c.eval.batch_size = 2
    return c
