"""mrcnn_jax.convert.detectron2: reading Detectron2 yaml configs (with `_BASE_` chains), the
model-zoo .pkl and .pth formats, the key and class-layout mapping, one-line errors for what is not
supported or does not fit, the `convert` command, and `train.init_from` with a Detectron2 checkpoint.

The state_dicts come from Detectron2's own `build_model` (vendored source, random weights: the
layout is what matters here; outputs are compared in tests/models/test_detectron2_parity.py).
"""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import flax  # noqa: E402

from mrcnn_jax.convert import detectron2 as d2c  # noqa: E402
from mrcnn_jax.convert.detectron2 import Detectron2ConfigError, StateDictError  # noqa: E402

D2_ROOT = pathlib.Path(__file__).resolve().parents[2] / '..' / 'shared' / 'vendor' / 'detectron2'
ZOO = D2_ROOT / 'configs'
R50 = ZOO / 'COCO-InstanceSegmentation' / 'mask_rcnn_R_50_FPN_3x.yaml'
NUM_CLASSES = 5


def _detectron2():
    import sys
    if str(D2_ROOT) not in sys.path:
        sys.path.insert(0, str(D2_ROOT))
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    return get_cfg, build_model


def _write_yaml(path: pathlib.Path, base: pathlib.Path, body: str) -> pathlib.Path:
    path.write_text(f'_BASE_: "{base}"\n{body}')
    return path


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """A 5-class R50-FPN Mask R-CNN yaml (a `_BASE_` chain onto the zoo's), its Detectron2 model's
    state_dict as numpy, and the file written in the model-zoo .pkl format."""
    d = tmp_path_factory.mktemp('d2')
    yaml_path = _write_yaml(d / 'small.yaml', R50, f'MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: {NUM_CLASSES}\n'
                            'DATASETS:\n  TRAIN: ("my_dataset_train",)\n')
    get_cfg, build_model = _detectron2()
    cfg = get_cfg()
    cfg.merge_from_file(str(yaml_path))
    cfg.MODEL.DEVICE = 'cpu'
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    pkl = d / 'model_final.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': sd, '__author__': 'mrcnn_jax tests', 'matching_heuristics': False}, f)
    return yaml_path, sd, pkl


def _flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


# -- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize('name, depth, groups, wpg, stride_in_1x1, mask, std', [
    ('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml', 50, 1, 64, True, True, (1.0, 1.0, 1.0)),
    ('COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml', 101, 1, 64, True, True, (1.0, 1.0, 1.0)),
    ('COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml', 101, 32, 8, False, True,
     (57.375, 57.12, 58.395)),
    ('COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml', 50, 1, 64, True, False, (1.0, 1.0, 1.0)),
])
def test_zoo_configs(name, depth, groups, wpg, stride_in_1x1, mask, std):
    from mrcnn_jax.models.conventions import Conventions
    cfg, info = d2c.config_from_yaml(ZOO / name)
    m = cfg.model
    conv = Conventions.from_config(m.conventions)
    assert (m.backbone.depth, m.backbone.groups, m.backbone.width_per_group) == (depth, groups, wpg)
    assert conv.stride_in_1x1 is stride_in_1x1 and conv.pixel_std == std and conv.channel_order == 'BGR'
    assert conv.roi_align_aligned and conv.sampling_ratio == 0 and not conv.anchor_rounding
    assert m.mask_on is mask and m.num_classes == 81 and m.backbone.norm_eps == 1e-5
    # Base-RCNN-FPN.yaml's RPN settings, not Detectron2's C4 defaults (12000 / 6000)
    assert (m.rpn.pre_nms_topk_train, m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_train,
            m.rpn.post_nms_topk_test) == (2000, 1000, 1000, 1000)
    assert m.rpn.min_size == 0 and m.roi.min_size == 0 and m.roi.box_pool_size == 7
    assert (m.roi.score_thresh, m.roi.nms_thresh, m.roi.detections_per_img) == (0.05, 0.5, 100)
    assert cfg.data.min_size == (640, 672, 704, 736, 768, 800) and cfg.data.test_min_size == 800
    assert info['labels'] == 'coco_category_id'
    assert info['label_ids'][:4] == [0, 1, 2, 3] and info['label_ids'][-1] == 90 and len(info['label_ids']) == 81
    assert info['class_names'][1] == 'person' and 'N/A' not in info['class_names']


