"""ResNet / ResNeXt backbones (NHWC) returning C2..C5.

Module and parameter names mirror torchvision's (`conv1`, `bn1`, `layer1/block0/conv2`, ...),
so the converter is a table, not a puzzle. Variants:
  * stride_in_1x1=False: stride on the 3x3 conv (torchvision "ResNet v1.5");
    True: stride on the first 1x1 (Detectron2 / MSRA "ResNet v1").
  * depth 18/34 use basic blocks (for fast tests and CPU training); 50/101/152 bottlenecks.
  * frozen_stages k: gradients stop after the stem (k >= 1) and after layer1..layer(k-1);
    the optimizer additionally masks those parameters (training/optimizer.py).
  * return_levels: the maps returned, C2..C5 for FPN; (4,) for the paper's C4 models, whose
    res5 runs per RoI in the box head (`Res5`, Detectron2's `Res5ROIHeads`): the backbone then
    builds no layer4.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.models.layers import PaddingMask, conv, make_norm

STAGE_BLOCKS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
    planes: int
    stride: int
    downsample: bool
    norm: str
    norm_eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x, mask: PaddingMask, in_stride: int):
        out_stride = in_stride * self.stride
        y = conv(self.planes, 3, self.stride, bias=False, dtype=self.dtype, name='conv1')(mask(x, in_stride))
        y = nn.relu(make_norm(self.norm, self.norm_eps, self.dtype, 'bn1')(y))
        y = conv(self.planes, 3, 1, bias=False, dtype=self.dtype, name='conv2')(mask(y, out_stride))
        y = make_norm(self.norm, self.norm_eps, self.dtype, 'bn2')(y)
        if self.downsample:
            x = conv(self.planes, 1, self.stride, bias=False, dtype=self.dtype, name='downsample_conv')(x)
            x = make_norm(self.norm, self.norm_eps, self.dtype, 'downsample_bn')(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    planes: int
    stride: int
    downsample: bool
    norm: str
    norm_eps: float
    dtype: Any
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    expansion: int = 4

    @nn.compact
    def __call__(self, x, mask: PaddingMask, in_stride: int):
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        y = conv(width, 1, s1, bias=False, dtype=self.dtype, name='conv1')(x)
        y = nn.relu(make_norm(self.norm, self.norm_eps, self.dtype, 'bn1')(y))
        y = conv(width, 3, s3, bias=False, dtype=self.dtype, name='conv2', groups=self.groups)(
            mask(y, in_stride * s1))
        y = nn.relu(make_norm(self.norm, self.norm_eps, self.dtype, 'bn2')(y))
        y = conv(self.planes * self.expansion, 1, 1, bias=False, dtype=self.dtype, name='conv3')(y)
        y = make_norm(self.norm, self.norm_eps, self.dtype, 'bn3')(y)
        if self.downsample:
            x = conv(self.planes * self.expansion, 1, self.stride, bias=False, dtype=self.dtype,
                     name='downsample_conv')(x)
            x = make_norm(self.norm, self.norm_eps, self.dtype, 'downsample_bn')(x)
        return nn.relu(y + x)


def make_block(kind: str, planes: int, stride: int, downsample: bool, norm: str, norm_eps: float, dtype: Any,
               *, groups: int, width_per_group: int, stride_in_1x1: bool, name: str) -> nn.Module:
    """A basic or bottleneck block (the backbone's stages and `Res5` build theirs alike)."""
    if kind == 'basic':
        return BasicBlock(planes, stride, downsample, norm, norm_eps, dtype, name=name)
    return Bottleneck(planes, stride, downsample, norm, norm_eps, dtype, groups=groups,
                      width_per_group=width_per_group, stride_in_1x1=stride_in_1x1, name=name)


class ResNet(nn.Module):
    """images [B, H, W, 3] -> [C2, C3, C4, C5] at strides 4, 8, 16, 32 (those `return_levels` names)."""
    depth: int = 50
    width: int = 64
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    norm: str = 'frozen_bn'
    norm_eps: float = 0.0
    frozen_stages: int = 2
    return_levels: tuple[int, ...] = (2, 3, 4, 5)
    dtype: Any = jnp.float32

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned map."""
        kind, _ = STAGE_BLOCKS[self.depth]
        exp = 4 if kind == 'bottleneck' else 1
        return [self.width * 2 ** (level - 2) * exp for level in self.return_levels]

    @nn.compact
    def __call__(self, x, mask: Optional[PaddingMask] = None):
        mask = mask or PaddingMask(None)
        kind, blocks = STAGE_BLOCKS[self.depth]
        x = x.astype(self.dtype)
        x = conv(self.width, 7, 2, bias=False, dtype=self.dtype, name='conv1')(mask(x, 1))
        x = nn.relu(make_norm(self.norm, self.norm_eps, self.dtype, 'bn1')(x))
        x = nn.max_pool(mask(x, 2), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.frozen_stages >= 1:
            x = jax.lax.stop_gradient(x)
        stride = 4
        in_ch = self.width
        outs = []
        for i, n in enumerate(blocks[:max(self.return_levels) - 1]):
            planes = self.width * 2 ** i
            for j in range(n):
                s = 2 if (j == 0 and i > 0) else 1
                out_ch = planes if kind == 'basic' else planes * 4
                block = make_block(kind, planes, s, j == 0 and (s != 1 or in_ch != out_ch), self.norm,
                                   self.norm_eps, self.dtype, groups=self.groups,
                                   width_per_group=self.width_per_group, stride_in_1x1=self.stride_in_1x1,
                                   name=f'layer{i + 1}_{j}')
                x = block(x, mask, stride)
                stride *= s
                in_ch = out_ch
            if self.frozen_stages >= i + 2:
                x = jax.lax.stop_gradient(x)
            if i + 2 in self.return_levels:
                outs.append(x)
        return outs


class Res5(nn.Module):
    """The last ResNet stage run on every RoI (the Mask R-CNN paper's C4 head; Detectron2's
    `Res5ROIHeads._build_res5_block`): the depth's res5 blocks, the first of stride 2 with a
    projection shortcut, planes 8 x the stem width (2048 outputs for R50+ with a stem of 64).
    ResNet-18/34 (basic blocks: not in Detectron2, whose res5 head is always bottlenecks) make
    small C4 models for CPU tests.

    pooled [B, R, S, S, C4] -> [B, R, S / 2, S / 2, C5]. RoI features have no padding, so no
    padding mask applies; parameters are trainable (Detectron2 freezes at most res2-res4 of
    the backbone)."""
    depth: int = 50
    width: int = 64
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    norm: str = 'frozen_bn'
    norm_eps: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
        kind, blocks = STAGE_BLOCKS[self.depth]
        b, r = pooled.shape[:2]
        x = pooled.reshape((b * r,) + pooled.shape[2:]).astype(self.dtype)
        mask = PaddingMask(None)
        for j in range(blocks[3]):
            x = make_block(kind, self.width * 8, 2 if j == 0 else 1, j == 0, self.norm, self.norm_eps, self.dtype,
                           groups=self.groups, width_per_group=self.width_per_group,
                           stride_in_1x1=self.stride_in_1x1, name=f'block{j}')(x, mask, 16)
        return x.reshape((b, r) + x.shape[1:])
