"""Mask R-CNN R50-FPN with torchvision's conventions (`maskrcnn_resnet50_fpn`, v1 COCO weights).

Evaluate converted torchvision weights with it (`mrcnn-jax convert` writes this config), or
fine-tune: `mrcnn-jax train --config configs/maskrcnn_r50_fpn_torchvision.py --workdir W
--config.train.init_from=converted/`. The 1x schedule of torchvision's references: 26 epochs at
batch 16 would be ~190k steps; Detectron2's 1x is 90k steps at batch 16 (the default here).
"""

from mrcnn_jax.config import default_config


def get_config():
    c = default_config()
    c.model.backbone.depth = 50
    c.model.backbone.norm_eps = 0.0
    c.model.backbone.frozen_stages = 2        # torchvision trainable_backbone_layers=3
    c.data.source = 'coco_json'
    c.data.canvas = (1344, 1344)
    c.data.buckets = ((832, 1344), (1344, 832))
    c.data.min_size = (800,)
    c.data.max_size = 1333
    c.train.batch_size = 16
    c.train.steps = 90000
    c.train.decay_steps = (60000, 80000)
    return c