def test_base_chain_overrides_and_class_index_labels(tmp_path):
    _write_yaml(tmp_path / 'mid.yaml', R50, 'INPUT:\n  MIN_SIZE_TEST: 600\n  FORMAT: "RGB"\n')
    top = tmp_path / 'sub'
    top.mkdir()
    # a relative _BASE_, as the zoo writes them, resolved against the including file
    (top / 'top.yaml').write_text('_BASE_: "../mid.yaml"\nMODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 3\n'
                                  '    SCORE_THRESH_TEST: 0.3\n  PIXEL_MEAN: [1.0, 2.0, 3.0]\n'
                                  'DATASETS:\n  TRAIN: ("balloon_train",)\nSOLVER:\n  BASE_LR: 0.00025\n')
    cfg, info = d2c.config_from_yaml(top / 'top.yaml')
    assert cfg.data.test_min_size == 600 and cfg.model.num_classes == 4 and cfg.model.roi.score_thresh == 0.3
    assert cfg.model.conventions.channel_order == 'RGB' and cfg.model.conventions.pixel_mean == (1.0, 2.0, 3.0)
    assert info['labels'] == 'detectron2_class_index' and info['label_ids'] == [-1, 0, 1, 2]


@pytest.mark.parametrize('name, depth, config_file', [
    ('COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml', 50, 'maskrcnn_r50_c4_detectron2.py'),
    ('COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x.yaml', 101, None),
    ('Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml', 50, 'cascade_maskrcnn_r50_fpn_detectron2.py'),
])
def test_c4_and_cascade_zoo_configs(name, depth, config_file):
    """C4 (Res5ROIHeads) and Cascade (CascadeROIHeads) map onto roi.heads 'res5' / 'cascade' with
    their settings; the repository's config files for them build the same model."""
    from mrcnn_jax.config import load_config
    cfg, info = d2c.config_from_yaml(ZOO / name)
    m = cfg.model
    assert m.backbone.depth == depth and m.mask_on and m.num_classes == 81 and info['labels'] == 'coco_category_id'
    if 'C4' in name:
        assert m.roi.heads == 'res5' and not m.fpn.enabled and tuple(m.backbone.return_levels) == (4,)
        assert m.size_divisible == 1 and tuple(m.anchors.sizes) == ((32.0, 64.0, 128.0, 256.0, 512.0),)
        assert (m.rpn.pre_nms_topk_train, m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_train,
                m.rpn.post_nms_topk_test) == (12000, 6000, 2000, 1000)
        assert m.roi.box_pool_size == m.roi.mask_resolution == 14 and m.roi.mask_head_convs == 0
    else:
        assert m.roi.heads == 'cascade' and m.fpn.enabled and m.roi.cascade_ious == (0.5, 0.6, 0.7)
        assert m.roi.cascade_box_weights == ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15))
        assert m.rpn.post_nms_topk_train == 2000 and m.roi.mask_resolution == 28
    if config_file:   # the same model: resolved conventions and every other field
        from mrcnn_jax.models.conventions import Conventions
        ours = load_config(pathlib.Path(__file__).resolve().parents[2] / 'configs' / config_file).model
        assert Conventions.from_config(ours.conventions) == Conventions.from_config(m.conventions), config_file
        ours, m = ours.to_dict(), m.to_dict()
        ours.pop('conventions'), m.pop('conventions')
        assert ours == m, config_file


KEYPOINTS = ZOO / 'COCO-Keypoints'


