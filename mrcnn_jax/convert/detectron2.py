"""Detectron2 checkpoints (model-zoo `.pkl`, training `.pth`) + their yaml config -> our config and
Flax variables.

```python
cfg, info = config_from_yaml('mask_rcnn_R_50_FPN_3x.yaml')   # the architecture and its settings
sd = load_checkpoint('model_final_f10217.pkl')                # {name: numpy array}
variables = convert_state_dict(sd, cfg.model)                 # {'params': ..., 'frozen': ...}
```
`Predictor.from_detectron2(checkpoint, config_file=...)` does all three; `mrcnn-jax convert --from
detectron2 CKPT --config-file YAML OUT` writes a model directory.

The config is read by `convert/detectron2_config.py` (re-exported here). The weights: Detectron2's
key names map one to one onto ours (`_expected_keys`); the layouts differ where the conventions
say so:
  * conv OIHW -> HWIO, Linear [out, in] -> [in, out], ConvTranspose [in, out, kh, kw] -> HWIO;
    `box_head.fc1` reads (c, y, x)-flattened RoI features, ours are (y, x, c);
  * classes (`Conventions.class_layout`): Detectron2's classifier has K + 1 rows with the
    background LAST, its class-specific box regression K * 4 rows and its mask predictor K
    channels, both without a background. Our model always has the background at index 0
    (num_classes = K + 1): the classifier rows are rotated (ours[0] = theirs[K], ours[1 + i] =
    theirs[i]) and the box and mask predictors get a zero background slot at index 0, which is
    never read (detection drops class 0). Softmax is invariant to the permutation, so scores
    are Detectron2's;
  * FrozenBatchNorm2d buffers go to the 'frozen' collection (eps 1e-5: `backbone.norm_eps`);
  * C4 (`Res5ROIHeads`): the backbone's keys have no `bottom_up.` and stop at res4; res5 is
    `roi_heads.res5.*` (our `roi_heads/res5/block{j}`). Cascade: stage k's `box_head.{k}` and
    `box_predictor.{k}` are our `box_heads_{k}` / `box_predictors_{k}`; its regression is
    class-agnostic (4 rows, no background slot to add);
  * Keypoint R-CNN (`KRCNNConvDeconvUpsampleHead`): `roi_heads.keypoint_head.conv_fcn{i}` are our
    `keypoint_head/conv_fcn{i}`, its ConvTranspose2d `score_lowres` our `score_lowres_kernel` /
    `_bias` (no class dimension: keypoints are per RoI, whatever its class).
"""

from __future__ import annotations

import pathlib
import pickle
import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from mrcnn_jax.convert.common import StateDictError, map_state_dict
from mrcnn_jax.convert.detectron2_config import (  # noqa: F401 (the public API, re-exported)
    Detectron2ConfigError, coco_labels, config_from_yaml, config_with_overrides, is_coco_split)

__all__ = ['Detectron2ConfigError', 'StateDictError', 'config_from_yaml', 'config_with_overrides',
           'load_checkpoint', 'convert_state_dict', 'coco_labels']

# -- the checkpoint ----------------------------------------------------------------------------

def load_checkpoint(path_or_sd: Any) -> dict[str, np.ndarray]:
    """A model-zoo .pkl, a Detectron2 .pth (`{'model': state_dict, ...}`) or a state_dict ->
    {name: float32 numpy array}. Raises StateDictError for a Caffe2 / Detectron1 pickle and for
    files that are not Detectron2 checkpoints."""
    src = str(path_or_sd) if isinstance(path_or_sd, (str, pathlib.Path)) else 'state_dict'
    data = path_or_sd
    if isinstance(path_or_sd, (str, pathlib.Path)):
        path = pathlib.Path(path_or_sd)
        if not path.is_file():
            raise FileNotFoundError(f'{path}: checkpoint not found')
        if path.suffix == '.pkl':
            try:
                with open(path, 'rb') as f:
                    data = pickle.load(f, encoding='latin1')
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                raise StateDictError(f'{path}: not a pickle file ({e})') from None
        else:
            try:
                import torch
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ImportError('reading a .pth file needs PyTorch: pip install torch') from e
            try:
                data = torch.load(path, map_location='cpu', weights_only=True)
            except Exception as e:   # torch raises many types for a file that is not a checkpoint
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise StateDictError(f'{path}: not a PyTorch checkpoint ({first})') from None
    if not isinstance(data, Mapping):
        raise StateDictError(f'{src}: expected a Detectron2 checkpoint (a dict with "model"), '
                             f'got {type(data).__name__}')
    if 'blobs' in data or ('model' not in data and any(k.endswith('_w') or k.endswith('_b') for k in data)):
        raise StateDictError(f'{src}: a Caffe2 / Detectron1 pickle ("blobs"): convert it to Detectron2 '
                             'format first (Detectron2 loads it with matching heuristics)')
    sd = data.get('model', data)
    if not isinstance(sd, Mapping):
        raise StateDictError(f'{src}: "model" is not a state_dict')
    out = {}
    for k, v in sd.items():
        k = k[len('module.'):] if k.startswith('module.') else k
        if k.endswith('num_batches_tracked') or k in ('pixel_mean', 'pixel_std') \
                or k.startswith('proposal_generator.anchor_generator.'):
            continue   # derived buffers: the config rebuilds them
        if hasattr(v, 'detach'):
            v = v.detach().cpu().numpy()
        try:
            out[k] = np.asarray(v, np.float32)
        except (TypeError, ValueError):
            raise StateDictError(f'{src}: {k} is not an array') from None
    if out and not any(k.startswith(('roi_heads.', 'proposal_generator.')) for k in out):
        raise StateDictError(f'{src}: a classification / backbone-only checkpoint (no proposal_generator '
                             'or roi_heads weights): it has no detector to convert')
    if not out:
        raise StateDictError(f'{src}: the checkpoint holds no weights')
    return out


