"""The composed model: shapes and validity masks of every stage on the tiny config, Faster R-CNN
without a mask branch, pluggable heads, bfloat16 compute, padding masks. (Backbones:
test_resnet.py; the conventions: test_conventions.py.)

Compilation dominates on CPU (running a tiny model eagerly compiles every op, which is slower
still), so each test compiles one program: the tiny model is initialised once (jit, 64 px canvas)
and all its stages run in one jitted function; other tests use eval_shape, or random variables
filled in numpy from eval_shape's structure.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from model_helpers import flat, random_variables
from mrcnn_jax.config import load_config
from mrcnn_jax.models.mask_rcnn import MaskRCNN, build_model, init_variables

REPO = pathlib.Path(__file__).resolve().parents[2]
CANVAS = (128, 128)
# Image 0 resized to 96 x 72 (torchvision pads it to 96 x 96), image 1 fills the canvas.
INFO = np.asarray([[120, 90, 96, 72, 0.8, 0.8],
                   [128, 128, 128, 128, 1.0, 1.0]], np.float32)


def tiny_config():
    return load_config(REPO / 'configs' / 'tiny_test.py')


def _images(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (batch,) + CANVAS + (3,)).astype(np.float32)
    for b in range(batch):   # zero outside each image's resized region, as the Predictor pads
        h, w = int(INFO[b, 2]), int(INFO[b, 3])
        x[b, h:] = 0
        x[b, :, w:] = 0
    return jnp.asarray(x)


def _init(model, key=0, canvas=(64, 64)):
    """init_variables on a small canvas (the variables do not depend on the canvas).

    An 'unsafe_rbg' key: with the default threefry the compilation of ~100 initializers takes
    three times as long as the rest of the test."""
    return init_variables(model, jax.random.key(key, impl='unsafe_rbg'), canvas)


def _run_stages(model, variables, images, info):
    """Every stage through its own model.apply, with the same variables."""
    def ap(method, *args):
        return model.apply(variables, *args, method=method)
    feats = ap(MaskRCNN.features, images, info)
    logits, deltas = ap(MaskRCNN.rpn, feats, info)
    anchors, anchor_valid = ap(MaskRCNN.anchors, feats, info)
    boxes, scores, valid, _ = ap(MaskRCNN.proposals, feats, info)
    cls_logits, box_deltas = ap(MaskRCNN.box_predictions, feats, boxes, info)
    det = ap(MaskRCNN.detect, feats, info)
    out = dict(feats=feats, logits=logits, deltas=deltas, anchors=anchors, anchor_valid=anchor_valid,
               proposals=boxes, proposal_scores=scores, proposal_valid=valid, cls_logits=cls_logits,
               box_deltas=box_deltas, det=det)
    if model.mask_head is not None:
        out['mask_logits'] = ap(MaskRCNN.mask_predictions, feats, det['boxes'], det['labels'], info)
    return out


D = 100   # detections_per_img: more than the 24 proposals x 4 classes, so padding rows appear
P = 24    # post-NMS proposals per image


@pytest.fixture(scope='module')
def tiny():
    """The tiny model, its initialised variables, and every stage's output (one compilation)."""
    cfg = tiny_config()
    cfg.model.roi.detections_per_img = D
    cfg.model.rpn.post_nms_topk_test = P
    model = build_model(cfg.model)
    variables = _init(model)
    images = _images()
    info = jnp.asarray(INFO)
    res = jax.jit(lambda v, x, i: _run_stages(model, v, x, i))(variables, images, info)
    return cfg, model, variables, images, info, jax.tree_util.tree_map(np.asarray, res)


