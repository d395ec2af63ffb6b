"""mrcnn_jax.convert.torchvision and the model directory: key-name variants, BatchNorm entries,
wrappers, error messages, architecture recognition, and the save / load round trip.

Most checks convert small torchvision models (ResNet-18 body) and compare variable trees; one
R50 (fasterrcnn_resnet50_fpn) checks recognition; one compiled run checks the round trip.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torchvision.models.detection import MaskRCNN as TVMaskRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402

from mrcnn_jax import Predictor  # noqa: E402
from mrcnn_jax.convert import torchvision as tv_convert  # noqa: E402
from mrcnn_jax.convert.torchvision import StateDictError  # noqa: E402
from mrcnn_jax.model_dir import CheckpointMismatchError, load_model_dir, save_model_dir  # noqa: E402
from mrcnn_jax.models.mask_rcnn import MaskRCNN, abstract_variables  # noqa: E402
from tv_reference import build_torchvision_maskrcnn, state_dict_numpy  # noqa: E402


def _flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def assert_same_variables(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


_EXPECTED = {}


def _convert(sd):
    """load + recognise + convert (the model's variable shapes traced once per architecture)."""
    sd = tv_convert.load_state_dict(sd)
    cfg = tv_convert.model_config_from_state_dict(sd)
    key = cfg.to_json()
    if key not in _EXPECTED:
        _EXPECTED[key] = abstract_variables(cfg)
    return cfg, tv_convert.convert_state_dict(sd, cfg, _EXPECTED[key])


@pytest.fixture(scope='module')
def r18():
    """A calibrated torchvision Mask R-CNN, ResNet-18 FPN body, 7 classes, small image sizes."""
    model = build_torchvision_maskrcnn(seed=0, depth=18, num_classes=7, min_size=64, max_size=96)
    sd = state_dict_numpy(model)
    cfg, variables = _convert(sd)
    return model, sd, cfg, variables


def test_recognises_architecture(r18):
    _, sd, cfg, variables = r18
    assert cfg.backbone.depth == 18 and cfg.backbone.width == 64
    assert cfg.num_classes == 7 and cfg.mask_on
    assert cfg.roi.mask_head_convs == 4 and cfg.roi.mask_head_channels == 256
    p = variables['params']
    # OIHW -> HWIO; Linear [out, in] -> [in, out]; fc6 rows permuted from (c, y, x) to (y, x, c).
    np.testing.assert_array_equal(p['backbone']['conv1']['kernel'],
                                  sd['backbone.body.conv1.weight'].transpose(2, 3, 1, 0))
    r = p['roi_heads']
    np.testing.assert_array_equal(r['box_predictor']['cls_score']['kernel'], sd['roi_heads.box_predictor.cls_score.weight'].T)
    fc6 = sd['roi_heads.box_head.fc6.weight']                      # [1024, 256 * 7 * 7]
    c, y, x = 17, 3, 5
    np.testing.assert_array_equal(r['box_head']['fc6']['kernel'][(y * 7 + x) * 256 + c], fc6[:, c * 49 + y * 7 + x])
    np.testing.assert_array_equal(r['mask_head']['conv5_mask_kernel'],
                                  sd['roi_heads.mask_predictor.conv5_mask.weight'].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(variables['frozen']['backbone']['bn1']['running_var'], sd['backbone.body.bn1.running_var'])


def _legacy_name(k):
    """The key names of torchvision < 0.13."""
    k = re.sub(r'^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.', r'backbone.fpn.\1.\2.', k)
    k = re.sub(r'^rpn\.head\.conv\.0\.0\.', 'rpn.head.conv.', k)
    return re.sub(r'^roi_heads\.mask_head\.(\d+)\.0\.', lambda m: f'roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.', k)


def test_legacy_key_names(r18):
    _, sd, cfg, variables = r18
    legacy = {_legacy_name(k): v for k, v in sd.items()}
    renamed = set(legacy) - set(sd)
    assert {'backbone.fpn.inner_blocks.0.weight', 'backbone.fpn.layer_blocks.3.bias', 'rpn.head.conv.weight',
            'roi_heads.mask_head.mask_fcn1.weight', 'roi_heads.mask_head.mask_fcn4.bias'} <= renamed
    assert len(renamed) == 8 * 2 + 2 + 4 * 2
    cfg2, converted = _convert(legacy)
    assert cfg2 == cfg
    assert_same_variables(converted, variables)


def test_wrappers_and_module_prefix(r18):
    model, sd, cfg, variables = r18
    torch_sd = model.state_dict()
    for wrapped in ({'model': torch_sd}, {'state_dict': {f'module.{k}': v for k, v in torch_sd.items()}},
                    {f'module.{k}': v for k, v in sd.items()}):
        _, converted = _convert(wrapped)
        assert_same_variables(converted, variables)


def test_pth_path_and_num_batches_tracked(r18, tmp_path):
    model, sd, cfg, variables = r18
    path = tmp_path / 'model.pth'
    with_counter = dict(model.state_dict())
    with_counter['backbone.body.bn1.num_batches_tracked'] = torch.tensor(7)
    torch.save({'model': with_counter, 'epoch': 3}, path)
    for src in (str(path), path):
        _, converted = _convert(src)
        assert_same_variables(converted, variables)


def test_plain_batchnorm_state_dict():
    """weights=None builds nn.BatchNorm2d (with num_batches_tracked); eval-mode BN is a frozen BN
    with eps 1e-5, so the converted backbone + FPN reproduce torchvision's features."""
    torch.manual_seed(0)
    body = torchvision.models.resnet18(weights=None)
    assert isinstance(body.bn1, torch.nn.BatchNorm2d)
    model = TVMaskRCNN(_resnet_fpn_extractor(body, 5), num_classes=91).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
        x = torch.rand(1, 3, 64, 96, generator=gen)
        ref = model.backbone(x)
    sd = model.state_dict()
    assert any(k.endswith('num_batches_tracked') for k in sd)
    p = Predictor.from_torchvision(sd, norm_eps=1e-5, min_size=64, max_size=96)
    assert p.config.model.backbone.depth == 18 and p.config.model.backbone.norm_eps == 1e-5
    images = jnp.asarray(x[0].permute(1, 2, 0).numpy()[None])
    info = jnp.asarray([[64, 96, 64, 96, 1, 1]], jnp.float32)
    feats = jax.jit(lambda v, a, b: p.model.apply(v, a, b, method=MaskRCNN.features))(p.variables, images, info)
    for key, ours in zip(['0', '1', '2', '3', 'pool'], feats):
        theirs = ref[key][0].permute(1, 2, 0).numpy()
        rel = float(np.abs(np.asarray(ours[0]) - theirs).max() / np.abs(theirs).max())
        assert rel < 1e-4, (key, rel)


def test_missing_key_is_named(r18):
    _, sd, cfg, _ = r18
    broken = {k: v for k, v in sd.items() if k not in ('roi_heads.box_head.fc7.weight', 'backbone.body.layer2.0.bn1.running_var')}
    with pytest.raises(StateDictError) as e:
        tv_convert.convert_state_dict(broken, cfg, _EXPECTED[cfg.to_json()])
    msg = str(e.value)
    assert 'missing' in msg and 'roi_heads.box_head.fc7.weight' in msg
    assert 'backbone.body.layer2.0.bn1.running_var' in msg
    assert 'unexpected' not in msg and 'mis-shaped' not in msg


@pytest.mark.parametrize('key', ['rpn.head.cls_logits.weight', 'backbone.fpn.inner_blocks.0.0.weight',
                                 'roi_heads.box_head.fc6.weight', 'roi_heads.mask_head.0.0.weight',
                                 'backbone.body.layer4.1.bn2.running_mean'])
def test_missing_key_through_predictor(r18, key):
    """Also the keys the architecture is read from: a StateDictError naming them (not a KeyError)."""
    _, sd, _, _ = r18
    with pytest.raises(StateDictError, match='missing') as e:
        Predictor.from_torchvision({k: v for k, v in sd.items() if k != key})
    assert key in str(e.value)


def test_unexpected_key_is_named(r18):
    _, sd, cfg, _ = r18
    broken = dict(sd)
    broken['roi_heads.keypoint_head.0.weight'] = np.zeros((3, 3), np.float32)
    with pytest.raises(StateDictError) as e:
        Predictor.from_torchvision(broken)
    msg = str(e.value)
    assert 'unexpected' in msg and 'roi_heads.keypoint_head.0.weight' in msg and 'missing' not in msg


def test_misshaped_keys_are_named(r18):
    _, sd, cfg, _ = r18
    broken = dict(sd)
    broken['rpn.head.bbox_pred.weight'] = np.zeros((12, 256, 3, 3), np.float32)      # 1x1 expected
    broken['roi_heads.box_head.fc6.weight'] = np.zeros((1024, 256 * 6 * 6), np.float32)
    broken['backbone.body.layer1.0.bn1.weight'] = np.zeros((32,), np.float32)
    with pytest.raises(StateDictError) as e:
        tv_convert.convert_state_dict(broken, cfg, _EXPECTED[cfg.to_json()])
    msg = str(e.value)
    assert 'mis-shaped' in msg
    for k in ('rpn.head.bbox_pred.weight', 'roi_heads.box_head.fc6.weight', 'backbone.body.layer1.0.bn1.weight'):
        assert k in msg, k
    assert '(12, 256, 3, 3)' in msg


def test_not_a_detection_state_dict():
    sd = {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    with pytest.raises(StateDictError, match='backbone.body.conv1.weight'):
        Predictor.from_torchvision(sd)
    with pytest.raises(StateDictError):
        tv_convert.load_state_dict([1, 2, 3])


def test_fasterrcnn_resnet50_fpn_recognised():
    """fasterrcnn_resnet50_fpn(weights=None): R50, plain BatchNorm2d, no mask head."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    sd = model.state_dict()
    assert any(k.endswith('num_batches_tracked') for k in sd)
    p = Predictor.from_torchvision(sd)
    m = p.config.model
    assert (m.backbone.depth, m.backbone.groups, m.num_classes, m.mask_on) == (50, 1, 91, False)
    assert p.model.mask_head is None and 'mask_head' not in p.variables['params']['roi_heads']
    np.testing.assert_array_equal(np.asarray(p.variables['params']['backbone']['layer4_2']['conv3']['kernel']),
                                  sd['backbone.body.layer4.2.conv3.weight'].numpy().transpose(2, 3, 1, 0))
    # COCO category ids, 91 slots.
    assert list(p.label_ids) == list(range(91)) and p.class_names[1] == 'person'
    out = jax.eval_shape(p.model.apply, p.variables, jax.ShapeDtypeStruct((1, 800, 1088, 3), jnp.float32),
                         jax.ShapeDtypeStruct((1, 6), jnp.float32))
    assert set(out) == {'boxes', 'scores', 'labels', 'valid'}
    # Host postprocessing of box-only outputs: no masks.
    raw = {'boxes': np.asarray([[1, 2, 30, 40], [0, 0, 0, 0]], np.float32), 'scores': np.asarray([0.9, 0], np.float32),
           'labels': np.asarray([3, 0], np.int32), 'valid': np.asarray([True, False])}
    res = p.postprocess(raw, np.asarray([400, 544, 800, 1088, 2, 2], np.float32))
    assert set(res) == {'boxes', 'scores', 'labels'}
    np.testing.assert_allclose(res['boxes'], [[0.5, 1, 15, 20]])
    assert list(res['labels']) == [3]
    # The bottleneck key the ResNeXt grouping is read from: missing is a StateDictError too.
    del sd['backbone.body.layer1.0.conv2.weight']
    with pytest.raises(StateDictError, match='backbone.body.layer1.0.conv2.weight'):
        Predictor.from_torchvision(sd)


def test_maskrcnn_with_other_num_classes(r18):
    model, sd, cfg, variables = r18
    p = Predictor.from_torchvision(sd, min_size=64, max_size=96)
    assert p.config.model.num_classes == 7 and p.config.model.mask_on
    assert p.variables['params']['roi_heads']['mask_head']['mask_fcn_logits_kernel'].shape == (256, 7)
    assert p.variables['params']['roi_heads']['box_predictor']['bbox_pred']['kernel'].shape == (1024, 28)
    assert list(p.label_ids) == list(range(7))
    assert p.config.data.test_min_size == 64 and p.config.data.test_max_size == 96


@pytest.fixture(scope='module')
def model_dir(r18, tmp_path_factory):
    _, sd, _, _ = r18
    p = Predictor.from_torchvision(sd, min_size=64, max_size=96)
    cfg = p.config
    cfg.model.rpn.pre_nms_topk_test = 200      # a smaller program to compile
    cfg.model.rpn.post_nms_topk_test = 100
    p = Predictor(cfg, p.variables, label_ids=p.label_ids, class_names=p.class_names)
    path = tmp_path_factory.mktemp('model_dir') / 'converted'
    meta = {'label_ids': [int(i) for i in p.label_ids], 'class_names': [f'class{i}' for i in p.label_ids],
            'source': 'test'}
    save_model_dir(path, p.config, p.variables, meta)
    return p, path


def test_model_dir_round_trip(r18, model_dir):
    model, sd, cfg, variables = r18
    p, path = model_dir
    assert {f.name for f in path.iterdir()} >= {'config.json', 'metadata.json', 'variables'}
    q = Predictor.from_checkpoint(path)
    assert q.config.to_dict() == p.config.to_dict()
    assert q.model == p.model
    assert_same_variables(jax.device_get(q.variables), jax.device_get(p.variables))
    assert q.class_names == [f'class{i}' for i in range(7)] and list(q.label_ids) == list(range(7))
    # Identical outputs. Both models are equal (asserted above), so one compiled program serves
    # both: each predictor's own jit would compile the same program twice.
    q._predict = p._predict
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(128, 60, (50, 70, 3)), 0, 255).astype(np.uint8)
    a, b = p(image), q(image)
    assert len(a['scores']) > 0
    for k in ('boxes', 'scores', 'labels', 'masks'):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_model_dir_with_another_model_config(model_dir):
    p, path = model_dir
    other = p.config.copy_and_resolve_references()
    other.model.num_classes = 91
    with pytest.raises(CheckpointMismatchError) as e:
        load_model_dir(path, other)
    msg = str(e.value)
    assert 'roi_heads/box_predictor/cls_score/kernel' in msg and '(1024, 7)' in msg and '(1024, 91)' in msg
    other = p.config.copy_and_resolve_references()
    other.model.backbone.depth = 34
    with pytest.raises(CheckpointMismatchError) as e:
        Predictor.from_checkpoint(path, config=other)
    assert 'layer1_2' in str(e.value) and 'missing' in str(e.value)
    other = p.config.copy_and_resolve_references()
    other.model.mask_on = False
    with pytest.raises(CheckpointMismatchError, match='mask_head'):
        load_model_dir(path, other)


def test_model_dir_of_the_flat_layout_is_migrated(model_dir, tmp_path):
    """A model directory written before the model was grouped into stages (config keys
    `model.semantics`, `data.resize_rule`, ..., heads at the top of the variables) loads into
    the same config and variables."""
    import json

    import orbax.checkpoint as ocp

    p, path = model_dir
    saved = json.loads((path / 'config.json').read_text())
    conv = saved['model'].pop('conventions')
    assert conv['name'] == 'torchvision'
    saved['model']['semantics'] = 'torchvision'
    saved['model']['backbone']['stride_in_1x1'] = False
    saved['model']['rpn'].update(loss_type='smooth_l1', smooth_l1_beta=1 / 9)
    saved['model']['roi'].update(box_loss_type='smooth_l1', smooth_l1_beta=1 / 9, soft_mask_targets=True,
                                 sampling_ratio=2)
    for k in ('heads', 'box_head', 'box_predictor', 'mask_head'):
        del saved['model']['roi'][k]
    saved['data'].update(resize_rule='torchvision', resize_antialias=False, channel_order='RGB',
                         pixel_scale=1 / 255, pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225])
    legacy = tmp_path / 'legacy'
    legacy.mkdir()
    (legacy / 'config.json').write_text(json.dumps(saved))
    (legacy / 'metadata.json').write_text((path / 'metadata.json').read_text())
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(p.variables))
    roi = variables['params'].pop('roi_heads')
    variables['params']['box_head'] = {**roi['box_head'], **roi['box_predictor']}
    variables['params']['mask_head'] = roi['mask_head']
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(legacy / 'variables', variables)

    cfg, migrated, _ = load_model_dir(legacy)
    assert cfg.to_dict() == p.config.to_dict()
    assert_same_variables(migrated, jax.device_get(p.variables))


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model_dir(tmp_path)
