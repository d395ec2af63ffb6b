"""Feature Pyramid Network: C2..C5 -> P2..P6 (torchvision FeaturePyramidNetwork + LastLevelMaxPool)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.models.layers import PaddingMask, conv

# torchvision: kaiming_uniform_(a=1), bias 0.
_FPN_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def upsample_nearest(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
    """F.interpolate(mode='nearest') to a static size: src = floor(dst * in / out)."""
    h, w = x.shape[1:3]
    oh, ow = out_hw
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    iy = jnp.floor(jnp.arange(oh, dtype=jnp.float32) * jnp.float32(h / oh)).astype(jnp.int32)
    ix = jnp.floor(jnp.arange(ow, dtype=jnp.float32) * jnp.float32(w / ow)).astype(jnp.int32)
    return x[:, jnp.minimum(iy, h - 1)][:, :, jnp.minimum(ix, w - 1)]


class FPN(nn.Module):
    """[C2..C5] (strides 4..32) -> [P2, P3, P4, P5, P6], each `channels` wide.

    P6 is max-pool(kernel 1, stride 2) of P5's output, i.e. P5[:, ::2, ::2] (torchvision's
    LastLevelMaxPool; Detectron2's LastLevelMaxPool is the same op).
    """
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jnp.ndarray], mask: Optional[PaddingMask] = None):
        mask = mask or PaddingMask(None)
        n = len(feats)
        strides = [4 * 2 ** i for i in range(n)]
        inner = [conv(self.channels, 1, bias=True, dtype=self.dtype, name=f'inner{i}',
                      kernel_init=_FPN_INIT) for i in range(n)]
        layer = [conv(self.channels, 3, bias=True, dtype=self.dtype, name=f'layer{i}',
                      kernel_init=_FPN_INIT) for i in range(n)]
        last = inner[-1](feats[-1])
        results = [layer[-1](mask(last, strides[-1]))]
        for i in range(n - 2, -1, -1):
            lateral = inner[i](feats[i])
            last = lateral + upsample_nearest(last, lateral.shape[1:3])
            results.insert(0, layer[i](mask(last, strides[i])))
        results.append(results[-1][:, ::2, ::2])
        return results