def test_init_variables(tiny):
    cfg, model, variables, *_ = tiny
    assert set(variables) == {'params'}   # GroupNorm config: no frozen statistics
    assert set(variables['params']) == {'backbone', 'fpn', 'rpn_head', 'roi_heads'}
    assert set(variables['params']['roi_heads']) == {'box_head', 'box_predictor', 'mask_head'}
    for k, v in flat(variables['params']).items():
        assert v.dtype == jnp.float32, k
    p = variables['params']
    r = p['roi_heads']
    assert set(r['box_head']) == {'fc6', 'fc7'}
    assert r['box_predictor']['cls_score']['kernel'].shape == (cfg.model.roi.fc_dim, 5)
    assert r['box_predictor']['bbox_pred']['kernel'].shape == (cfg.model.roi.fc_dim, 20)
    assert p['rpn_head']['cls_logits']['kernel'].shape == (1, 1, 32, 3)
    assert r['mask_head']['mask_fcn_logits_kernel'].shape == (32, 5)
    assert 'mask_fcn2' in r['mask_head'] and 'mask_fcn3' not in r['mask_head']
    # The same structure whatever the canvas (the Predictor relies on it).
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((2, 96, 160, 3), jnp.float32),
                            jax.ShapeDtypeStruct((2, 6), jnp.float32))
    assert jax.tree_util.tree_map(lambda x: x.shape, shapes) == jax.tree_util.tree_map(lambda x: x.shape, variables)


def test_apply_shapes_and_valid(tiny):
    cfg, model, variables, images, info, res = tiny
    out = res['det']
    assert set(out) == {'boxes', 'scores', 'labels', 'valid', 'masks'}
    assert out['boxes'].shape == (2, D, 4) and out['boxes'].dtype == np.float32
    assert out['scores'].shape == (2, D) and out['scores'].dtype == np.float32
    assert out['labels'].shape == (2, D) and out['labels'].dtype == np.int32
    assert out['valid'].shape == (2, D) and out['valid'].dtype == np.bool_
    assert out['masks'].shape == (2, D, 28, 28) and out['masks'].dtype == np.float32
    counts = out['valid'].sum(axis=1)
    assert (counts > 0).all(), 'random tiny model should detect something'
    assert (counts <= P * 4).all() and (counts > 10).all()
    for b in range(2):
        v = out['valid'][b]
        rh, rw = INFO[b, 2], INFO[b, 3]
        boxes = out['boxes'][b][v]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= rw).all() and (boxes[:, 3] <= rh).all(), 'boxes must be clipped to the image'
        assert (boxes[:, 2:] - boxes[:, :2] >= cfg.model.roi.min_size).all()
        s = out['scores'][b][v]
        assert (s > cfg.model.roi.score_thresh).all() and (np.diff(s) <= 0).all()
        assert ((out['labels'][b][v] >= 1) & (out['labels'][b][v] < 5)).all()
        m = out['masks'][b][v]
        assert (m >= 0).all() and (m <= 1).all()
        # Valid rows first, padding rows zero.
        n = int(v.sum())
        assert v[:n].all() and not v[n:].any()
        for k in ('boxes', 'scores', 'labels', 'masks'):
            assert (out[k][b][~v] == 0).all(), k


def test_stages_callable_alone(tiny):
    cfg, model, variables, images, info, res = tiny
    feats = res['feats']
    assert [f.shape for f in feats] == [(2, 32, 32, 32), (2, 16, 16, 32), (2, 8, 8, 32), (2, 4, 4, 32),
                                        (2, 2, 2, 32)]
    n = [f.shape[1] * f.shape[2] * 3 for f in feats]
    assert [l.shape for l in res['logits']] == [(2, k) for k in n]
    assert [d.shape for d in res['deltas']] == [(2, k, 4) for k in n]
    assert [a.shape for a in res['anchors']] == [(2, k, 4) for k in n]
    # Image 0 pads to 96 x 96: its valid cells are ceil(96 / 2^l) squared (P6: 2 x 2, all of it).
    expect0 = [24 * 24 * 3, 12 * 12 * 3, 6 * 6 * 3, 3 * 3 * 3, 2 * 2 * 3]
    assert [int(v[0].sum()) for v in res['anchor_valid']] == expect0
    assert [int(v[1].sum()) for v in res['anchor_valid']] == n

    p = cfg.model.rpn.post_nms_topk_test
    boxes, scores, valid = res['proposals'], res['proposal_scores'], res['proposal_valid']
    assert boxes.shape == (2, p, 4) and scores.shape == (2, p) and valid.shape == (2, p)
    for b in range(2):
        assert valid[b].all()   # plenty of anchors for 24 proposals
        vb = boxes[b][valid[b]]
        assert (vb >= 0).all() and (vb[:, 2] <= INFO[b, 3]).all() and (vb[:, 3] <= INFO[b, 2]).all()
        assert (np.diff(scores[b][valid[b]]) <= 0).all()
        assert (boxes[b][~valid[b]] == 0).all()
    assert res['cls_logits'].shape == (2, p, 5) and res['box_deltas'].shape == (2, p, 5, 4)

    # The stages compose to the model: detect(features) and the mask head on its detections.
    assert res['mask_logits'].shape == (2, D, 28, 28)
    v = res['det']['valid']
    np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(res['mask_logits']))[v], res['det']['masks'][v],
                               rtol=1e-6, atol=1e-6)
    # __call__ is features + detect: same outputs (values are checked through the Predictor tests).
    call = jax.eval_shape(model.apply, variables, images, info)
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), call) == jax.tree_util.tree_map(
        lambda x: (x.shape, x.dtype), res['det'])