@pytest.mark.parametrize('name, depth, groups', [('keypoint_rcnn_R_50_FPN_3x.yaml', 50, 1),
                                                 ('keypoint_rcnn_R_101_FPN_3x.yaml', 101, 1),
                                                 ('keypoint_rcnn_X_101_32x8d_FPN_3x.yaml', 101, 32)])
def test_keypoint_zoo_configs(name, depth, groups):
    """Keypoint R-CNN (Base-Keypoint-RCNN-FPN.yaml): the keypoint head's settings, one class
    (person: COCO category 1 on Detectron2's keypoints_coco_* splits), no masks, the yaml's box
    smooth-L1 beta 0.5 in the conventions, 1500 training proposals; R50's config file builds the
    same model."""
    from mrcnn_jax.config import load_config
    from mrcnn_jax.models.conventions import Conventions
    cfg, info = d2c.config_from_yaml(KEYPOINTS / name)
    m = cfg.model
    assert (m.backbone.depth, m.backbone.groups) == (depth, groups) and m.roi.heads == 'standard'
    assert m.keypoint_on and not m.mask_on and m.num_keypoints == 17 and m.num_classes == 2
    assert (m.roi.keypoint_head_convs, m.roi.keypoint_head_channels, m.roi.keypoint_pool_size) == (8, 512, 14)
    conv = Conventions.from_config(m.conventions)
    assert conv.box_smooth_l1_beta == 0.5 and conv.rpn_smooth_l1_beta == 0.0
    assert conv.keypoint_score == 'pool_softmax' and conv.roi_align_aligned and conv.sampling_ratio == 0
    assert m.rpn.post_nms_topk_train == 1500 and m.rpn.post_nms_topk_test == 1000
    assert cfg.data.keypoints and cfg.data.num_keypoints == 17 and tuple(cfg.data.keypoint_oks_sigmas) == ()
    assert info['labels'] == 'coco_category_id' and info['label_ids'] == [0, 1]
    assert info['class_names'] == ['__background__', 'person']
    if depth == 50:
        ours = load_config(pathlib.Path(__file__).resolve().parents[2] / 'configs' /
                           'keypoint_rcnn_r50_fpn_detectron2.py')
        assert Conventions.from_config(ours.model.conventions) == conv
        a, b = ours.model.to_dict(), m.to_dict()
        a.pop('conventions'), b.pop('conventions')
        assert a == b
        assert ours.data.keypoints and ours.data.num_keypoints == 17


def test_keypoint_settings(tmp_path):
    """KEYPOINT_ON on a Mask R-CNN yaml (masks and keypoints), the head's width and depth from
    CONV_DIMS, OKS sigmas recorded, the data loader's MIN_KEYPOINTS_PER_IMAGE ignored, another
    dataset's labels; a keypoint yaml that turns KEYPOINT_ON off reads none of its head's keys."""
    sigmas = ', '.join(['0.05'] * 5)
    path = _write_yaml(tmp_path / 'kp.yaml', R50, 'MODEL:\n  KEYPOINT_ON: True\n  ROI_HEADS:\n    NUM_CLASSES: 1\n'
                       '  ROI_KEYPOINT_HEAD:\n    NUM_KEYPOINTS: 5\n    CONV_DIMS: [64, 64, 64]\n'
                       '    POOLER_RESOLUTION: 7\n    MIN_KEYPOINTS_PER_IMAGE: 3\n'
                       f'TEST:\n  KEYPOINT_OKS_SIGMAS: [{sigmas}]\nDATASETS:\n  TRAIN: ("hands_train",)\n')
    cfg, info = d2c.config_from_yaml(path)
    m = cfg.model
    assert m.mask_on and m.keypoint_on and m.num_keypoints == 5 and cfg.data.num_keypoints == 5
    assert (m.roi.keypoint_head_convs, m.roi.keypoint_head_channels, m.roi.keypoint_pool_size) == (3, 64, 7)
    assert tuple(cfg.data.keypoint_oks_sigmas) == (0.05,) * 5
    assert info['labels'] == 'detectron2_class_index' and info['label_ids'] == [-1, 0]
    path = _write_yaml(tmp_path / 'off.yaml', KEYPOINTS / 'keypoint_rcnn_R_50_FPN_3x.yaml',
                       'MODEL:\n  KEYPOINT_ON: False\n  ROI_KEYPOINT_HEAD:\n    NAME: "Other"\n')
    assert not d2c.config_from_yaml(path)[0].model.keypoint_on


