"""Small building blocks shared by the backbone and heads: frozen BN, padding masks, convs.

Padding masks. torchvision pads each image only up to a multiple of 32 and its convolutions
see zeros (or -inf for max-pool) beyond that tensor. On our larger static canvas the
activations beyond an image's padded region are not zero after the first conv (biases, BN
shifts), so a 3x3 conv at the region's edge would read them. Zeroing the input of every spatial
op outside the region (`PaddingMask`) makes every value inside the region equal to torchvision's,
whatever the canvas. Max-pool follows a ReLU, so zero fill equals its -inf padding there.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops import conv as conv_ops

Dtype = Any


def conv_kernel_init(mode: str = 'fan_out'):
    """Kaiming normal for ReLU nets (torchvision ResNet / mask head use fan_out)."""
    return nn.initializers.variance_scaling(2.0, mode, 'normal')


class FrozenBatchNorm(nn.Module):
    """y = x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps)), constants not trained.

    The four statistics live in the 'frozen' collection (not 'params'), like torchvision's
    FrozenBatchNorm2d buffers, so optimizers never see them. torchvision's v1 COCO detection
    weights are evaluated with eps = 0.
    """
    eps: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        w = self.variable('frozen', 'weight', lambda: jnp.ones((c,), jnp.float32)).value
        b = self.variable('frozen', 'bias', lambda: jnp.zeros((c,), jnp.float32)).value
        mean = self.variable('frozen', 'running_mean', lambda: jnp.zeros((c,), jnp.float32)).value
        var = self.variable('frozen', 'running_var', lambda: jnp.ones((c,), jnp.float32)).value
        scale = w * jax.lax.rsqrt(var + self.eps)
        bias = b - mean * scale
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def make_norm(kind: str, eps: float, dtype: Dtype, name: str) -> nn.Module:
    """'frozen_bn' (converted weights) or 'gn' (GroupNorm(32), for training from scratch)."""
    if kind == 'frozen_bn':
        return FrozenBatchNorm(eps=eps, dtype=dtype, name=name)
    if kind == 'gn':
        return GroupNorm32(dtype=dtype, name=name)
    raise ValueError(f'unknown norm {kind!r}')


class GroupNorm32(nn.Module):
    """GroupNorm with 32 groups, or fewer for narrow layers (groups must divide channels)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        groups = 32
        while c % groups:
            groups //= 2
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, name='gn')(x)


def conv(features: int, kernel: int, stride: int = 1, *, bias: bool, dtype: Dtype, name: str,
         groups: int = 1, kernel_init=None) -> nn.Conv:
    """A PyTorch-style conv: symmetric padding kernel // 2 (never 'SAME', which pads
    asymmetrically for stride 2), NHWC, HWIO kernel, f32 params. On CPU its kernel gradient is
    computed as matmuls (`ops.conv`), several times faster than XLA:CPU's own."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=bias, feature_group_count=groups, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kernel_init or conv_kernel_init(), name=name,
                   conv_general_dilated=conv_ops.conv_general_dilated)


class PaddingMask:
    """Per-stride [B, H, W, 1] masks of each image's padded region on the static canvas.

    pad_hw: [B, 2] int32 padded size of each image (resized size rounded up to a multiple of
    `size_divisible`), or None to disable masking. Level with stride 2^k spans ceil(pad / 2^k).
    """

    def __init__(self, pad_hw: Optional[jnp.ndarray]):
        self.pad_hw = pad_hw
        self._cache = {}

    def region_hw(self, stride: int) -> Optional[jnp.ndarray]:
        """[B, 2] int32 size of the valid region at this stride (None when masking is off)."""
        if self.pad_hw is None:
            return None
        n = self.pad_hw.astype(jnp.int32)
        s = 1
        while s < stride:
            n = (n + 1) // 2
            s *= 2
        return n

    def __call__(self, x: jnp.ndarray, stride: int) -> jnp.ndarray:
        """Zero x [B, H, W, C] outside each image's region at this stride."""
        if self.pad_hw is None:
            return x
        key = (stride, x.shape[1], x.shape[2])
        if key not in self._cache:
            hw = self.region_hw(stride)
            iy = jnp.arange(x.shape[1])
            ix = jnp.arange(x.shape[2])
            m = (iy[None, :, None] < hw[:, 0, None, None]) & (ix[None, None, :] < hw[:, 1, None, None])
            self._cache[key] = m[..., None]
        return jnp.where(self._cache[key], x, jnp.zeros((), x.dtype))


def padded_size(resized_hw: jnp.ndarray, size_divisible: int) -> jnp.ndarray:
    """[..., 2] resized (valid) size -> size rounded up to a multiple of size_divisible (int32),
    as torchvision's GeneralizedRCNNTransform.batch_images does for one image."""
    r = jnp.ceil(resized_hw.astype(jnp.float32) / size_divisible) * size_divisible
    return r.astype(jnp.int32)


def np_padded_size(resized_hw, size_divisible: int) -> np.ndarray:
    """Host-side twin of padded_size, for choosing canvases."""
    r = np.asarray(resized_hw)
    return (np.ceil(r / size_divisible) * size_divisible).astype(np.int64)
