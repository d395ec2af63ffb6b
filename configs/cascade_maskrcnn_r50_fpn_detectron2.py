"""Cascade Mask R-CNN R50-FPN as Detectron2's `Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml` (44.3 box /
38.5 mask AP in its model zoo): three box stages at IoU 0.5 / 0.6 / 0.7, scores averaged over
the stages, the mask head on the last stage's boxes.

Fine-tune from the zoo checkpoint: `mrcnn-jax convert --from detectron2 model_final_480dd8.pkl
--config-file cascade_mask_rcnn_R_50_FPN_3x.yaml converted/`, then `mrcnn-jax train --config
configs/cascade_maskrcnn_r50_fpn_detectron2.py --workdir W --config.train.init_from=converted/`.
"""

from configs import common
from mrcnn_jax.config import default_config


def get_config():
    c = default_config()
    common.detectron2_rcnn(c, depth=50)
    common.cascade(c)
    return c