@pytest.mark.parametrize('body, key', [
    ('NAME: "MyKeypointHead"', 'MODEL.ROI_KEYPOINT_HEAD.NAME'),
    ('NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS: False', 'NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS'),
    ('LOSS_WEIGHT: 4.0', 'MODEL.ROI_KEYPOINT_HEAD.LOSS_WEIGHT'),
    ('CONV_DIMS: [512, 256]', 'MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS'),
    ('POOLER_TYPE: "ROIAlign"', 'MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE'),
    ('POOLER_SAMPLING_RATIO: 2', 'MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO'),
    ('NUM_KEYPOINTS: 0', 'MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS'),
    ('NORM: "GN"', 'MODEL.ROI_KEYPOINT_HEAD.NORM'),
])
def test_unsupported_keypoint_keys_are_named(tmp_path, body, key):
    path = _write_yaml(tmp_path / 'kp.yaml', KEYPOINTS / 'keypoint_rcnn_R_50_FPN_3x.yaml',
                       f'MODEL:\n  ROI_KEYPOINT_HEAD:\n    {body}\n')
    with pytest.raises(Detectron2ConfigError) as e:
        d2c.config_from_yaml(path)
    assert key in str(e.value) and 'kp.yaml' in str(e.value) and '\n' not in str(e.value)
    path = _write_yaml(tmp_path / 'sigmas.yaml', KEYPOINTS / 'keypoint_rcnn_R_50_FPN_3x.yaml',
                       'TEST:\n  KEYPOINT_OKS_SIGMAS: [0.1, 0.2]\n')
    with pytest.raises(Detectron2ConfigError, match='KEYPOINT_OKS_SIGMAS has 2 values for 17 keypoints'):
        d2c.config_from_yaml(path)


@pytest.mark.parametrize('config, body, keys', [
    # Res5ROIHeads on an FPN backbone, StandardROIHeads on C4: the first key that does not fit
    (R50, 'MODEL:\n  ROI_HEADS:\n    NAME: "Res5ROIHeads"\n', ('MODEL.BACKBONE.NAME', 'Res5ROIHeads')),
    (ZOO / 'COCO-InstanceSegmentation' / 'mask_rcnn_R_50_C4_3x.yaml',
     'MODEL:\n  ROI_HEADS:\n    NAME: "StandardROIHeads"\n', ('MODEL.BACKBONE.NAME', 'StandardROIHeads')),
    (ZOO / 'Misc' / 'cascade_mask_rcnn_R_50_FPN_3x.yaml',
     'MODEL:\n  ROI_BOX_CASCADE_HEAD:\n    IOUS: [0.5, 0.6]\n', ('BBOX_REG_WEIGHTS', 'IOUS', '3 stages', '2 stages')),
    (ZOO / 'Misc' / 'cascade_mask_rcnn_R_50_FPN_3x.yaml',
     'MODEL:\n  ROI_BOX_HEAD:\n    CLS_AGNOSTIC_BBOX_REG: False\n', ('CLS_AGNOSTIC_BBOX_REG', 'CascadeROIHeads')),
    (R50, 'MODEL:\n  ROI_HEADS:\n    NAME: "PointRendROIHeads"\n', ('MODEL.ROI_HEADS.NAME', 'PointRendROIHeads')),
    # Res5ROIHeads has no keypoint branch (Detectron2 asserts it)
    (ZOO / 'COCO-InstanceSegmentation' / 'mask_rcnn_R_50_C4_3x.yaml', 'MODEL:\n  KEYPOINT_ON: True\n',
     ('MODEL.KEYPOINT_ON', 'Res5ROIHeads')),
])
def test_incompatible_heads_are_one_line_errors(tmp_path, config, body, keys):
    path = _write_yaml(tmp_path / 'mixed.yaml', config, body)
    with pytest.raises(Detectron2ConfigError) as e:
        d2c.config_from_yaml(path)
    msg = str(e.value)
    assert all(k in msg for k in keys) and 'mixed.yaml' in msg and '\n' not in msg, msg


