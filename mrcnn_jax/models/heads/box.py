"""Box branch: the head (pooled RoI features -> a feature vector per RoI) and the predictor
(feature vector -> class logits and class-specific box deltas), as separate modules so that either
can be swapped (torchvision v2's 4conv1fc head, Cascade's per-stage predictors).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections


def torch_linear_init():
    # torch.nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class TwoMLPHead(nn.Module):
    """torchvision's TwoMLPHead (Detectron2's FastRCNNConvFCHead with NUM_FC 2): fc6, fc7 + ReLU.

    pooled [B, R, S, S, C] -> [B, R, fc_dim] in `dtype`. fc6 consumes the RoI features flattened
    in (y, x, c) order; converters permute torch's (c, y, x)-ordered fc6 weights accordingly.
    """
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, dtype: Any) -> 'TwoMLPHead':
        return cls(fc_dim=cfg.roi.fc_dim, dtype=dtype)

    @nn.compact
    def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
        b, r = pooled.shape[:2]
        x = pooled.reshape(b, r, -1).astype(self.dtype)
        x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, kernel_init=torch_linear_init(), name='fc6')(x))
        return nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, kernel_init=torch_linear_init(), name='fc7')(x))


class FastRCNNPredictor(nn.Module):
    """torchvision's FastRCNNPredictor: `cls_score` (K logits, background at 0) and class-specific
    `bbox_pred` (K x 4 deltas, the background's unused); with `class_agnostic` one box for all
    classes (Detectron2's CLS_AGNOSTIC_BBOX_REG, Cascade's stages).

    features [B, R, D] -> class_logits [B, R, K] float32, box_deltas [B, R, K or 1, 4] float32.
    """
    num_classes: int
    class_agnostic: bool = False
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, dtype: Any) -> 'FastRCNNPredictor':
        return cls(num_classes=cfg.num_classes, dtype=dtype)

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        b, r = x.shape[:2]
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                          name='cls_score')(x)
        boxes = 1 if self.class_agnostic else self.num_classes
        deltas = nn.Dense(boxes * 4, dtype=self.dtype, kernel_init=nn.initializers.normal(0.001),
                          name='bbox_pred')(x)
        return logits.astype(jnp.float32), deltas.astype(jnp.float32).reshape(b, r, boxes, 4)
