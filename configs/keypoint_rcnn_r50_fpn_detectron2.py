"""Keypoint R-CNN R50-FPN as Detectron2's `COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml` (55.4 box /
65.5 keypoint AP in its model zoo): one class (person), no masks, the keypoint head's eight
3 x 3 convs of 512 channels on 14 x 14 RoIAlign features and 56 x 56 heatmaps of COCO's 17
keypoints, box regression with smooth L1 beta 0.5, 1500 proposals per image in training.

Predict with the zoo checkpoint: `Predictor.from_detectron2('model_final_a6e10b.pkl',
config_file='keypoint_rcnn_R_50_FPN_3x.yaml')` (labels: COCO category 1; keypoints and their
scores as Detectron2's `pred_keypoints`, see `mrcnn_jax/convert/detectron2_config.py` on the
half-pixel offset of its keypoint frame). Fine-tune: `mrcnn-jax convert --from detectron2
model_final_a6e10b.pkl --config-file keypoint_rcnn_R_50_FPN_3x.yaml converted/`, then
`mrcnn-jax train --config configs/keypoint_rcnn_r50_fpn_detectron2.py --workdir W
--config.train.init_from=converted/` (on COCO's person_keypoints_*.json;
`--config.model.backbone.depth=101` for R101).
"""

from configs import common
from mrcnn_jax.config import default_config


def get_config():
    c = default_config()
    common.detectron2_rcnn(c, depth=50)
    common.detectron2_keypoints(c)
    return c
