"""ResNet / ResNeXt backbones: depths and block layouts (eval_shape), where the stride sits,
ResNeXt widths, frozen stages stopping gradients, and a ResNeXt FPN backbone converted from
torchvision equal to torchvision's features."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from model_helpers import flat, random_variables
from mrcnn_jax.models.mask_rcnn import MaskRCNN, build_model
from mrcnn_jax.models.resnet import ResNet


def _resnet_shapes(depth, **kw):
    net = ResNet(depth=depth, **kw)
    x = jax.ShapeDtypeStruct((1, 224, 320, 3), jnp.float32)
    variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
    outs, state = jax.eval_shape(lambda v, x: net.apply(v, x, capture_intermediates=True,
                                                        mutable=['intermediates']), variables, x)
    return net, variables, outs, state['intermediates']


@pytest.mark.parametrize('depth, channels, blocks', [
    (18, (64, 128, 256, 512), (2, 2, 2, 2)),
    (34, (64, 128, 256, 512), (3, 4, 6, 3)),
    (50, (256, 512, 1024, 2048), (3, 4, 6, 3)),
    (101, (256, 512, 1024, 2048), (3, 4, 23, 3)),
])
def test_resnet_depths(depth, channels, blocks):
    net, variables, outs, _ = _resnet_shapes(depth)
    assert [o.shape for o in outs] == [(1, 56, 80, channels[0]), (1, 28, 40, channels[1]),
                                       (1, 14, 20, channels[2]), (1, 7, 10, channels[3])]
    assert list(net.out_channels) == list(channels)
    names = set(variables['params'])
    for i, n in enumerate(blocks):
        assert f'layer{i + 1}_{n - 1}' in names and f'layer{i + 1}_{n}' not in names
    # FrozenBN statistics live outside 'params'.
    assert 'bn1' in variables['frozen'] and 'bn1' not in variables['params']


@pytest.mark.parametrize('stride_in_1x1', [False, True])
def test_resnet_stride_in_1x1(stride_in_1x1):
    _, _, outs, inter = _resnet_shapes(50, stride_in_1x1=stride_in_1x1)
    assert [o.shape[1:3] for o in outs] == [(56, 80), (28, 40), (14, 20), (7, 10)]
    for layer, (h, w) in (('layer2_0', (56, 80)), ('layer3_0', (28, 40)), ('layer4_0', (14, 20))):
        conv1 = inter[layer]['conv1']['__call__'][0].shape
        conv2 = inter[layer]['conv2']['__call__'][0].shape
        if stride_in_1x1:   # MSRA / Detectron2: the first 1x1 strides
            assert conv1[1:3] == (h // 2, w // 2) and conv2[1:3] == (h // 2, w // 2)
        else:               # torchvision v1.5: the 3x3 strides
            assert conv1[1:3] == (h, w) and conv2[1:3] == (h // 2, w // 2)


def test_resnext_shapes():
    _, variables, outs, _ = _resnet_shapes(50, groups=32, width_per_group=4)
    assert [o.shape[-1] for o in outs] == [256, 512, 1024, 2048]
    p = variables['params']
    assert p['layer1_0']['conv2']['kernel'].shape == (3, 3, 4, 128)     # 32 groups of 4 channels
    assert p['layer4_0']['conv2']['kernel'].shape == (3, 3, 32, 1024)


def _stage_grad_norms(nets, variables, x):
    """Per net, sum |d loss / d param| by stage (stem, layer1..4); one compilation for all nets."""
    def loss(net, params):
        outs = net.apply({**variables, 'params': params}, x)
        return sum(jnp.sum(o * jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))) for o in outs)
    grads = jax.jit(lambda p: [jax.grad(functools.partial(loss, n))(p) for n in nets])(variables['params'])
    result = []
    for g in grads:
        norms = {}
        for k, v in flat(g).items():
            top = k.split('/')[0]
            stage = top.split('_')[0] if top.startswith('layer') else 'stem'
            norms[stage] = norms.get(stage, 0.0) + float(jnp.sum(jnp.abs(v)))
        result.append(norms)
    return result


@pytest.mark.parametrize('norm', ['gn', 'frozen_bn'])
def test_frozen_stages_stop_gradients(norm):
    """frozen_stages k: the stem (k >= 1) and layer1..layer(k-1) get exactly zero gradient, the
    rest a non-zero one (GroupNorm's scale / bias included; FrozenBN has no params at all)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
    order = ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
    variables = random_variables(ResNet(depth=18, width=8, norm=norm), x)
    if norm == 'gn':
        assert 'gn' in variables['params']['bn1'] and 'gn' in variables['params']['layer1_0']['bn1']
    else:
        assert 'frozen' in variables and 'bn1' not in variables['params']
    frozen = (1, 3)
    nets = [ResNet(depth=18, width=8, norm=norm, frozen_stages=k) for k in frozen]
    for k, norms in zip(frozen, _stage_grad_norms(nets, variables, x)):
        assert set(norms) == set(order)
        for i, stage in enumerate(order):
            if i < k:
                assert norms[stage] == 0.0, (k, stage)
            else:
                assert norms[stage] > 0.0, (k, stage)


def test_resnext_backbone_matches_torchvision():
    torch = pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    from torchvision.models.detection import MaskRCNN as TVMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import misc as misc_nn_ops

    from mrcnn_jax.convert import torchvision as tv_convert

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    backbone = resnet_fpn_backbone(backbone_name='resnext50_32x4d', weights=None, trainable_layers=3)
    tv_model = TVMaskRCNN(backbone, num_classes=91).eval()
    x = torch.rand(1, 3, 128, 160, generator=gen)

    def calibrate(m, args):   # non-trivial frozen-BN statistics from the layer's own input
        inp = args[0]
        c = inp.shape[1]
        m.running_mean.copy_(inp.mean(dim=(0, 2, 3)) + 0.1 * torch.randn(c, generator=gen))
        m.running_var.copy_(inp.var(dim=(0, 2, 3)) * (0.8 + 0.4 * torch.rand(c, generator=gen)) + 1e-3)
        m.weight.copy_(0.5 + torch.rand(c, generator=gen))
        m.bias.copy_(0.2 * torch.randn(c, generator=gen))
    with torch.no_grad():
        hooks = [m.register_forward_pre_hook(calibrate) for m in tv_model.modules()
                 if isinstance(m, misc_nn_ops.FrozenBatchNorm2d)]
        tv_model.backbone.body(x)
        for h in hooks:
            h.remove()
        ref = tv_model.backbone(x)

    sd = tv_convert.load_state_dict(tv_model.state_dict())
    cfg_model = tv_convert.model_config_from_state_dict(sd)
    assert (cfg_model.backbone.depth, cfg_model.backbone.groups, cfg_model.backbone.width_per_group) == (50, 32, 4)
    cfg_model.backbone.norm_eps = 1e-5          # torchvision's FrozenBatchNorm2d default
    variables = tv_convert.convert_state_dict(sd, cfg_model)
    model = build_model(cfg_model)
    images = jnp.asarray(x[0].permute(1, 2, 0).numpy()[None])
    info = jnp.asarray([[128, 160, 128, 160, 1, 1]], jnp.float32)
    feats = model.apply(variables, images, info, method=MaskRCNN.features)
    for key, ours in zip(['0', '1', '2', '3', 'pool'], feats):
        theirs = ref[key][0].permute(1, 2, 0).numpy()
        assert ours.shape[1:] == theirs.shape
        rel = float(np.abs(np.asarray(ours[0]) - theirs).max() / np.abs(theirs).max())
        assert rel < 1e-4, (key, rel)