def test_mask_head_skips_chunks_without_active_rois(tiny):
    """mask_roi_chunk = C: RoIs go through the mask head C at a time; a chunk with no active RoI
    in any image is not computed (a conditional, logits 0), every other chunk equals the mask
    head on all RoIs at once."""
    cfg, model, variables, images, info, res = tiny
    c = cfg.model.roi.mask_roi_chunk
    assert 0 < c < D
    feats = res['feats']
    rois, labels = res['det']['boxes'], res['det']['labels']
    active = np.zeros((2, D), bool)
    active[0, :c + 3] = True           # image 0: the first chunk and three RoIs of the second
    active[1, 2 * c + 1] = True        # image 1: one RoI in the third chunk

    def masks(m, act):
        return m.apply(variables, feats, rois, labels, info, act, method=MaskRCNN.mask_predictions)
    whole = model.clone(roi_heads=model.roi_heads.clone(mask_roi_chunk=0))
    chunked, ref = jax.jit(lambda a: (masks(model, a), masks(whole, None)))(active)
    chunked, ref = np.asarray(chunked), np.asarray(ref)
    ran = np.zeros(D, bool)
    ran[:3 * c] = True                 # chunks 0-2 have an active RoI in some image; later ones not
    np.testing.assert_allclose(chunked[:, ran], ref[:, ran], rtol=1e-6, atol=1e-6)
    assert (chunked[:, ~ran] == 0).all() and np.abs(ref[:, ~ran]).max() > 0
    # One conditional per chunk after the first: skipped work is not computed, not masked out.
    jaxpr = str(jax.make_jaxpr(lambda a: masks(model, a))(active))
    assert jaxpr.count('cond[') == -(-D // c) - 1
    assert 'cond[' not in str(jax.make_jaxpr(lambda a: masks(whole, a))(active))


def test_faster_rcnn_has_no_mask_branch():
    cfg = tiny_config()
    cfg.model.mask_on = False
    model = build_model(cfg.model)
    assert model.mask_head is None
    images = jax.ShapeDtypeStruct((1,) + CANVAS + (3,), jnp.float32)
    info = jax.ShapeDtypeStruct((1, 6), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, info)
    assert set(variables['params']) == {'backbone', 'fpn', 'rpn_head', 'roi_heads'}
    assert set(variables['params']['roi_heads']) == {'box_head', 'box_predictor'}
    out = jax.eval_shape(model.apply, variables, images, info)
    assert set(out) == {'boxes', 'scores', 'labels', 'valid'}


def test_bfloat16_close_to_float32(tiny):
    cfg, model, variables, images, info, res = tiny
    cfg16 = tiny_config()
    cfg16.model.roi.detections_per_img = D
    cfg16.model.rpn.post_nms_topk_test = P
    cfg16.model.dtype = 'bfloat16'
    m16 = build_model(cfg16.model)

    def run16(v, x, i, rois):   # same (float32) variables
        feats = m16.apply(v, x, i, method=MaskRCNN.features)
        logits, _ = m16.apply(v, feats, i, method=MaskRCNN.rpn)
        cls_logits, _ = m16.apply(v, feats, rois, i, method=MaskRCNN.box_predictions)
        return feats, logits, cls_logits, m16.apply(v, feats, i, method=MaskRCNN.detect)
    feats, logits, cls_logits, out = jax.tree_util.tree_map(
        np.asarray, jax.jit(run16)(variables, images, info, jnp.asarray(res['proposals'])))
    for a, b in zip(res['feats'], feats):
        assert b.dtype == jnp.bfloat16
        err = np.abs(a - b.astype(np.float32))
        assert err.max() < 6e-2 * np.abs(a).max() and err.mean() < 4e-2 * np.abs(a).mean()
    for a, b in zip(res['logits'], logits):
        assert b.dtype == np.float32
        assert np.abs(a - b).max() < 3e-2 * np.abs(a).max() + 1e-3
    assert cls_logits.dtype == np.float32
    p32, p16 = jax.nn.softmax(res['cls_logits']), jax.nn.softmax(cls_logits)
    assert float(jnp.abs(p32 - p16).max()) < 1e-2
    # The whole bfloat16 program runs; box maths and outputs stay float32.
    for k in ('boxes', 'scores', 'masks'):
        assert out[k].dtype == np.float32 and np.isfinite(out[k]).all(), k
    assert out['valid'].sum() > 0
    n32 = int(res['det']['valid'].sum())
    assert abs(int(out['valid'].sum()) - n32) <= 0.1 * n32


def test_padding_masks_make_canvas_irrelevant():
    """FrozenBN tiny model: an image on a larger canvas gets the features it gets on a canvas of
    exactly its padded size, inside that region (GroupNorm's statistics would see the canvas)."""
    cfg = tiny_config()
    cfg.model.backbone.norm = 'frozen_bn'
    model = build_model(cfg.model)
    info = jnp.asarray(INFO[:1])                 # resized 96 x 72, padded 96 x 96
    x = _images(seed=3, batch=1)
    variables = random_variables(model, x, info, method=MaskRCNN.features)
    unmasked = model.clone(mask_padding=False)

    def run(v, big, small):
        return (model.apply(v, big, info, method=MaskRCNN.features),
                model.apply(v, small, info, method=MaskRCNN.features),
                unmasked.apply(v, big, info, method=MaskRCNN.features))
    f_big, f_small, f_unmasked = jax.jit(run)(variables, x, x[:, :96, :96])
    for a, b in zip(f_big, f_small):
        h, w = b.shape[1:3]
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.asarray(a[:, :h, :w]), np.asarray(b), rtol=0, atol=1e-5 * scale)
    # Without masking the region's border sees the canvas beyond it.
    scale = float(jnp.abs(f_small[0]).max())
    assert float(jnp.abs(f_unmasked[0][:, :24, :24] - f_small[0]).max()) > 1e-3 * scale




