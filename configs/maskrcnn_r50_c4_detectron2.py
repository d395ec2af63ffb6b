"""Mask R-CNN R50-C4, the paper's C4 model, as Detectron2's `mask_rcnn_R_50_C4_3x.yaml` (39.8 box /
34.4 mask AP in its model zoo): res4 feeds the RPN and 14 x 14 RoIAlign, res5 runs on every RoI.

Fine-tune from a zoo checkpoint: `mrcnn-jax convert --from detectron2 model_final_4ce675.pkl
--config-file mask_rcnn_R_50_C4_3x.yaml converted/`, then `mrcnn-jax train --config
configs/maskrcnn_r50_c4_detectron2.py --workdir W --config.train.init_from=converted/`
(`--config.model.backbone.depth=101` for R101-C4). res5 on 512 RoIs per image is most of a
training step's FLOPs: docs/performance.md has the measured cost.
"""

from configs import common
from mrcnn_jax.config import default_config


def get_config():
    c = default_config()
    common.detectron2_rcnn(c, depth=50)
    common.c4(c)
    return c
