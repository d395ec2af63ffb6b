"""Loss terms (mrcnn_jax/training/losses.py) against direct torch computations, and the loss
function on bad input (images without GT, all-crowd images) with the tiny model.

  * `smooth_l1` vs `torch.nn.functional.smooth_l1_loss` (beta 1/9, 0.5, 1, and 0 = L1);
  * `rpn_losses`, `box_head_losses` (vs torchvision's own `fastrcnn_loss`), `mask_head_loss` on
    random batched inputs whose padding rows (weight 0) hold garbage: they must not count; both
    regression types ('smooth_l1' and Detectron2's 'l1'); normalized over the whole batch;
  * no positive RoIs: mask loss 0 with zero (finite) gradients;
  * `make_loss_fn` on the tiny config: an image without GT and an all-crowd image train as
    all-background (finite losses and gradients, no positive anchors or RoIs, no GT candidate),
    and two identical images get different samples (one PRNG key per image);
  * the mask head in chunks (`mask_roi_chunk`), skipping those without a positive, gives the
    loss and gradients of the mask head on all `max_mask_rois` RoIs.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from mrcnn_jax.training import losses
from mrcnn_jax.training import targets as tgt

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')
import torch.nn.functional as F  # noqa: E402
from torchvision.models.detection.roi_heads import fastrcnn_loss  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
BETAS = [1 / 9, 0.5, 1.0, 0.0]


def _t(x):
    return torch.from_numpy(np.asarray(x))


@pytest.mark.parametrize('beta', BETAS)
def test_smooth_l1_equals_torch(beta):
    rng = np.random.default_rng(0)
    edges = [0.0, beta, -beta, beta * 0.999, -beta * 1.001]
    x = np.concatenate([rng.normal(0, 1, 1000), edges]).astype(np.float32)
    ours = np.asarray(losses.smooth_l1(jnp.asarray(x), beta))
    ref = F.smooth_l1_loss(_t(x), torch.zeros(len(x)), beta=beta, reduction='none').numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_smooth_l1_gradient_is_finite_at_zero():
    for beta in BETAS:
        g = jax.grad(lambda x, beta=beta: losses.smooth_l1(x, beta).sum())(jnp.zeros(3))
        assert np.isfinite(np.asarray(g)).all()


def _garbage_padding(rng, weights, *arrays):
    """Copies of arrays whose rows with weight 0 are overwritten with random (finite) values."""
    pad = np.asarray(weights) == 0
    out = []
    for a in arrays:
        a = np.array(a)
        if a.dtype.kind in 'iu':
            a[pad] = rng.integers(0, max(int(a.max()), 1) + 1, a[pad].shape)
        else:
            a[pad] = rng.normal(0, 100, a[pad].shape)
        out.append(a)
    return out


def _anchor_batch(rng, b=2, a=500, s=64, n_valid=(64, 40), n_pos=(20, 3)):
    obj = rng.normal(0, 2, (b, a)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (b, a, 4)).astype(np.float32)
    idx = np.stack([rng.permutation(a)[:s] for _ in range(b)]).astype(np.int32)
    weights = np.zeros((b, s), np.float32)
    labels = np.zeros((b, s), np.float32)
    for i in range(b):
        weights[i, :n_valid[i]] = 1
        labels[i, :n_pos[i]] = 1
    box_t = rng.normal(0, 0.5, (b, s, 4)).astype(np.float32) * labels[..., None]
    return obj, deltas, idx, labels, weights, box_t


def _rpn_reference(obj, deltas, idx, labels, weights, box_t, beta):
    valid = weights > 0
    logit = np.concatenate([obj[i, idx[i][valid[i]]] for i in range(len(obj))])
    pred = np.concatenate([deltas[i, idx[i][valid[i]]] for i in range(len(obj))])
    lab, tt = labels[valid], box_t[valid]
    loss_obj = F.binary_cross_entropy_with_logits(_t(logit), _t(lab))
    pos = lab == 1
    if beta == 0:
        loss_box = F.l1_loss(_t(pred[pos]), _t(tt[pos]), reduction='sum')
    else:
        loss_box = F.smooth_l1_loss(_t(pred[pos]), _t(tt[pos]), beta=beta, reduction='sum')
    return float(loss_obj), float(loss_box) / valid.sum()


@pytest.mark.parametrize('loss_type', ['smooth_l1', 'l1'])
def test_rpn_losses_equal_reference(loss_type):
    rng = np.random.default_rng(1)
    obj, deltas, idx, labels, weights, box_t = _anchor_batch(rng)
    ref = _rpn_reference(obj, deltas, idx, labels, weights, box_t, 1 / 9 if loss_type == 'smooth_l1' else 0.0)
    fn = jax.jit(lambda *a: losses.rpn_losses(a[0], a[1], tgt.AnchorTargets(*a[2:]), loss_type=loss_type))
    ours = fn(obj, deltas, idx, labels, weights, box_t)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5)
    # Padding rows (weight 0) with garbage indices, labels and targets change nothing.
    idx2, labels2, box_t2 = _garbage_padding(rng, weights, idx, labels, box_t)
    labels2[weights == 0] = 1.0
    ours2 = fn(obj, deltas, idx2, labels2, weights, box_t2)
    np.testing.assert_allclose(np.asarray(ours2), np.asarray(ours), rtol=1e-6)


def test_rpn_losses_nominal_normalizer_is_detectron2s():
    """Detectron2's RPN.losses: BCE and L1 (smooth_l1_beta 0) *summed* over the sampled anchors,
    both divided by batch_size_per_image x images, not by the anchors actually sampled (here 104
    of 128: image 1 had only 40 anchors to sample)."""
    rng = np.random.default_rng(3)
    obj, deltas, idx, labels, weights, box_t = _anchor_batch(rng)
    valid = weights > 0
    logit = np.concatenate([obj[i, idx[i][valid[i]]] for i in range(len(obj))])
    pred = np.concatenate([deltas[i, idx[i][valid[i]]] for i in range(len(obj))])
    lab, tt = labels[valid], box_t[valid]
    normalizer = weights.size                           # batch_size_per_image (64) x 2 images
    assert valid.sum() < normalizer
    ref_obj = F.binary_cross_entropy_with_logits(_t(logit), _t(lab), reduction='sum') / normalizer
    ref_box = F.l1_loss(_t(pred[lab == 1]), _t(tt[lab == 1]), reduction='sum') / normalizer
    ours = jax.jit(lambda *a: losses.rpn_losses(a[0], a[1], tgt.AnchorTargets(*a[2:]), loss_type='smooth_l1',
                                                beta=0.0, normalizer='nominal'))(obj, deltas, idx, labels, weights, box_t)
    np.testing.assert_allclose(np.asarray(ours), [float(ref_obj), float(ref_box)], rtol=1e-5)
    with pytest.raises(ValueError, match='normalizer'):
        losses.rpn_losses(obj, deltas, tgt.AnchorTargets(idx, labels, weights, box_t), normalizer='batch')


def _roi_batch(rng, b=2, s=48, k=6, n_valid=(48, 30), n_pos=(12, 0)):
    logits = rng.normal(0, 2, (b, s, k)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (b, s, k, 4)).astype(np.float32)
    weights = np.zeros((b, s), np.float32)
    labels = np.zeros((b, s), np.int32)
    for i in range(b):
        weights[i, :n_valid[i]] = 1
        labels[i, :n_pos[i]] = rng.integers(1, k, n_pos[i])
    box_t = rng.normal(0, 1, (b, s, 4)).astype(np.float32) * (labels > 0)[..., None]
    rois = np.zeros((b, s, 4), np.float32)
    return logits, deltas, labels, weights, box_t, rois


def _roi_targets(labels, weights, box_t, rois):
    zeros = np.zeros(labels.shape, np.int32)
    return tgt.RoiTargets(rois, labels, weights, box_t, zeros, zeros)


@pytest.mark.parametrize('loss_type', ['smooth_l1', 'l1'])
def test_box_head_losses_equal_torchvision(loss_type):
    rng = np.random.default_rng(2)
    logits, deltas, labels, weights, box_t, rois = _roi_batch(rng)
    fn = jax.jit(lambda lg, d, *t: losses.box_head_losses(lg, d, _roi_targets(*t), loss_type=loss_type))
    ours = np.asarray(fn(logits, deltas, labels, weights, box_t, rois))
    valid = weights > 0
    k = logits.shape[-1]
    if loss_type == 'smooth_l1':     # torchvision's own function (beta 1/9, / sampled RoIs)
        ref = [float(x) for x in fastrcnn_loss(_t(logits[valid]), _t(deltas[valid].reshape(-1, k * 4)),
                                                [_t(labels[valid]).long()], [_t(box_t[valid])])]
    else:
        pos = labels[valid] > 0
        pred = deltas[valid][pos, labels[valid][pos]]
        ref = [float(F.cross_entropy(_t(logits[valid]), _t(labels[valid]).long())),
               float(F.l1_loss(_t(pred), _t(box_t[valid][pos]), reduction='sum')) / valid.sum()]
    assert ref[1] > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    labels2, box_t2, logits2 = _garbage_padding(rng, weights, labels, box_t, logits)
    ours2 = np.asarray(fn(logits2, deltas, labels2, weights, box_t2, rois))
    np.testing.assert_allclose(ours2, ours, rtol=1e-6)


def test_mask_head_loss_equals_reference():
    rng = np.random.default_rng(3)
    b, r, m = 2, 10, 28
    logits = rng.normal(0, 2, (b, r, m, m)).astype(np.float32)
    targets = rng.uniform(0, 1, (b, r, m, m)).astype(np.float32)      # soft targets
    weights = np.zeros((b, r), np.float32)
    weights[0, :7] = 1
    weights[1, :2] = 1
    ours = float(losses.mask_head_loss(logits, targets, weights))
    pos = weights > 0
    ref = float(F.binary_cross_entropy_with_logits(_t(logits[pos]), _t(targets[pos])))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    logits2, targets2 = _garbage_padding(rng, weights, logits, targets)
    np.testing.assert_allclose(float(losses.mask_head_loss(logits2, np.clip(targets2, 0, 1), weights)), ours,
                               rtol=1e-6)


def test_mask_head_loss_without_positives_is_zero():
    logits = jnp.asarray(np.random.default_rng(4).normal(0, 3, (2, 4, 28, 28)), jnp.float32)
    value, grad = jax.value_and_grad(losses.mask_head_loss)(logits, jnp.zeros_like(logits), jnp.zeros((2, 4)))
    assert float(value) == 0.0
    assert (np.asarray(grad) == 0).all()


def test_unknown_regression_loss_type_is_an_error():
    obj, deltas, idx, labels, weights, box_t = _anchor_batch(np.random.default_rng(5))
    with pytest.raises(ValueError, match='loss_type'):
        losses.rpn_losses(obj, deltas, tgt.AnchorTargets(idx, labels, weights, box_t), loss_type='smoothl1')


# ---------------------------------------------------------------------------------------------
# The loss function on bad input (tiny model, one compiled program for every batch below).

@pytest.fixture(scope='module')
def tiny():
    from mrcnn_jax.config import load_config
    from mrcnn_jax.models.mask_rcnn import build_model
    cfg = load_config(REPO / 'configs' / 'tiny_test.py').model
    model = build_model(cfg)
    canvas = (128, 128)
    images = jnp.zeros((1,) + canvas + (3,), jnp.float32)
    info = jnp.asarray([[128, 128, 128, 128, 1, 1]], jnp.float32)
    variables = jax.jit(lambda k: model.init(k, images, info))(jax.random.key(0, impl='unsafe_rbg'))
    loss_fn = losses.make_loss_fn(model, losses.LossSettings.from_config(cfg), with_targets=True)

    @jax.jit
    def run(variables, batch, key):
        (total, aux), grads = jax.value_and_grad(
            lambda p: loss_fn({**variables, 'params': p}, batch, key), has_aux=True)(variables['params'])
        return total, aux, grads

    return cfg, variables, run


def _batch(rng, kinds, g=8, canvas=128, mask=28):
    """kinds: per image 'gt' (3 instances + padding), 'none' (no GT rows), 'crowd' (only crowd)."""
    b = len(kinds)
    batch = {
        'images': rng.normal(0, 1, (b, canvas, canvas, 3)).astype(np.float32),
        'image_info': np.tile(np.asarray([[canvas, canvas, canvas, canvas, 1, 1]], np.float32), (b, 1)),
        'gt_boxes': np.zeros((b, g, 4), np.float32),
        'gt_classes': np.zeros((b, g), np.int32),
        'gt_is_crowd': np.zeros((b, g), bool),
        'gt_valid': np.zeros((b, g), bool),
        'gt_masks': np.zeros((b, g, mask, mask), np.uint8),
    }
    boxes = np.asarray([[10, 12, 60, 70], [64, 20, 120, 60], [30, 80, 90, 120]], np.float32)
    for i, kind in enumerate(kinds):
        if kind == 'none':
            continue
        batch['gt_boxes'][i, :3] = boxes
        batch['gt_classes'][i, :3] = [1, 2, 4]
        batch['gt_valid'][i, :3] = True
        batch['gt_is_crowd'][i, :3] = kind == 'crowd'
        batch['gt_masks'][i, :3, 4:24, 6:20] = 1
    return batch


def _finite(tree):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


def _positives(aux):
    t = aux['targets']
    at, rt = t['anchors'], t['rois']
    return (np.asarray(at.labels * at.weights).sum(1), np.asarray((rt.labels > 0) * rt.weights).sum(1))


def test_images_without_usable_gt_train_as_background(tiny):
    cfg, variables, run = tiny
    rng = np.random.default_rng(0)
    total, aux, grads = run(variables, _batch(rng, ['none', 'crowd']), jax.random.PRNGKey(0))
    l = {k: float(v) for k, v in aux['losses'].items()}
    assert np.isfinite(float(total)) and _finite(grads)
    pos_anchors, pos_rois = _positives(aux)
    assert (pos_anchors == 0).all() and (pos_rois == 0).all()
    at, rt = aux['targets']['anchors'], aux['targets']['rois']
    # Every sample is a background anchor / RoI (never ignored for lack of GT).
    assert (np.asarray(at.weights).sum(1) == cfg.rpn.batch_size_per_image).all()
    assert (np.asarray(rt.weights).sum(1) == cfg.roi.batch_size_per_image).all()
    # Crowd boxes are no RoI candidates (indices >= P are GT slots).
    p = aux['targets']['proposals'].shape[1]
    assert (np.asarray(rt.indices)[np.asarray(rt.weights) > 0] < p).all()
    assert l['loss_objectness'] > 0 and l['loss_classifier'] > 0
    assert l['loss_rpn_box_reg'] == 0 and l['loss_box_reg'] == 0 and l['loss_mask'] == 0
    assert float(np.abs(np.asarray(grads['rpn_head']['cls_logits']['kernel'])).max()) > 0
    assert float(np.abs(np.asarray(grads['roi_heads']['mask_head']['mask_fcn1']['kernel'])).max()) == 0


def test_mixed_batch_and_per_image_keys(tiny):
    _, variables, run = tiny
    rng = np.random.default_rng(1)
    # An image with GT beside one without: positives only in the first; all finite.
    total, aux, grads = run(variables, _batch(rng, ['gt', 'none']), jax.random.PRNGKey(1))
    assert np.isfinite(float(total)) and _finite(grads)
    pos_anchors, pos_rois = _positives(aux)
    assert pos_anchors[0] > 0 and pos_rois[0] >= 3 and pos_anchors[1] == 0 and pos_rois[1] == 0
    assert all(float(v) > 0 for v in aux['losses'].values())
    # Two identical images: each gets its own PRNG key, hence its own sample.
    batch = _batch(rng, ['gt', 'gt'])
    batch['images'][1] = batch['images'][0]
    _, aux, _ = run(variables, batch, jax.random.PRNGKey(2))
    at, rt = aux['targets']['anchors'], aux['targets']['rois']
    assert not np.array_equal(np.asarray(at.indices[0]), np.asarray(at.indices[1]))
    assert not np.array_equal(np.asarray(rt.indices[0]), np.asarray(rt.indices[1]))


def _cond_eqns(jaxpr) -> list:
    """Every `cond` equation in a jaxpr, nested jaxprs (pjit, custom_vjp, ...) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'cond':
            found.append(eqn)
        for sub in jaxprs_in_params(eqn.params):
            found.extend(_cond_eqns(sub))
    return found


