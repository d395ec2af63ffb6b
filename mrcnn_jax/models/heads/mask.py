"""Mask branch: pooled RoI features and each RoI's class -> that class's mask logits."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mrcnn_jax.models.layers import conv, conv_kernel_init


class MaskRCNNHead(nn.Module):
    """torchvision's MaskRCNNHeads (n x conv3x3 + ReLU) + MaskRCNNPredictor (2x2 stride-2 deconv +
    ReLU, 1x1 per-class logits); Detectron2's MaskRCNNConvUpsampleHead is the same network.

    pooled [B, R, S, S, C], classes [B, R] int -> mask logits [B, R, 2S, 2S] float32 of each RoI's
    class channel only (the per-class 1x1 conv is evaluated for that one class).
    """
    num_classes: int
    num_convs: int = 4
    channels: int = 256
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, dtype: Any) -> 'MaskRCNNHead':
        return cls(num_classes=cfg.num_classes, num_convs=cfg.roi.mask_head_convs,
                   channels=cfg.roi.mask_head_channels, dtype=dtype)

    @nn.compact
    def __call__(self, pooled: jnp.ndarray, classes: jnp.ndarray) -> jnp.ndarray:
        b, r, s = pooled.shape[:3]
        x = pooled.reshape((b * r,) + pooled.shape[2:]).astype(self.dtype)
        for i in range(self.num_convs):
            x = nn.relu(conv(self.channels, 3, bias=True, dtype=self.dtype, name=f'mask_fcn{i + 1}')(x))
        # ConvTranspose2d(k=2, s=2): each input pixel writes a disjoint 2x2 output block,
        # y[2i+u, 2j+v, o] = sum_c x[i, j, c] W[u, v, c, o] + b[o]; exact as an einsum. Everything
        # after it (bias, ReLU, the class's 1x1 logits) is per pixel, so it stays in the dot's own
        # [n, i, j, u, v, o] order and only the one-channel logits are interleaved to (2i+u, 2j+v):
        # a transpose of 1/channels of the data, forward and backward (the 256-channel transpose
        # was ~1 s of a CPU train step).
        c = x.shape[-1]
        wt = self.param('conv5_mask_kernel', conv_kernel_init('fan_out'), (2, 2, c, self.channels))
        bt = self.param('conv5_mask_bias', nn.initializers.zeros, (self.channels,))
        x = jnp.einsum('nhwc,uvco->nhwuvo', x, wt.astype(self.dtype)) + bt.astype(self.dtype)
        x = nn.relu(x)
        wl = self.param('mask_fcn_logits_kernel', conv_kernel_init('fan_out'), (self.channels, self.num_classes))
        bl = self.param('mask_fcn_logits_bias', nn.initializers.zeros, (self.num_classes,))
        cls = classes.reshape(b * r).astype(jnp.int32)
        w_sel = jnp.take(wl, cls, axis=1).T.astype(self.dtype)             # [BR, channels]
        logits = jnp.einsum('nhwuvc,nc->nhwuv', x, w_sel).astype(jnp.float32)
        logits = logits + jnp.take(bl, cls)[:, None, None, None, None]
        return logits.transpose(0, 1, 3, 2, 4).reshape(b, r, 2 * s, 2 * s)