@pytest.mark.parametrize('config, key', [
    ('Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5.yaml', 'MODEL.RESNETS.DEFORM_ON_PER_STAGE'),
    ('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_giou.yaml', 'BBOX_REG_LOSS_TYPE'),
    ('Misc/mask_rcnn_R_50_FPN_1x_cls_agnostic.yaml', 'CLS_AGNOSTIC_BBOX_REG'),
    ('COCO-InstanceSegmentation/mask_rcnn_R_50_DC5_3x.yaml', 'MODEL.'),
    ('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py', 'LazyConfig'),
])
def test_unsupported_zoo_configs_name_the_key(config, key):
    with pytest.raises(Detectron2ConfigError) as e:
        d2c.config_from_yaml(ZOO / config)
    msg = str(e.value)
    assert key in msg and config.split('/')[-1] in msg and '\n' not in msg


@pytest.mark.parametrize('body, key', [
    ('MODEL:\n  ROI_BOX_HEAD:\n    NORM: "GN"\n', 'MODEL.ROI_BOX_HEAD.NORM'),           # norms in heads
    ('MODEL:\n  ROI_MASK_HEAD:\n    NAME: "CoarseMaskHead"\n', 'MODEL.ROI_MASK_HEAD.NAME'),   # PointRend
    ('MODEL:\n  POINT_HEAD:\n    NUM_FC: 3\n', 'MODEL.POINT_HEAD.NUM_FC'),
    ('MODEL:\n  RESNETS:\n    NORM: "SyncBN"\n', 'MODEL.RESNETS.NORM'),
    ('MODEL:\n  ANCHOR_GENERATOR:\n    OFFSET: 0.5\n', 'MODEL.ANCHOR_GENERATOR.OFFSET'),
    ('INPUT:\n  CROP:\n    ENABLED: True\n', 'INPUT.CROP.ENABLED'),
    ('MODEL:\n  ROI_MASK_HEAD:\n    POOLER_TYPE: "ROIAlign"\n', 'MODEL.ROI_MASK_HEAD.POOLER_TYPE'),
    ('MODEL:\n  TYPO_KEY: 1\n', 'MODEL.TYPO_KEY'),
    ('MODEL:\n  RESNETS:\n    STEM_OUT_CHANNELS: 32\n    RES2_OUT_CHANNELS: 128\n', 'STEM_OUT_CHANNELS'),
])
def test_unsupported_keys_are_named(tmp_path, body, key):
    path = _write_yaml(tmp_path / 'x.yaml', R50, body)
    with pytest.raises(Detectron2ConfigError) as e:
        d2c.config_from_yaml(path)
    assert key in str(e.value) and '\n' not in str(e.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(Detectron2ConfigError, match='not found'):
        d2c.config_from_yaml(tmp_path / 'missing.yaml')
    (tmp_path / 'bad.yaml').write_text('MODEL: [unclosed\n')
    with pytest.raises(Detectron2ConfigError, match='bad.yaml: not a valid yaml'):
        d2c.config_from_yaml(tmp_path / 'bad.yaml')
    (tmp_path / 'loop.yaml').write_text('_BASE_: "loop.yaml"\n')
    with pytest.raises(Detectron2ConfigError, match='loops'):
        d2c.config_from_yaml(tmp_path / 'loop.yaml')
    # a feature left off does not read its keys: MASK_ON False ignores the mask head's settings
    path = _write_yaml(tmp_path / 'box.yaml', R50, 'MODEL:\n  MASK_ON: False\n  ROI_MASK_HEAD:\n    NORM: "GN"\n')
    assert d2c.config_from_yaml(path)[0].model.mask_on is False


# -- weights ---------------------------------------------------------------------------------

def test_convert_maps_keys_and_class_layout(small):
    yaml_path, sd, pkl = small
    cfg, _ = d2c.config_from_yaml(yaml_path)
    v = _flat(d2c.convert_state_dict(d2c.load_checkpoint(pkl), cfg.model))
    k = NUM_CLASSES
    # classifier: background row moved from last to first; softmax is invariant to the order
    w, b = sd['roi_heads.box_predictor.cls_score.weight'], sd['roi_heads.box_predictor.cls_score.bias']
    ours_w, ours_b = v['params/roi_heads/box_predictor/cls_score/kernel'], v['params/roi_heads/box_predictor/cls_score/bias']
    np.testing.assert_array_equal(ours_w[:, 0], w[k])
    np.testing.assert_array_equal(ours_w[:, 1:], w[:k].T)
    np.testing.assert_array_equal(ours_b, np.concatenate([b[k:], b[:k]]))
    # class-specific regression and mask predictor: a zero background slot first
    bp = v['params/roi_heads/box_predictor/bbox_pred/kernel']
    assert bp.shape == (1024, 4 * (k + 1))
    np.testing.assert_array_equal(bp[:, :4], 0)
    np.testing.assert_array_equal(bp[:, 4:], sd['roi_heads.box_predictor.bbox_pred.weight'].T)
    mk = v['params/roi_heads/mask_head/mask_fcn_logits_kernel']
    np.testing.assert_array_equal(mk[:, 0], 0)
    np.testing.assert_array_equal(mk[:, 1:], sd['roi_heads.mask_head.predictor.weight'][:, :, 0, 0].T)
    # fc1 reads (c, y, x)-flattened features; ours are (y, x, c)
    fc1 = sd['roi_heads.box_head.fc1.weight']
    np.testing.assert_array_equal(v['params/roi_heads/box_head/fc6/kernel'][(2 * 7 + 3) * 256 + 5],
                                  fc1[:, 5 * 49 + 2 * 7 + 3])
    np.testing.assert_array_equal(v['params/backbone/layer3_0/conv2/kernel'],
                                  sd['backbone.bottom_up.res4.0.conv2.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v['frozen/backbone/layer3_0/downsample_bn/running_var'],
                                  sd['backbone.bottom_up.res4.0.shortcut.norm.running_var'])
    np.testing.assert_array_equal(v['params/roi_heads/mask_head/conv5_mask_kernel'],
                                  sd['roi_heads.mask_head.deconv.weight'].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(v['params/rpn_head/cls_logits/bias'],
                                  sd['proposal_generator.rpn_head.objectness_logits.bias'])


def test_convert_keypoint_head(tmp_path, capsys):
    """KRCNNConvDeconvUpsampleHead's keys (a narrow head, 2 x 32 convs, on the keypoint zoo yaml):
    conv_fcn{i} as convs, score_lowres (ConvTranspose2d [in, K, 4, 4]) to [4, 4, in, K]; one class
    (person) with its background; `mrcnn-jax convert` writes a keypoint model directory (labels:
    COCO category 1)."""
    path = _write_yaml(tmp_path / 'kp.yaml', KEYPOINTS / 'keypoint_rcnn_R_50_FPN_3x.yaml',
                       'MODEL:\n  ROI_KEYPOINT_HEAD:\n    CONV_DIMS: [32, 32]\n')
    get_cfg, build_model = _detectron2()
    d2cfg = get_cfg()
    d2cfg.merge_from_file(str(path))
    d2cfg.MODEL.DEVICE = 'cpu'
    torch.manual_seed(0)
    model = build_model(d2cfg).eval()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg, _ = d2c.config_from_yaml(path)
    v = _flat(d2c.convert_state_dict(d2c.load_checkpoint(sd), cfg.model))
    kp = 'params/roi_heads/keypoint_head/'
    assert sorted(k[len(kp):] for k in v if k.startswith(kp)) == [
        'conv_fcn1/bias', 'conv_fcn1/kernel', 'conv_fcn2/bias', 'conv_fcn2/kernel', 'score_lowres_bias',
        'score_lowres_kernel']
    np.testing.assert_array_equal(v[kp + 'conv_fcn2/kernel'],
                                  sd['roi_heads.keypoint_head.conv_fcn2.weight'].transpose(2, 3, 1, 0))
    assert sd['roi_heads.keypoint_head.score_lowres.weight'].shape == (32, 17, 4, 4)
    np.testing.assert_array_equal(v[kp + 'score_lowres_kernel'],
                                  sd['roi_heads.keypoint_head.score_lowres.weight'].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(v[kp + 'score_lowres_bias'], sd['roi_heads.keypoint_head.score_lowres.bias'])
    w = sd['roi_heads.box_predictor.cls_score.weight']      # [person, background]
    np.testing.assert_array_equal(v['params/roi_heads/box_predictor/cls_score/kernel'], w[::-1].T)
    assert not any('mask_head' in k for k in v)
    bad = dict(sd)
    del bad['roi_heads.keypoint_head.score_lowres.bias']
    with pytest.raises(StateDictError, match='missing keys \\(1\\): roi_heads.keypoint_head.score_lowres.bias'):
        d2c.convert_state_dict(bad, cfg.model)

    from mrcnn_jax.cli import main
    from mrcnn_jax.model_dir import load_model_dir
    pkl = tmp_path / 'model_final.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': sd, '__author__': 'mrcnn_jax tests', 'matching_heuristics': False}, f)
    assert main(['convert', '--from', 'detectron2', str(pkl), str(tmp_path / 'out'), '--config-file', str(path)]) == 0
    capsys.readouterr()
    cfg2, variables, meta = load_model_dir(tmp_path / 'out')
    assert cfg2.model.keypoint_on and cfg2.model.num_keypoints == 17 and cfg2.model.roi.keypoint_head_channels == 32
    assert meta['label_space'] == 'coco_category_id' and meta['label_ids'] == [0, 1]
    np.testing.assert_array_equal(_flat(variables)[kp + 'score_lowres_kernel'], v[kp + 'score_lowres_kernel'])


def test_pkl_pth_and_state_dict_forms_agree(small, tmp_path):
    _, sd, pkl = small
    ref = d2c.load_checkpoint(pkl)
    pth = tmp_path / 'model_0004999.pth'   # what Detectron2's trainer writes
    torch.save({'model': {f'module.{k}': torch.from_numpy(a) for k, a in sd.items()}, 'iteration': 4999}, pth)
    for other in (d2c.load_checkpoint(pth), d2c.load_checkpoint({'model': sd}), d2c.load_checkpoint(sd)):
        assert set(other) == set(ref)
        for key in ref:
            np.testing.assert_array_equal(other[key], ref[key])


def test_caffe2_and_classification_checkpoints_are_refused(tmp_path):
    blobs = tmp_path / 'R-50.pkl'
    with open(blobs, 'wb') as f:
        pickle.dump({'blobs': {'conv1_w': np.zeros((64, 3, 7, 7), np.float32)}}, f)
    with pytest.raises(StateDictError, match='Caffe2'):
        d2c.load_checkpoint(blobs)
    backbone = tmp_path / 'torchvision-R-50.pkl'   # Detectron2's converted ImageNet backbones
    with open(backbone, 'wb') as f:
        pickle.dump({'model': {'stem.conv1.weight': np.zeros((64, 3, 7, 7), np.float32),
                               'res2.0.conv1.weight': np.zeros((64, 64, 1, 1), np.float32)},
                     '__author__': 'torchvision', 'matching_heuristics': True}, f)
    with pytest.raises(StateDictError, match='classification / backbone-only'):
        d2c.load_checkpoint(backbone)
    text = tmp_path / 'notes.pkl'
    text.write_text('hello')
    with pytest.raises(StateDictError, match='not a pickle'):
        d2c.load_checkpoint(text)


def test_checkpoint_that_does_not_fit_its_config_lists_every_key(small):
    yaml_path, sd, _ = small
    cfg, _ = d2c.config_from_yaml(yaml_path)
    bad = dict(sd)
    del bad['backbone.fpn_output3.bias']
    bad['roi_heads.extra.weight'] = np.zeros(3, np.float32)
    bad['roi_heads.box_head.fc2.weight'] = np.zeros((1024, 512), np.float32)
    with pytest.raises(StateDictError) as e:
        d2c.convert_state_dict(bad, cfg.model)
    msg = str(e.value)
    assert 'missing keys (1): backbone.fpn_output3.bias' in msg
    assert 'unexpected keys (1): roi_heads.extra.weight' in msg
    assert 'roi_heads.box_head.fc2.weight' in msg and 'mis-shaped' in msg
    # another class count than the config's
    cfg81, _ = d2c.config_from_yaml(R50)
    with pytest.raises(StateDictError, match='cls_score'):
        d2c.convert_state_dict(sd, cfg81.model)


# -- the command and the predictor -------------------------------------------------------------

def test_convert_command_writes_a_model_dir(small, tmp_path, capsys):
    from mrcnn_jax import Predictor
    from mrcnn_jax.cli import main
    from mrcnn_jax.model_dir import load_model_dir

    yaml_path, _, pkl = small
    out = tmp_path / 'converted'
    assert main(['convert', '--from', 'detectron2', str(pkl), str(out), '--config-file', str(yaml_path),
                 '--score-thresh', '0.25']) == 0
    assert 'detectron2 Mask R-CNN R50-FPN (6 classes with the background; labels: detectron2_class_index)' in capsys.readouterr().out
    cfg, variables, meta = load_model_dir(out)
    assert meta['label_space'] == 'detectron2_class_index' and meta['label_ids'] == [-1, 0, 1, 2, 3, 4]
    assert cfg.model.conventions.name == 'detectron2' and cfg.model.roi.score_thresh == 0.25
    p = Predictor.from_detectron2(pkl, config_file=yaml_path, score_thresh=0.25)
    assert p.config.to_json() == cfg.to_json()
    a, b = _flat(variables), _flat(p.variables)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    # bad input: one line, nothing written
    bad = tmp_path / 'bad_out'
    with pytest.raises(StateDictError):
        main(['convert', '--from', 'detectron2', str(pkl), str(bad), '--config-file', str(R50)])
    assert not bad.exists()
    assert main(['convert', '--from', 'detectron2', str(pkl), str(bad)]) == 2
    assert '--config-file' in capsys.readouterr().err and not bad.exists()


def test_init_from_a_detectron2_checkpoint_reinitializes_class_rows(small, capsys):
    """A 5-class Detectron2 checkpoint initializes a 2-class model: everything but the class rows
    is taken, and the log names the re-initialized predictor arrays."""
    import jax

    from mrcnn_jax.models.mask_rcnn import abstract_variables
    from mrcnn_jax.training.loop import load_initial_weights

    yaml_path, sd, pkl = small
    cfg, _ = d2c.config_from_yaml(yaml_path)
    cfg.model.num_classes = 3
    fresh = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, s.dtype), abstract_variables(cfg.model))
    got = _flat(load_initial_weights(fresh, str(pkl), model_cfg=cfg.model))
    out = capsys.readouterr().out
    assert 're-initialized 6 arrays' in out and '(5 classes in the checkpoint, 2 in the model)' in out
    for name in ('cls_score/kernel', 'bbox_pred/bias', 'mask_fcn_logits_kernel'):
        assert name in out
    np.testing.assert_array_equal(got['params/roi_heads/box_predictor/cls_score/kernel'], 7.0)
    np.testing.assert_array_equal(got['params/backbone/layer1_0/conv1/kernel'],
                                  sd['backbone.bottom_up.res2.0.conv1.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(got['params/roi_heads/box_head/fc7/kernel'], sd['roi_heads.box_head.fc2.weight'].T)