def test_mask_head_chunks_give_the_same_loss_and_gradients(tiny):
    """Chunks of 2 RoIs: the 3+ positives of image 0 span two chunks (both run), the other six
    chunks have none (skipped). Loss and every gradient equal the unchunked mask head's."""
    from mrcnn_jax.models.mask_rcnn import build_model
    cfg, variables, _ = tiny
    batch = _batch(np.random.default_rng(0), ['gt', 'none'])
    key = jax.random.PRNGKey(3)
    out = {}
    for chunk in (0, 2):
        c = cfg.copy_and_resolve_references()
        c.roi.mask_roi_chunk = chunk
        loss_fn = losses.make_loss_fn(build_model(c), losses.LossSettings.from_config(c), with_targets=True)
        f = jax.jit(jax.value_and_grad(lambda p: loss_fn({**variables, 'params': p}, batch, key), has_aux=True))
        out[chunk] = f(variables['params'])
        if chunk:
            conds = _cond_eqns(jax.make_jaxpr(f)(variables['params']).jaxpr)
            assert len(conds) == 2 * (cfg.roi.max_mask_rois // chunk - 1)   # forward + backward
            # RoIAlign runs outside the conditionals: none returns a gradient of a whole feature
            # map (which a skipped chunk would fill with zeros, one per chunk)
            p2 = (2, 128 // 4, 128 // 4, cfg.fpn.channels)
            assert all(tuple(v.aval.shape) != p2 for e in conds for v in e.outvars)
    (total0, aux0), g0 = out[0]
    (total2, aux2), g2 = out[2]
    w = np.asarray(aux2['targets']['mask_weights'])
    assert 2 < w[0].sum() <= cfg.roi.max_mask_rois - 2 and w[1].sum() == 0
    assert float(aux0['losses']['loss_mask']) > 0
    np.testing.assert_allclose(float(total2), float(total0), rtol=1e-6)
    for k in aux0['losses']:
        np.testing.assert_allclose(float(aux2['losses'][k]), float(aux0['losses'][k]), rtol=1e-6, err_msg=k)
    flat0 = jax.tree_util.tree_leaves_with_path(g0)
    for (path, a), b in zip(flat0, jax.tree_util.tree_leaves(g2)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(a).max()),
                                   err_msg=jax.tree_util.keystr(path))
    assert np.abs(np.asarray(g2['roi_heads']['mask_head']['mask_fcn1']['kernel'])).max() > 0