def _expected_keys(cfg: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """Detectron2 key -> (collection, *flax path), for FPN, C4 (`roi.heads` 'res5': the backbone
    is `backbone.*` without `bottom_up`, res5 is `roi_heads.res5.*`) and Cascade (per-stage
    `roi_heads.box_head.{k}` / `box_predictor.{k}`)."""
    from mrcnn_jax.models.resnet import STAGE_BLOCKS
    kind, blocks = STAGE_BLOCKS[cfg.backbone.depth]
    if kind != 'bottleneck':
        raise StateDictError(f'ResNet-{cfg.backbone.depth} has basic blocks; Detectron2 R-CNNs use bottlenecks')
    heads = cfg.roi.heads
    m: dict[str, tuple[str, ...]] = {}

    def conv_bn(dprefix, fconv, fbn):
        m[f'{dprefix}.weight'] = ('params',) + fconv + ('kernel',)
        for n in ('weight', 'bias', 'running_mean', 'running_var'):
            m[f'{dprefix}.norm.{n}'] = ('frozen',) + fbn + (n,)

    def bottleneck(dp, fp):
        for c in ('conv1', 'conv2', 'conv3'):
            conv_bn(f'{dp}.{c}', fp + (c,), fp + (f'bn{c[-1]}',))

    def linear(dname, fpath):
        m[f'{dname}.weight'] = ('params',) + fpath + ('kernel',)
        m[f'{dname}.bias'] = ('params',) + fpath + ('bias',)

    bottom_up = 'backbone.bottom_up' if cfg.fpn.enabled else 'backbone'
    conv_bn(f'{bottom_up}.stem.conv1', ('backbone', 'conv1'), ('backbone', 'bn1'))
    for i, n in enumerate(blocks[:max(cfg.backbone.return_levels) - 1]):
        for j in range(n):
            dp, fp = f'{bottom_up}.res{i + 2}.{j}', ('backbone', f'layer{i + 1}_{j}')
            bottleneck(dp, fp)
            if j == 0:
                conv_bn(f'{dp}.shortcut', fp + ('downsample_conv',), fp + ('downsample_bn',))
    if cfg.fpn.enabled:
        for i in range(4):
            for d, f in (('fpn_lateral', 'inner'), ('fpn_output', 'layer')):
                linear(f'backbone.{d}{i + 2}', ('fpn', f'{f}{i}'))
    for d, f in (('conv', 'conv'), ('objectness_logits', 'cls_logits'), ('anchor_deltas', 'bbox_pred')):
        linear(f'proposal_generator.rpn_head.{d}', ('rpn_head', f))
    if heads == 'res5':
        for j in range(blocks[3]):
            dp, fp = f'roi_heads.res5.{j}', ('roi_heads', 'res5', f'block{j}')
            bottleneck(dp, fp)
            if j == 0:
                conv_bn(f'{dp}.shortcut', fp + ('downsample_conv',), fp + ('downsample_bn',))
        stages = [(None, 'box_predictor')]              # no box head: res5's spatial mean
    elif heads == 'cascade':
        stages = [(f'box_heads_{k}', f'box_predictors_{k}') for k in range(len(cfg.roi.cascade_ious))]
    else:
        stages = [('box_head', 'box_predictor')]
    for k, (fhead, fpred) in enumerate(stages):
        stage = f'.{k}' if heads == 'cascade' else ''
        if fhead is not None:
            linear(f'roi_heads.box_head{stage}.fc1', ('roi_heads', fhead, 'fc6'))
            linear(f'roi_heads.box_head{stage}.fc2', ('roi_heads', fhead, 'fc7'))
        linear(f'roi_heads.box_predictor{stage}.cls_score', ('roi_heads', fpred, 'cls_score'))
        linear(f'roi_heads.box_predictor{stage}.bbox_pred', ('roi_heads', fpred, 'bbox_pred'))
    if cfg.mask_on:
        mask = ('params', 'roi_heads', 'mask_head')
        for i in range(cfg.roi.mask_head_convs):
            m[f'roi_heads.mask_head.mask_fcn{i + 1}.weight'] = mask + (f'mask_fcn{i + 1}', 'kernel')
            m[f'roi_heads.mask_head.mask_fcn{i + 1}.bias'] = mask + (f'mask_fcn{i + 1}', 'bias')
        m['roi_heads.mask_head.deconv.weight'] = mask + ('conv5_mask_kernel',)
        m['roi_heads.mask_head.deconv.bias'] = mask + ('conv5_mask_bias',)
        m['roi_heads.mask_head.predictor.weight'] = mask + ('mask_fcn_logits_kernel',)
        m['roi_heads.mask_head.predictor.bias'] = mask + ('mask_fcn_logits_bias',)
    if cfg.keypoint_on:   # KRCNNConvDeconvUpsampleHead
        kp = ('params', 'roi_heads', 'keypoint_head')
        for i in range(cfg.roi.keypoint_head_convs):
            linear(f'roi_heads.keypoint_head.conv_fcn{i + 1}', kp[1:] + (f'conv_fcn{i + 1}',))
        m['roi_heads.keypoint_head.score_lowres.weight'] = kp + ('score_lowres_kernel',)
        m['roi_heads.keypoint_head.score_lowres.bias'] = kp + ('score_lowres_bias',)
    return m


def _background_first(v: np.ndarray, k: int) -> np.ndarray:
    """cls_score rows [K + 1, ...] with the background last -> background first."""
    if v.shape[0] != k + 1:
        raise StateDictError(f'{v.shape[0]} classifier rows, expected {k + 1} (NUM_CLASSES + background)')
    return np.concatenate([v[k:], v[:k]], axis=0)


def _with_background(v: np.ndarray, k: int, per_class: int) -> np.ndarray:
    """[K * per_class, ...] class-specific rows without a background -> [(K + 1) * per_class, ...]
    with a zero background slot first."""
    if v.shape[0] != k * per_class:
        raise StateDictError(f'{v.shape[0]} rows, expected {k} classes x {per_class}')
    return np.concatenate([np.zeros((per_class,) + v.shape[1:], v.dtype), v], axis=0)


_STAGE = re.compile(r'\.\d+(?=\.)')   # 'roi_heads.box_head.2.fc1.weight' -> 'roi_heads.box_head.fc1.weight'


def _to_flax(key: str, v: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
    k = cfg.num_classes - 1
    if key.startswith(('roi_heads.box_head.', 'roi_heads.box_predictor.')):
        key = _STAGE.sub('', key, count=1)     # Cascade's stages map alike
    if key.startswith('roi_heads.box_predictor.cls_score.'):
        v = _background_first(v, k)
    elif key.startswith('roi_heads.box_predictor.bbox_pred.') and cfg.roi.heads != 'cascade':
        v = _with_background(v, k, 4)          # Cascade's regression is class-agnostic: 4 rows
    elif key.startswith('roi_heads.mask_head.predictor.'):
        v = _with_background(v, k, 1)
    if key in ('roi_heads.mask_head.deconv.weight', 'roi_heads.keypoint_head.score_lowres.weight'):
        return np.transpose(v, (2, 3, 0, 1))           # [in, out, kh, kw] -> [kh, kw, in, out]
    if key == 'roi_heads.mask_head.predictor.weight':
        return v[:, :, 0, 0].T
    if key == 'roi_heads.box_head.fc1.weight':
        out_dim, in_dim = v.shape
        c, size = cfg.fpn.channels, cfg.roi.box_pool_size
        if in_dim != c * size * size:
            raise StateDictError(f'{in_dim} inputs, expected {c} x {size} x {size}')
        return v.reshape(out_dim, c, size, size).transpose(2, 3, 1, 0).reshape(size * size * c, out_dim)
    if v.ndim == 4:
        return np.transpose(v, (2, 3, 1, 0))
    if v.ndim == 2:
        return v.T
    return v


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict,
                       expected: Any = None) -> dict:
    """Map a Detectron2 state_dict onto the Flax variables of `build_model(cfg)` (cfg: the model
    section from `config_from_yaml`). Raises StateDictError naming every missing, unexpected and
    mis-shaped key; nothing is returned half-converted."""
    from mrcnn_jax.models.mask_rcnn import abstract_variables

    if expected is None:
        expected = abstract_variables(cfg)
    return map_state_dict(sd, _expected_keys(cfg), lambda key, v: _to_flax(key, v, cfg), expected,
                          'checkpoint (with its config)')
