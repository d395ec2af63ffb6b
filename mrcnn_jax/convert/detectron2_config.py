"""Detectron2 yaml configs -> our config (the architecture and its pre- and post-processing).

Detectron2 builds its model from a yaml file (with `_BASE_` chains) on top of its defaults
(`detectron2/config/defaults.py`). We read the yaml chain ourselves (PyYAML; Detectron2 is never
imported) over the subset of those defaults that decide the architecture and its pre- and
post-processing (`_DEFAULTS`), and map each key onto our config (`config_from_yaml`). Every key
the chain sets is accounted for: read, checked against the one value we support (`_REQUIRE`,
per architecture `_ARCHITECTURES`: FPN, C4 and Cascade, each with or without masks, FPN and
Cascade with or without Keypoint R-CNN's keypoint head; e.g. deformable convolution, norms in the
heads, or an FPN backbone under Res5ROIHeads are refused with the key named),
or ignored because it only concerns Detectron2's solver, data loader or logging (`_IGNORED`).
Anything else is an error naming the key, so an unsupported feature never loads silently.

The labels our model outputs are 1..K; Detectron2's class i is our label i + 1. When the config
trains on a COCO split, `label_ids` maps label i + 1 to the COCO category id of Detectron2's
contiguous class i (the sorted category ids, as Detectron2's COCO metadata); on a COCO
person-keypoint split ('keypoints_coco_2017_train', NUM_CLASSES 1) label 1 is category 1, person.

Keypoints: Detectron2's COCO loader adds 0.5 to every keypoint's x and y (pixel indices ->
continuous coordinates) and its COCOEvaluator subtracts 0.5 before writing results. Its models
are trained, and predict, in that continuous frame, and `Predictor` returns what Detectron2's
model returns (`pred_keypoints` in original pixels, continuous frame). Its conventions'
`keypoint_offset` (0.5) does the rest: the input pipeline adds it to labelled keypoints and COCO
evaluation subtracts it from predicted ones, as COCOEvaluator does.
The checkpoint side is `convert/detectron2.py`.
"""

from __future__ import annotations

import copy
import pathlib
import re
from typing import Any, Mapping

import ml_collections

class Detectron2ConfigError(ValueError):
    """A Detectron2 config we cannot load: the message names the file and the key."""


# -- the config --------------------------------------------------------------------------------