def test_a_new_head_is_a_module_and_a_config_value(monkeypatch):
    """Pluggable heads: a box head registered under a new name is built and run from the config,
    with nothing else changed; an unknown name is an error naming the known ones."""
    import flax.linen as nn

    from mrcnn_jax.models import heads

    class OneFCHead(nn.Module):
        dim: int

        @classmethod
        def from_config(cls, cfg, dtype):
            return cls(dim=cfg.roi.fc_dim // 2)

        @nn.compact
        def __call__(self, pooled):
            b, r = pooled.shape[:2]
            return nn.relu(nn.Dense(self.dim, name='fc')(pooled.reshape(b, r, -1)))

    monkeypatch.setitem(heads.BOX_HEADS, '1fc', OneFCHead)
    cfg = tiny_config()
    cfg.model.roi.box_head = '1fc'
    model = build_model(cfg.model)
    assert isinstance(model.roi_heads.box_head, OneFCHead)
    images = jax.ShapeDtypeStruct((1,) + CANVAS + (3,), jnp.float32)
    info = jax.ShapeDtypeStruct((1, 6), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, info)
    r = variables['params']['roi_heads']
    assert set(r['box_head']) == {'fc'}
    assert r['box_predictor']['cls_score']['kernel'].shape == (cfg.model.roi.fc_dim // 2, 5)
    out = jax.eval_shape(model.apply, variables, images, info)
    assert out['boxes'].shape == (1, cfg.model.roi.detections_per_img, 4)

    cfg.model.roi.box_head = '3fc'
    with pytest.raises(ValueError, match=r"model.roi.box_head '3fc'.*1fc, 2fc"):
        build_model(cfg.model)
