"""Pluggable RoI heads: each kind of head is a module registered under a config value.

    model.roi.box_head = '2fc'                 # BOX_HEADS
    model.roi.box_predictor = 'fast_rcnn'      # BOX_PREDICTORS
    model.roi.mask_head = 'conv_upsample'      # MASK_HEADS (used when model.mask_on)
    model.roi.keypoint_head = 'conv_deconv_upsample'   # KEYPOINT_HEADS (when model.keypoint_on)

A new head is a new module with a `from_config(cfg_model, dtype)` classmethod and one line in a
table below (plus config fields under `model.roi` for its own sizes, if it has any);
`build_model` composes the heads the config names, and `MaskRCNN` does not change. A converter
that loads weights into it maps the reference's names onto the module's.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mrcnn_jax.models.heads.box import FastRCNNPredictor, TwoMLPHead
from mrcnn_jax.models.heads.keypoint import KeypointRCNNHead
from mrcnn_jax.models.heads.mask import MaskRCNNHead

BOX_HEADS = {'2fc': TwoMLPHead}
BOX_PREDICTORS = {'fast_rcnn': FastRCNNPredictor}
MASK_HEADS = {'conv_upsample': MaskRCNNHead}
KEYPOINT_HEADS = {'conv_deconv_upsample': KeypointRCNNHead}

_TABLES = {'box_head': BOX_HEADS, 'box_predictor': BOX_PREDICTORS, 'mask_head': MASK_HEADS,
           'keypoint_head': KEYPOINT_HEADS}


def build_head(kind: str, cfg: ml_collections.ConfigDict, dtype: Any):
    """The `kind` head ('box_head', 'box_predictor', 'mask_head', 'keypoint_head') that `cfg.roi.<kind>` names."""
    table = _TABLES[kind]
    name = cfg.roi[kind]
    if name not in table:
        raise ValueError(f'unknown model.roi.{kind} {name!r} (known: {", ".join(sorted(table))})')
    return table[name].from_config(cfg, dtype)