# Detectron2's defaults (detectron2/config/defaults.py) for every key we read or check. They are
# the C4 defaults: a yaml that does not start from Base-RCNN-FPN.yaml asks for Res5ROIHeads.
_DEFAULTS: dict[str, Any] = {
    'MODEL.META_ARCHITECTURE': 'GeneralizedRCNN',
    'MODEL.MASK_ON': False,
    'MODEL.KEYPOINT_ON': False,
    'MODEL.LOAD_PROPOSALS': False,
    'MODEL.PIXEL_MEAN': [103.530, 116.280, 123.675],
    'MODEL.PIXEL_STD': [1.0, 1.0, 1.0],
    'MODEL.BACKBONE.NAME': 'build_resnet_backbone',
    'MODEL.BACKBONE.FREEZE_AT': 2,
    'MODEL.RESNETS.DEPTH': 50,
    'MODEL.RESNETS.OUT_FEATURES': ['res4'],
    'MODEL.RESNETS.NUM_GROUPS': 1,
    'MODEL.RESNETS.NORM': 'FrozenBN',
    'MODEL.RESNETS.WIDTH_PER_GROUP': 64,
    'MODEL.RESNETS.STRIDE_IN_1X1': True,
    'MODEL.RESNETS.RES5_DILATION': 1,
    'MODEL.RESNETS.RES2_OUT_CHANNELS': 256,
    'MODEL.RESNETS.STEM_OUT_CHANNELS': 64,
    'MODEL.RESNETS.DEFORM_ON_PER_STAGE': [False, False, False, False],
    'MODEL.RESNETS.DEFORM_MODULATED': False,
    'MODEL.RESNETS.DEFORM_NUM_GROUPS': 1,
    'MODEL.FPN.IN_FEATURES': [],
    'MODEL.FPN.OUT_CHANNELS': 256,
    'MODEL.FPN.NORM': '',
    'MODEL.FPN.FUSE_TYPE': 'sum',
    'MODEL.PROPOSAL_GENERATOR.NAME': 'RPN',
    'MODEL.PROPOSAL_GENERATOR.MIN_SIZE': 0,
    'MODEL.ANCHOR_GENERATOR.NAME': 'DefaultAnchorGenerator',
    'MODEL.ANCHOR_GENERATOR.SIZES': [[32, 64, 128, 256, 512]],
    'MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS': [[0.5, 1.0, 2.0]],
    'MODEL.ANCHOR_GENERATOR.OFFSET': 0.0,
    'MODEL.RPN.HEAD_NAME': 'StandardRPNHead',
    'MODEL.RPN.IN_FEATURES': ['res4'],
    'MODEL.RPN.BOUNDARY_THRESH': -1,
    'MODEL.RPN.IOU_THRESHOLDS': [0.3, 0.7],
    'MODEL.RPN.IOU_LABELS': [0, -1, 1],
    'MODEL.RPN.BATCH_SIZE_PER_IMAGE': 256,
    'MODEL.RPN.POSITIVE_FRACTION': 0.5,
    'MODEL.RPN.BBOX_REG_LOSS_TYPE': 'smooth_l1',
    'MODEL.RPN.BBOX_REG_LOSS_WEIGHT': 1.0,
    'MODEL.RPN.BBOX_REG_WEIGHTS': [1.0, 1.0, 1.0, 1.0],
    'MODEL.RPN.SMOOTH_L1_BETA': 0.0,
    'MODEL.RPN.LOSS_WEIGHT': 1.0,
    'MODEL.RPN.PRE_NMS_TOPK_TRAIN': 12000,
    'MODEL.RPN.PRE_NMS_TOPK_TEST': 6000,
    'MODEL.RPN.POST_NMS_TOPK_TRAIN': 2000,
    'MODEL.RPN.POST_NMS_TOPK_TEST': 1000,
    'MODEL.RPN.NMS_THRESH': 0.7,
    'MODEL.RPN.CONV_DIMS': [-1],
    'MODEL.ROI_HEADS.NAME': 'Res5ROIHeads',
    'MODEL.ROI_HEADS.NUM_CLASSES': 80,
    'MODEL.ROI_HEADS.IN_FEATURES': ['res4'],
    'MODEL.ROI_HEADS.IOU_THRESHOLDS': [0.5],
    'MODEL.ROI_HEADS.IOU_LABELS': [0, 1],
    'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE': 512,
    'MODEL.ROI_HEADS.POSITIVE_FRACTION': 0.25,
    'MODEL.ROI_HEADS.SCORE_THRESH_TEST': 0.05,
    'MODEL.ROI_HEADS.NMS_THRESH_TEST': 0.5,
    'MODEL.ROI_HEADS.PROPOSAL_APPEND_GT': True,
    'MODEL.ROI_BOX_HEAD.NAME': '',
    'MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE': 'smooth_l1',
    'MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT': 1.0,
    'MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS': [10.0, 10.0, 5.0, 5.0],
    'MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA': 0.0,
    'MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION': 14,
    'MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO': 0,
    'MODEL.ROI_BOX_HEAD.POOLER_TYPE': 'ROIAlignV2',
    'MODEL.ROI_BOX_HEAD.NUM_FC': 0,
    'MODEL.ROI_BOX_HEAD.FC_DIM': 1024,
    'MODEL.ROI_BOX_HEAD.NUM_CONV': 0,
    'MODEL.ROI_BOX_HEAD.CONV_DIM': 256,
    'MODEL.ROI_BOX_HEAD.NORM': '',
    'MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG': False,
    'MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES': False,
    'MODEL.ROI_BOX_HEAD.USE_FED_LOSS': False,
    'MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE': False,
    'MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS': [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0],
                                                   [30.0, 30.0, 15.0, 15.0]],
    'MODEL.ROI_BOX_CASCADE_HEAD.IOUS': [0.5, 0.6, 0.7],
    'MODEL.ROI_MASK_HEAD.NAME': 'MaskRCNNConvUpsampleHead',
    'MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION': 14,
    'MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO': 0,
    'MODEL.ROI_MASK_HEAD.NUM_CONV': 0,
    'MODEL.ROI_MASK_HEAD.CONV_DIM': 256,
    'MODEL.ROI_MASK_HEAD.NORM': '',
    'MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK': False,
    'MODEL.ROI_MASK_HEAD.POOLER_TYPE': 'ROIAlignV2',
    'MODEL.ROI_KEYPOINT_HEAD.NAME': 'KRCNNConvDeconvUpsampleHead',
    'MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION': 14,
    'MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO': 0,
    'MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE': 'ROIAlignV2',
    'MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS': [512] * 8,
    'MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS': 17,
    'MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS': True,
    'MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT': 1.0,
    'TEST.KEYPOINT_OKS_SIGMAS': [],
    'INPUT.MIN_SIZE_TRAIN': [800],
    'INPUT.MIN_SIZE_TRAIN_SAMPLING': 'choice',
    'INPUT.MAX_SIZE_TRAIN': 1333,
    'INPUT.MIN_SIZE_TEST': 800,
    'INPUT.MAX_SIZE_TEST': 1333,
    'INPUT.RANDOM_FLIP': 'horizontal',
    'INPUT.FORMAT': 'BGR',
    'INPUT.MASK_FORMAT': 'polygon',
    'INPUT.CROP.ENABLED': False,
    'DATASETS.TRAIN': [],
    'TEST.DETECTIONS_PER_IMAGE': 100,
}

