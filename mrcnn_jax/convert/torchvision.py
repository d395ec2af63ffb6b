"""torchvision Mask R-CNN / Faster R-CNN / Keypoint R-CNN state_dicts -> Flax variables of `MaskRCNN`.

```python
cfg_model = model_config_from_state_dict(sd)     # architecture read off the weights
variables = convert_state_dict(sd, cfg_model)    # {'params': ..., 'frozen': ...}
```
Conventions:
  * conv weights OIHW -> HWIO; Linear [out, in] -> Dense [in, out];
  * fc6 consumes torch's (c, y, x)-flattened 7x7 RoI features; ours are (y, x, c), so its input
    rows are permuted;
  * ConvTranspose2d weight [in, out, kh, kw] -> [kh, kw, in, out];
  * BatchNorm / FrozenBatchNorm2d buffers go to the 'frozen' collection; `num_batches_tracked`
    is dropped;
  * both current key names and the legacy ones (torchvision < 0.13: `fpn.inner_blocks.0.weight`,
    `rpn.head.conv.weight`, `mask_head.mask_fcn1.weight`) are accepted, as are checkpoints that
    wrap the state_dict (`{'model': ...}`) or carry DDP's `module.` prefix.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from mrcnn_jax.config import default_model_config
from mrcnn_jax.convert.common import StateDictError, map_state_dict  # noqa: F401 (re-exported)


def load_state_dict(path_or_sd: Any) -> dict[str, np.ndarray]:
    """A .pth path, a (possibly wrapped) state_dict of torch tensors or numpy arrays -> {key: np.ndarray}."""
    sd = path_or_sd
    if isinstance(sd, (str, bytes)) or hasattr(sd, '__fspath__'):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError('reading a .pth file needs PyTorch: pip install "mrcnn-jax[torch]"') from e
        sd = torch.load(sd, map_location='cpu', weights_only=True)
    for wrapper in ('model', 'state_dict', 'model_state_dict'):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise StateDictError(f'expected a state_dict (a mapping of names to tensors), got {type(sd).__name__}')
    out = {}
    for k, v in sd.items():
        k = k[len('module.'):] if k.startswith('module.') else k
        if k.endswith('num_batches_tracked'):
            continue
        if hasattr(v, 'detach'):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return _rename_legacy(out)


_LEGACY = [
    (re.compile(r'^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$'), r'backbone.fpn.\1.\2.0.\3'),
    (re.compile(r'^rpn\.head\.conv\.(weight|bias)$'), r'rpn.head.conv.0.0.\1'),
    (re.compile(r'^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$'), None),
]


def _rename_legacy(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        for pat, repl in _LEGACY:
            m = pat.match(k)
            if m:
                if repl is None:   # mask_fcn{i+1} -> {i}.0
                    k = f'roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}'
                else:
                    k = pat.sub(repl, k)
                break
        out[k] = v
    return out


def _need(sd: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """sd[key] for reading the architecture; a missing key is a StateDictError naming it."""
    if key not in sd:
        raise StateDictError(f'state_dict does not match the model:\n  missing keys (1): {key} '
                             '(needed to read the architecture)')
    return sd[key]


def model_config_from_state_dict(sd: Mapping[str, np.ndarray]) -> ml_collections.ConfigDict:
    """The `config.model` that this state_dict's architecture needs (torchvision conventions)."""
    if 'backbone.body.conv1.weight' not in sd or 'roi_heads.box_predictor.cls_score.weight' not in sd:
        raise StateDictError('not a torchvision Mask R-CNN / Faster R-CNN state_dict: missing '
                             "'backbone.body.conv1.weight' or 'roi_heads.box_predictor.cls_score.weight'")
    cfg = default_model_config()
    bottleneck = 'backbone.body.layer1.0.conv3.weight' in sd
    blocks = []
    for i in range(1, 5):
        ids = {int(m.group(1)) for k in sd for m in [re.match(rf'backbone\.body\.layer{i}\.(\d+)\.', k)] if m}
        blocks.append(len(ids))
    table = {('basic', (2, 2, 2, 2)): 18, ('basic', (3, 4, 6, 3)): 34, ('bottleneck', (3, 4, 6, 3)): 50,
             ('bottleneck', (3, 4, 23, 3)): 101, ('bottleneck', (3, 8, 36, 3)): 152}
    key = ('bottleneck' if bottleneck else 'basic', tuple(blocks))
    if key not in table:
        raise StateDictError(f'unsupported ResNet layout: {key[0]} blocks {key[1]}')
    cfg.backbone.depth = table[key]
    cfg.backbone.width = int(_need(sd, 'backbone.body.conv1.weight').shape[0])
    if bottleneck:
        w2 = _need(sd, 'backbone.body.layer1.0.conv2.weight')   # [width, width / groups, 3, 3]
        width = w2.shape[0]
        groups = width // w2.shape[1]
        cfg.backbone.groups = groups
        cfg.backbone.width_per_group = int(width * 64 // (cfg.backbone.width * groups))
    cfg.num_classes = int(_need(sd, 'roi_heads.box_predictor.cls_score.weight').shape[0])
    cfg.fpn.channels = int(_need(sd, 'backbone.fpn.inner_blocks.0.0.weight').shape[0])
    cfg.roi.fc_dim = int(_need(sd, 'roi_heads.box_head.fc6.weight').shape[0])
    cfg.mask_on = 'roi_heads.mask_predictor.mask_fcn_logits.weight' in sd
    cfg.keypoint_on = 'roi_heads.keypoint_predictor.kps_score_lowres.weight' in sd
    num_anchors = int(_need(sd, 'rpn.head.cls_logits.weight').shape[0])
    if num_anchors != len(cfg.anchors.aspect_ratios):
        raise StateDictError(f'rpn.head.cls_logits has {num_anchors} anchors per location; '
                             f'expected {len(cfg.anchors.aspect_ratios)} (one size x 3 ratios)')
    if cfg.mask_on:
        n = len({k.split('.')[2] for k in sd if k.startswith('roi_heads.mask_head.')})
        cfg.roi.mask_head_convs = n
        cfg.roi.mask_head_channels = int(_need(sd, 'roi_heads.mask_head.0.0.weight').shape[0])
    if cfg.keypoint_on:   # keypointrcnn_resnet50_fpn: KeypointRCNNHeads is Sequential(conv, ReLU, ...)
        cfg.num_keypoints = int(sd['roi_heads.keypoint_predictor.kps_score_lowres.weight'].shape[1])
        convs = sorted({int(k.split('.')[2]) for k in sd if k.startswith('roi_heads.keypoint_head.')})
        cfg.roi.keypoint_head_convs = len(convs)
        cfg.roi.keypoint_head_channels = int(_need(sd, 'roi_heads.keypoint_head.0.weight').shape[0])
    return cfg


def _conv(w):  # OIHW -> HWIO
    return np.transpose(w, (2, 3, 1, 0))


def _expected_torch_keys(cfg: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """torch key -> (collection, *flax path). Shapes are checked against the Flax model."""
    from mrcnn_jax.models.resnet import STAGE_BLOCKS
    m: dict[str, tuple[str, ...]] = {}
    kind, blocks = STAGE_BLOCKS[cfg.backbone.depth]

    def bn(tprefix, fpath):
        for n in ('weight', 'bias', 'running_mean', 'running_var'):
            m[f'{tprefix}.{n}'] = ('frozen',) + fpath + (n,)

    m['backbone.body.conv1.weight'] = ('params', 'backbone', 'conv1', 'kernel')
    bn('backbone.body.bn1', ('backbone', 'bn1'))
    convs = ('conv1', 'conv2', 'conv3') if kind == 'bottleneck' else ('conv1', 'conv2')
    for i, n in enumerate(blocks):
        for j in range(n):
            tp = f'backbone.body.layer{i + 1}.{j}'
            fp = ('backbone', f'layer{i + 1}_{j}')
            for c in convs:
                m[f'{tp}.{c}.weight'] = ('params',) + fp + (c, 'kernel')
                bn(f'{tp}.bn{c[-1]}', fp + (f'bn{c[-1]}',))
            # torchvision adds a projection where stride != 1 or channels change.
            if j == 0 and (i > 0 or kind == 'bottleneck'):
                m[f'{tp}.downsample.0.weight'] = ('params',) + fp + ('downsample_conv', 'kernel')
                bn(f'{tp}.downsample.1', fp + ('downsample_bn',))
    for i in range(4):
        for t, f in (('inner_blocks', 'inner'), ('layer_blocks', 'layer')):
            m[f'backbone.fpn.{t}.{i}.0.weight'] = ('params', 'fpn', f'{f}{i}', 'kernel')
            m[f'backbone.fpn.{t}.{i}.0.bias'] = ('params', 'fpn', f'{f}{i}', 'bias')
    for t, f in (('conv.0.0', 'conv'), ('cls_logits', 'cls_logits'), ('bbox_pred', 'bbox_pred')):
        m[f'rpn.head.{t}.weight'] = ('params', 'rpn_head', f, 'kernel')
        m[f'rpn.head.{t}.bias'] = ('params', 'rpn_head', f, 'bias')
    # torchvision's roi_heads.{box_head, box_predictor, mask_head + mask_predictor} map onto our
    # roi_heads.{box_head, box_predictor, mask_head} (one mask module, as Detectron2's).
    for t, f in (('box_head.fc6', ('box_head', 'fc6')), ('box_head.fc7', ('box_head', 'fc7')),
                 ('box_predictor.cls_score', ('box_predictor', 'cls_score')),
                 ('box_predictor.bbox_pred', ('box_predictor', 'bbox_pred'))):
        m[f'roi_heads.{t}.weight'] = ('params', 'roi_heads') + f + ('kernel',)
        m[f'roi_heads.{t}.bias'] = ('params', 'roi_heads') + f + ('bias',)
    if cfg.mask_on:
        mask = ('params', 'roi_heads', 'mask_head')
        for i in range(cfg.roi.mask_head_convs):
            m[f'roi_heads.mask_head.{i}.0.weight'] = mask + (f'mask_fcn{i + 1}', 'kernel')
            m[f'roi_heads.mask_head.{i}.0.bias'] = mask + (f'mask_fcn{i + 1}', 'bias')
        m['roi_heads.mask_predictor.conv5_mask.weight'] = mask + ('conv5_mask_kernel',)
        m['roi_heads.mask_predictor.conv5_mask.bias'] = mask + ('conv5_mask_bias',)
        m['roi_heads.mask_predictor.mask_fcn_logits.weight'] = mask + ('mask_fcn_logits_kernel',)
        m['roi_heads.mask_predictor.mask_fcn_logits.bias'] = mask + ('mask_fcn_logits_bias',)
    if cfg.keypoint_on:
        kp = ('params', 'roi_heads', 'keypoint_head')
        for i in range(cfg.roi.keypoint_head_convs):   # Sequential indices 0, 2, 4, ... (ReLUs between)
            m[f'roi_heads.keypoint_head.{2 * i}.weight'] = kp + (f'conv_fcn{i + 1}', 'kernel')
            m[f'roi_heads.keypoint_head.{2 * i}.bias'] = kp + (f'conv_fcn{i + 1}', 'bias')
        m['roi_heads.keypoint_predictor.kps_score_lowres.weight'] = kp + ('score_lowres_kernel',)
        m['roi_heads.keypoint_predictor.kps_score_lowres.bias'] = kp + ('score_lowres_bias',)
    return m


def _to_flax(key: str, v: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
    v = np.asarray(v, np.float32)
    if key.endswith('conv5_mask.weight') or key.endswith('score_lowres.weight'):   # ConvTranspose2d
        return np.transpose(v, (2, 3, 0, 1))
    if key.endswith('mask_fcn_logits.weight'):
        return v[:, :, 0, 0].T
    if key.endswith('fc6.weight'):
        # torch flattens RoI features as (c, y, x); ours are (y, x, c).
        out_dim, in_dim = v.shape
        c, size = cfg.fpn.channels, cfg.roi.box_pool_size
        if in_dim != c * size * size:
            raise StateDictError(f'{key}: {in_dim} inputs, expected {c} x {size} x {size}')
        return v.reshape(out_dim, c, size, size).transpose(2, 3, 1, 0).reshape(size * size * c, out_dim)
    if v.ndim == 4:
        return _conv(v)
    if v.ndim == 2:
        return v.T
    return v


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict,
                       expected: Any = None) -> dict:
    """Map a torchvision state_dict onto the Flax variables of `build_model(cfg)`.

    expected: the model's variable shapes (e.g. from jax.eval_shape of init); computed when None.
    Raises StateDictError naming every missing, unexpected and mis-shaped key.
    """
    from mrcnn_jax.models.mask_rcnn import abstract_variables

    if expected is None:
        expected = abstract_variables(cfg)
    return map_state_dict(sd, _expected_torch_keys(cfg), lambda key, v: _to_flax(key, v, cfg), expected,
                          'state_dict')