_FPN_FEATURES = ['res2', 'res3', 'res4', 'res5']

# Keys whose value must be this one: what else Detectron2 allows is not built here (yet). The
# values for FPN Mask R-CNN; `_ARCHITECTURES` changes some for C4 and Cascade.
_REQUIRE: dict[str, Any] = {
    'MODEL.META_ARCHITECTURE': 'GeneralizedRCNN',
    'MODEL.LOAD_PROPOSALS': False,
    'MODEL.BACKBONE.NAME': 'build_resnet_fpn_backbone',
    'MODEL.RESNETS.OUT_FEATURES': _FPN_FEATURES,
    'MODEL.RESNETS.NORM': 'FrozenBN',
    'MODEL.RESNETS.RES5_DILATION': 1,
    'MODEL.RESNETS.DEFORM_ON_PER_STAGE': [False, False, False, False],
    'MODEL.FPN.IN_FEATURES': _FPN_FEATURES,
    'MODEL.FPN.NORM': '',
    'MODEL.FPN.FUSE_TYPE': 'sum',
    'MODEL.PROPOSAL_GENERATOR.NAME': 'RPN',
    'MODEL.ANCHOR_GENERATOR.NAME': 'DefaultAnchorGenerator',
    'MODEL.ANCHOR_GENERATOR.OFFSET': 0.0,
    'MODEL.RPN.HEAD_NAME': 'StandardRPNHead',
    'MODEL.RPN.IN_FEATURES': ['p2', 'p3', 'p4', 'p5', 'p6'],
    'MODEL.RPN.BOUNDARY_THRESH': -1,
    'MODEL.RPN.IOU_LABELS': [0, -1, 1],
    'MODEL.RPN.BBOX_REG_LOSS_TYPE': 'smooth_l1',
    'MODEL.RPN.BBOX_REG_LOSS_WEIGHT': 1.0,
    'MODEL.RPN.BBOX_REG_WEIGHTS': [1.0, 1.0, 1.0, 1.0],
    'MODEL.RPN.LOSS_WEIGHT': 1.0,
    'MODEL.RPN.CONV_DIMS': [-1],
    'MODEL.ROI_HEADS.IN_FEATURES': ['p2', 'p3', 'p4', 'p5'],
    'MODEL.ROI_HEADS.IOU_LABELS': [0, 1],
    'MODEL.ROI_HEADS.PROPOSAL_APPEND_GT': True,
    'MODEL.ROI_BOX_HEAD.NAME': 'FastRCNNConvFCHead',
    'MODEL.ROI_BOX_HEAD.NUM_FC': 2,
    'MODEL.ROI_BOX_HEAD.NUM_CONV': 0,
    'MODEL.ROI_BOX_HEAD.NORM': '',
    'MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG': False,
    'MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES': False,
    'MODEL.ROI_BOX_HEAD.USE_FED_LOSS': False,
    'MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE': False,
    'MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE': 'smooth_l1',
    'MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT': 1.0,
    'MODEL.ROI_MASK_HEAD.NAME': 'MaskRCNNConvUpsampleHead',
    'MODEL.ROI_MASK_HEAD.NORM': '',
    'MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK': False,
    # Keypoint R-CNN: the one head we build, its loss as `training/losses.py` averages it (mean
    # cross entropy over the visible keypoints: Detectron2's default normalizer) with weight 1
    'MODEL.ROI_KEYPOINT_HEAD.NAME': 'KRCNNConvDeconvUpsampleHead',
    'MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS': True,
    'MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT': 1.0,
    'INPUT.MIN_SIZE_TRAIN_SAMPLING': 'choice',
    'INPUT.CROP.ENABLED': False,
}
# The RoI heads Detectron2 names (ROI_HEADS.NAME) -> (our model.roi.heads, the keys whose
# required value differs from FPN Mask R-CNN's, key prefixes the architecture never reads).
_FPN_ONLY = ('MODEL.FPN.',)
_ARCHITECTURES: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    'StandardROIHeads': ('standard', {}, ('MODEL.ROI_BOX_CASCADE_HEAD.',)),
    # C4: RPN and RoI heads on res4, res5 per RoI; the box head and mask pooler keys are unread
    # (Res5ROIHeads pools once, at the box head's resolution, for both branches).
    'Res5ROIHeads': ('res5', {
        'MODEL.BACKBONE.NAME': 'build_resnet_backbone',
        'MODEL.RESNETS.OUT_FEATURES': ['res4'],
        'MODEL.RPN.IN_FEATURES': ['res4'],
        'MODEL.ROI_HEADS.IN_FEATURES': ['res4'],
        'MODEL.KEYPOINT_ON': False,          # Res5ROIHeads asserts it
    }, _FPN_ONLY + ('MODEL.ROI_BOX_CASCADE_HEAD.', 'MODEL.ROI_BOX_HEAD.NAME', 'MODEL.ROI_BOX_HEAD.NUM_FC',
                    'MODEL.ROI_BOX_HEAD.NUM_CONV', 'MODEL.ROI_BOX_HEAD.NORM', 'MODEL.ROI_BOX_HEAD.FC_DIM',
                    'MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES', 'MODEL.ROI_MASK_HEAD.POOLER_')),
    # Cascade: class-agnostic regression in every stage (CascadeROIHeads asserts it).
    'CascadeROIHeads': ('cascade', {'MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG': True}, ()),
}


def _architecture(path, merged: Mapping[str, Any]) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    name = merged.get('MODEL.ROI_HEADS.NAME')
    if name not in _ARCHITECTURES:
        raise Detectron2ConfigError(f'{path}: MODEL.ROI_HEADS.NAME = {name!r} is not supported '
                                    f'(supported: {", ".join(sorted(_ARCHITECTURES))})')
    heads, require, unread = _ARCHITECTURES[name]
    return heads, {**_REQUIRE, **require}, unread


# Keys only read by what we do not build, when the feature that reads them is off.
_IDLE_WHEN = {
    'MODEL.ROI_MASK_HEAD.': ('MODEL.MASK_ON', False),
    'MODEL.ROI_KEYPOINT_HEAD.': ('MODEL.KEYPOINT_ON', False),
    'INPUT.CROP.': ('INPUT.CROP.ENABLED', False),
}
# Namespaces and keys that do not change the model or its pre- and post-processing.
_IGNORED = ('SOLVER.', 'DATALOADER.', 'TEST.EVAL_PERIOD', 'TEST.EXPECTED_RESULTS', 'TEST.AUG.',
            'TEST.PRECISE_BN.', 'DATASETS.TEST', 'DATASETS.PROPOSAL_FILES', 'DATASETS.PRECOMPUTED',
            'MODEL.WEIGHTS', 'MODEL.DEVICE', 'OUTPUT_DIR', 'SEED', 'CUDNN_BENCHMARK', 'VIS_PERIOD',
            'VERSION', 'GLOBAL.', 'FLOAT32_PRECISION', 'MODEL.RESNETS.DEFORM_MODULATED',
            'MODEL.RESNETS.DEFORM_NUM_GROUPS', 'MODEL.ROI_BOX_HEAD.CONV_DIM', 'INPUT.MASK_FORMAT',
            'MODEL.ROI_BOX_HEAD.FED_LOSS', 'MODEL.ANCHOR_GENERATOR.ANGLES',
            'MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE')   # the data loader's image filter


def _decode(v):
    """A yaml value as yacs decodes it: strings that are Python literals ('(640, 672)') become them."""
    if isinstance(v, str):
        import ast
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


def _flatten(node: Mapping, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        key = f'{prefix}{k}'
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + '.'))
        else:
            out[key] = _decode(v)
    return out


def _read_yaml_chain(path: pathlib.Path, seen: tuple = ()) -> dict[str, Any]:
    """The flat {KEY.PATH: value} a yaml sets, its `_BASE_` files first (relative to it)."""
    import yaml

    path = pathlib.Path(path)
    if path.suffix == '.py':
        raise Detectron2ConfigError(f'{path}: LazyConfig (.py) configs are not supported; use a yaml config')
    if not path.is_file():
        raise Detectron2ConfigError(f'{path}: Detectron2 config file not found')
    if path.resolve() in seen:
        raise Detectron2ConfigError(f'{path}: _BASE_ chain loops back to itself')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise Detectron2ConfigError(f'{path}: not a valid yaml file ({str(e).splitlines()[0]})') from None
    if not isinstance(data, Mapping):
        raise Detectron2ConfigError(f'{path}: not a Detectron2 config (a yaml mapping of MODEL, INPUT, ...)')
    data = dict(data)
    base = data.pop('_BASE_', None)
    flat: dict[str, Any] = {}
    if base:
        base_path = pathlib.Path(base).expanduser()
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        flat.update(_read_yaml_chain(base_path, seen + (path.resolve(),)))
    flat.update(_flatten(data))
    return flat


def _norm(v):
    """Lists/tuples compare as lists, numbers as floats (yaml writes 1 and 1.0 alike)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _idle(key: str, merged: Mapping[str, Any], unread: tuple[str, ...] = ()) -> bool:
    """Whether `key` belongs to a feature that the config leaves off, or that its architecture
    does not have (`unread`): then its value is never read."""
    if any(key.startswith(p) for p in unread):
        return True
    flags = [flag for prefix, flag in _IDLE_WHEN.items() if key.startswith(prefix)]
    return bool(flags) and all(key != k and _norm(merged.get(k)) == _norm(v) for k, v in flags)


def _check_keys(path, chain: Mapping[str, Any], merged: Mapping[str, Any], require: Mapping[str, Any],
                unread: tuple[str, ...]) -> None:
    for key, value in chain.items():
        if _idle(key, merged, unread):
            continue
        if key in require:
            if _norm(value) != _norm(require[key]):
                raise Detectron2ConfigError(f'{path}: {key} = {value!r} is not supported with '
                                            f'{merged["MODEL.ROI_HEADS.NAME"]} (supported: {require[key]!r})')
        elif key in _DEFAULTS or key == 'MODEL.ROI_HEADS.NAME':
            continue
        elif any(key == p or key.startswith(p) for p in _IGNORED):
            continue
        else:
            raise Detectron2ConfigError(f'{path}: {key} = {value!r} is not supported')
    for key, value in require.items():   # defaults not overridden must be supported too
        if _idle(key, merged, unread):
            continue
        if key not in chain and _norm(merged.get(key)) != _norm(value):
            raise Detectron2ConfigError(f'{path}: {key} = {merged.get(key)!r} (Detectron2\'s default) is not '
                                        f'supported with {merged["MODEL.ROI_HEADS.NAME"]} (supported: {value!r})')


def is_coco_split(names, keypoints: bool = False) -> bool:
    """Whether Detectron2 dataset names are COCO instance splits (labels -> COCO category ids),
    or with `keypoints` COCO person-keypoint splits ('keypoints_coco_2017_train': one class,
    person, COCO category 1)."""
    names = [names] if isinstance(names, str) else list(names)
    prefix = 'keypoints_' if keypoints else ''
    return bool(names) and all(re.fullmatch(prefix + r'coco_20(14|17)_[a-z_0-9]+', n) for n in names)


def coco_labels(num_classes: int, keypoints: bool = False) -> tuple[list[int], list[str]]:
    """label_ids / class_names of a K + 1-class model trained on COCO by Detectron2: Detectron2's
    contiguous class i is the i-th smallest COCO category id (of the person-keypoint splits'
    one category, person, with `keypoints`)."""
    from mrcnn_jax.coco_categories import COCO_CATEGORY_NAMES
    ids = [i for i, n in enumerate(COCO_CATEGORY_NAMES) if i > 0 and n != 'N/A']
    if keypoints:
        ids = [COCO_CATEGORY_NAMES.index('person')]
    if num_classes - 1 != len(ids):
        raise Detectron2ConfigError(f'a COCO split has {len(ids)} classes but the config has '
                                    f'ROI_HEADS.NUM_CLASSES = {num_classes - 1}')
    return [0] + ids, ['__background__'] + [COCO_CATEGORY_NAMES[i] for i in ids]


def _keypoint_head(path, g, cfg: ml_collections.ConfigDict, need) -> None:
    """Keypoint R-CNN's head (KRCNNConvDeconvUpsampleHead): CONV_DIMS 3x3 convs of one width on
    POOLER_RESOLUTION RoIAlign features, then the deconv and 2x upsample to NUM_KEYPOINTS heatmaps.
    The data carries that many keypoints; TEST.KEYPOINT_OKS_SIGMAS (if set) become the keypoint
    AP's sigmas. MIN_KEYPOINTS_PER_IMAGE is Detectron2's data-loader filter (ignored)."""
    m, h = cfg.model, cfg.model.roi
    m.num_keypoints = int(g('MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS'))
    need(m.num_keypoints > 0, 'MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS')
    dims = [int(v) for v in g('MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS')]
    # our head has one width for all its convs (every zoo config: 8 x 512)
    need(all(d == dims[0] and d > 0 for d in dims), 'MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS')
    h.keypoint_head_convs = len(dims)
    if dims:
        h.keypoint_head_channels = dims[0]
    h.keypoint_pool_size = int(g('MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION'))
    cfg.data.keypoints = True
    cfg.data.num_keypoints = m.num_keypoints
    sigmas = [float(v) for v in g('TEST.KEYPOINT_OKS_SIGMAS') or []]
    if sigmas and len(sigmas) != m.num_keypoints:
        raise Detectron2ConfigError(f'{path}: TEST.KEYPOINT_OKS_SIGMAS has {len(sigmas)} values for '
                                    f'{m.num_keypoints} keypoints (ROI_KEYPOINT_HEAD.NUM_KEYPOINTS)')
    cfg.data.keypoint_oks_sigmas = tuple(sigmas)


def config_from_yaml(path) -> tuple[ml_collections.ConfigDict, dict]:
    """A Detectron2 yaml config (with its `_BASE_` chain) -> (our full config, info).

    info: {'labels': 'coco_category_id' | 'detectron2_class_index', 'label_ids', 'class_names',
    'datasets'}: how the model's output labels map to the user's classes (see the module
    docstring). Raises Detectron2ConfigError naming the first unsupported key.
    """
    from mrcnn_jax.config import default_config
    from mrcnn_jax.models import conventions

    path = pathlib.Path(path)
    chain = _read_yaml_chain(path)
    merged = dict(_DEFAULTS)
    merged.update(chain)
    heads, require, unread = _architecture(path, merged)
    _check_keys(path, chain, merged, require, unread)
    g = merged.get

    def need(cond, key):
        if not cond:
            raise Detectron2ConfigError(f'{path}: {key} = {g(key)!r} is not supported')

    cfg = default_config()
    m = cfg.model
    conv = m.conventions
    conv.name = 'detectron2'
    fmt = g('INPUT.FORMAT')
    need(fmt in ('BGR', 'RGB'), 'INPUT.FORMAT')
    conv.channel_order = fmt
    mean, std = [float(v) for v in g('MODEL.PIXEL_MEAN')], [float(v) for v in g('MODEL.PIXEL_STD')]
    need(len(mean) == 3, 'MODEL.PIXEL_MEAN')
    need(len(std) == 3, 'MODEL.PIXEL_STD')
    conv.pixel_mean, conv.pixel_std = tuple(mean), tuple(std)
    conv.stride_in_1x1 = bool(g('MODEL.RESNETS.STRIDE_IN_1X1'))
    conv.rpn_smooth_l1_beta = float(g('MODEL.RPN.SMOOTH_L1_BETA'))
    conv.box_smooth_l1_beta = float(g('MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA'))
    box_pool = g('MODEL.ROI_BOX_HEAD.POOLER_TYPE')
    need(box_pool in ('ROIAlignV2', 'ROIAlign'), 'MODEL.ROI_BOX_HEAD.POOLER_TYPE')
    conv.roi_align_aligned = box_pool == 'ROIAlignV2'
    conv.sampling_ratio = int(g('MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO'))
    m.mask_on = bool(g('MODEL.MASK_ON'))
    m.keypoint_on = bool(g('MODEL.KEYPOINT_ON'))
    # one RoIAlign convention for every pooler (C4's mask head reads the box pooler's features)
    for head, on in (('ROI_MASK_HEAD', m.mask_on and heads != 'res5'), ('ROI_KEYPOINT_HEAD', m.keypoint_on)):
        for key, value in (('POOLER_TYPE', box_pool), ('POOLER_SAMPLING_RATIO', conv.sampling_ratio)):
            if on:
                need(_norm(g(f'MODEL.{head}.{key}')) == _norm(value), f'MODEL.{head}.{key}')

    b = m.backbone
    b.depth = int(g('MODEL.RESNETS.DEPTH'))
    need(b.depth in (50, 101, 152), 'MODEL.RESNETS.DEPTH')
    b.width = int(g('MODEL.RESNETS.STEM_OUT_CHANNELS'))
    # Detectron2's bottleneck width is NUM_GROUPS x WIDTH_PER_GROUP x 2^stage, ours scales with
    # the stem width too: the two agree for the stem of 64 that every zoo model has.
    need(b.width == 64, 'MODEL.RESNETS.STEM_OUT_CHANNELS')
    b.groups = int(g('MODEL.RESNETS.NUM_GROUPS'))
    b.width_per_group = int(g('MODEL.RESNETS.WIDTH_PER_GROUP'))
    need(int(g('MODEL.RESNETS.RES2_OUT_CHANNELS')) == 4 * b.width, 'MODEL.RESNETS.RES2_OUT_CHANNELS')
    b.norm = 'frozen_bn'
    b.norm_eps = 1e-5                     # Detectron2's FrozenBatchNorm2d
    b.frozen_stages = int(g('MODEL.BACKBONE.FREEZE_AT'))
    sizes = g('MODEL.ANCHOR_GENERATOR.SIZES')
    if heads == 'res5':   # C4: one level, res4; Detectron2 pads C4 inputs to no multiple
        # 14 x 14 bins from one 1024-channel map: the einsum form of RoIAlign is ~10x faster there
        # than the gather form (1.7 s against 17.8 s for 1000 RoIs on 2 CPU cores), same values
        m.roi.roi_align_method = 'einsum'
        b.return_levels = (4,)
        m.fpn.enabled = False
        m.size_divisible = 1
        need(len(sizes) == 1, 'MODEL.ANCHOR_GENERATOR.SIZES')
        m.anchors.sizes = (tuple(float(v) for v in sizes[0]),)
    else:
        m.fpn.channels = int(g('MODEL.FPN.OUT_CHANNELS'))
        need(len(sizes) == 5 and all(len(s) == 1 for s in sizes), 'MODEL.ANCHOR_GENERATOR.SIZES')
        m.anchors.sizes = tuple(float(s[0]) for s in sizes)
    ratios = g('MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS')
    need(len(ratios) == 1 or all(_norm(r) == _norm(ratios[0]) for r in ratios), 'MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS')
    m.anchors.aspect_ratios = tuple(float(r) for r in ratios[0])

    r = m.rpn
    r.pre_nms_topk_train = int(g('MODEL.RPN.PRE_NMS_TOPK_TRAIN'))
    r.pre_nms_topk_test = int(g('MODEL.RPN.PRE_NMS_TOPK_TEST'))
    r.post_nms_topk_train = int(g('MODEL.RPN.POST_NMS_TOPK_TRAIN'))
    r.post_nms_topk_test = int(g('MODEL.RPN.POST_NMS_TOPK_TEST'))
    r.nms_thresh = float(g('MODEL.RPN.NMS_THRESH'))
    r.min_size = float(g('MODEL.PROPOSAL_GENERATOR.MIN_SIZE'))
    ious = g('MODEL.RPN.IOU_THRESHOLDS')
    need(len(ious) == 2, 'MODEL.RPN.IOU_THRESHOLDS')
    r.bg_iou_thresh, r.fg_iou_thresh = float(ious[0]), float(ious[1])
    r.batch_size_per_image = int(g('MODEL.RPN.BATCH_SIZE_PER_IMAGE'))
    r.positive_fraction = float(g('MODEL.RPN.POSITIVE_FRACTION'))

    h = m.roi
    h.heads = heads
    m.num_classes = int(g('MODEL.ROI_HEADS.NUM_CLASSES')) + 1
    ious = g('MODEL.ROI_HEADS.IOU_THRESHOLDS')
    need(len(ious) == 1, 'MODEL.ROI_HEADS.IOU_THRESHOLDS')
    h.fg_iou_thresh = h.bg_iou_thresh = float(ious[0])
    h.batch_size_per_image = int(g('MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE'))
    h.positive_fraction = float(g('MODEL.ROI_HEADS.POSITIVE_FRACTION'))
    h.box_weights = tuple(float(v) for v in g('MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS'))
    need(len(h.box_weights) == 4, 'MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS')
    h.box_pool_size = int(g('MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION'))
    h.fc_dim = int(g('MODEL.ROI_BOX_HEAD.FC_DIM'))
    h.score_thresh = float(g('MODEL.ROI_HEADS.SCORE_THRESH_TEST'))
    h.nms_thresh = float(g('MODEL.ROI_HEADS.NMS_THRESH_TEST'))
    h.detections_per_img = int(g('TEST.DETECTIONS_PER_IMAGE'))
    h.min_size = 0.0       # no small-box filter at test time (sides >= 0 keeps every box)
    if heads == 'cascade':
        ious = [float(v) for v in g('MODEL.ROI_BOX_CASCADE_HEAD.IOUS')]
        weights = [tuple(float(v) for v in w) for w in g('MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS')]
        if len(weights) != len(ious):
            raise Detectron2ConfigError(
                f'{path}: MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS has {len(weights)} stages but '
                f'MODEL.ROI_BOX_CASCADE_HEAD.IOUS has {len(ious)} stages (one set of 4 weights per IoU threshold)')
        need(all(len(w) == 4 for w in weights), 'MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS')
        # CascadeROIHeads asserts that stage 0 matches as the RoI heads do
        need(ious[0] == h.fg_iou_thresh, 'MODEL.ROI_BOX_CASCADE_HEAD.IOUS')
        h.cascade_ious = tuple(ious)
        h.cascade_box_weights = tuple(weights)
    if m.mask_on and heads == 'res5':   # the mask head reads res5 of the box pooler's features
        h.mask_pool_size = h.box_pool_size
        h.mask_resolution = h.box_pool_size
        h.mask_head_convs = int(g('MODEL.ROI_MASK_HEAD.NUM_CONV'))
        h.mask_head_channels = int(g('MODEL.ROI_MASK_HEAD.CONV_DIM'))
    elif m.mask_on:
        h.mask_pool_size = int(g('MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION'))
        h.mask_resolution = 2 * h.mask_pool_size
        h.mask_head_convs = int(g('MODEL.ROI_MASK_HEAD.NUM_CONV'))
        h.mask_head_channels = int(g('MODEL.ROI_MASK_HEAD.CONV_DIM'))
    if m.keypoint_on:
        _keypoint_head(path, g, cfg, need)

    d = cfg.data
    d.test_min_size = int(g('INPUT.MIN_SIZE_TEST'))
    d.test_max_size = int(g('INPUT.MAX_SIZE_TEST'))
    min_train = g('INPUT.MIN_SIZE_TRAIN')
    d.min_size = tuple(int(v) for v in (min_train if isinstance(min_train, (list, tuple)) else [min_train]))
    d.max_size = int(g('INPUT.MAX_SIZE_TRAIN'))
    flip = g('INPUT.RANDOM_FLIP')
    need(flip in ('horizontal', 'none'), 'INPUT.RANDOM_FLIP')
    d.flip_prob = 0.5 if flip == 'horizontal' else 0.0

    conventions.Conventions.from_config(conv)     # type-checks the group
    datasets = list(g('DATASETS.TRAIN') or [])
    coco_keypoints = is_coco_split(datasets, keypoints=True)
    if is_coco_split(datasets) or coco_keypoints:
        label_ids, names = coco_labels(m.num_classes, keypoints=coco_keypoints)
        labels = 'coco_category_id'
        d.class_index = 'contiguous'
    else:
        k = m.num_classes - 1
        label_ids, names = [-1] + list(range(k)), ['__background__'] + [str(i) for i in range(k)]
        labels = 'detectron2_class_index'
    info = {'labels': labels, 'label_ids': label_ids, 'class_names': names, 'datasets': datasets}
    return cfg, info


def config_with_overrides(cfg: ml_collections.ConfigDict, *, score_thresh=None, nms_thresh=None,
                          detections_per_img=None, min_size=None, max_size=None) -> ml_collections.ConfigDict:
    """A copy of `cfg` with the given inference settings (None keeps the config's value)."""
    cfg = copy.deepcopy(cfg)
    for value, section, key in ((score_thresh, cfg.model.roi, 'score_thresh'),
                                (nms_thresh, cfg.model.roi, 'nms_thresh'),
                                (detections_per_img, cfg.model.roi, 'detections_per_img'),
                                (min_size, cfg.data, 'test_min_size'), (max_size, cfg.data, 'test_max_size')):
        if value is not None:
            section[key] = type(section[key])(value)
    return cfg
