"""mrcnn_jax/training/optimizer.py against torch: LinearLR + MultiStepLR, SGD(momentum, weight
decay), weight-decay exclusion of norm/bias, global-norm clipping, frozen parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mrcnn_jax.config import default_train_config
from mrcnn_jax.training import optimizer

torch = pytest.importorskip('torch')


def _train_cfg(**kw) -> ml_collections.ConfigDict:
    t = default_train_config()
    t.base_lr = 0.02
    t.warmup_steps = 0
    t.warmup_factor = 1e-3
    t.decay_steps = ()
    t.decay_factor = 0.1
    t.weight_decay = 1e-4
    t.momentum = 0.9
    t.clip_norm = 0.0
    t.weight_decay_norm_and_bias = True
    for k, v in kw.items():
        t[k] = v
    return t


def _params(seed: int = 0) -> dict:
    """A small tree with the model's naming: stem, an early and a later stage, a head, a norm."""
    rng = np.random.default_rng(seed)

    def a(*shape):
        return jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32)
    return {
        'backbone': {
            'conv1': {'kernel': a(3, 3, 3, 4)},
            'bn1': {'scale': a(4), 'bias': a(4)},
            'layer1_0': {'conv1': {'kernel': a(3, 3, 4, 4)}, 'bn1': {'scale': a(4), 'bias': a(4)}},
            'layer2_0': {'conv1': {'kernel': a(3, 3, 4, 8)}, 'bn1': {'scale': a(8), 'bias': a(8)}},
        },
        'box_head': {'fc6': {'kernel': a(8, 5), 'bias': a(5)}},
    }


def _loss(p, x):
    """A smooth non-quadratic function of every parameter (gradients depend on the params)."""
    leaves = jax.tree_util.tree_leaves(p)
    return sum(jnp.sum(jnp.sin(leaf * x) * (i + 1)) for i, leaf in enumerate(leaves))


def _torch_loss(ps, x):
    return sum(torch.sum(torch.sin(p * x) * (i + 1)) for i, p in enumerate(ps))


def _run_jax(tcfg, params, steps, frozen_stages=0, xs=None):
    tx = optimizer.build_optimizer(tcfg, params, frozen_stages)
    state = tx.init(params)
    for s in range(steps):
        g = jax.grad(_loss)(params, xs[s])
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _leaves(params):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def _is_kernel(params):
    return [p[-1].key == 'kernel' for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _run_torch(params, steps, *, lr, momentum, weight_decay, xs, clip=0.0, sched=None,
               no_decay_non_kernels=False):
    ps = [torch.tensor(x, requires_grad=True) for x in _leaves(params)]
    if no_decay_non_kernels:
        kern = _is_kernel(params)
        groups = [{'params': [p for p, k in zip(ps, kern) if k], 'weight_decay': weight_decay},
                  {'params': [p for p, k in zip(ps, kern) if not k], 'weight_decay': 0.0}]
    else:
        groups = [{'params': ps, 'weight_decay': weight_decay}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    schedulers = sched(opt) if sched else []
    for s in range(steps):
        opt.zero_grad()
        _torch_loss(ps, float(xs[s])).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
        for sch in schedulers:
            sch.step()
    return [p.detach().numpy() for p in ps]


def _assert_close(jax_params, torch_params, rtol=2e-6, atol=1e-7):
    for i, (a, b) in enumerate(zip(_leaves(jax_params), torch_params)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f'leaf {i}')


XS = [1.0, 1.7, 0.6, 1.3, 0.9, 1.1]


@pytest.mark.parametrize('warmup, milestones', [(10, (15, 25)), (8, (5, 20)), (0, (3,))])
def test_lr_schedule_matches_torch_linear_then_multistep(warmup, milestones):
    t = _train_cfg(base_lr=0.02, warmup_steps=warmup, warmup_factor=1e-3, decay_steps=milestones,
                   decay_factor=0.1)
    schedule = optimizer.learning_rate_schedule(t)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.02, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)]
    if warmup:
        scheds.insert(0, torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=warmup))
    ours, theirs = [], []
    for step in range(32):
        theirs.append(opt.param_groups[0]['lr'])
        ours.append(float(schedule(step)))
        opt.step()
        for s in scheds:
            s.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)
    assert ours[0] == pytest.approx(0.02 * (1e-3 if warmup else 1.0) * (0.1 if milestones[0] == 0 else 1))
    assert ours[-1] == pytest.approx(0.02 * 0.1 ** len(milestones))


@pytest.mark.parametrize('warmup', [0, 3])
def test_sgd_momentum_weight_decay_matches_torch(warmup):
    params = _params()
    t = _train_cfg(base_lr=0.05, warmup_steps=warmup, weight_decay=1e-4)
    ours = _run_jax(t, params, len(XS), xs=XS)

    def sched(opt):
        return [torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=warmup)] if warmup else []
    theirs = _run_torch(params, len(XS), lr=0.05, momentum=0.9, weight_decay=1e-4, xs=XS, sched=sched)
    _assert_close(ours, theirs)
    # The comparison is not vacuous: without momentum the result is measurably different.
    plain = _run_torch(params, len(XS), lr=0.05, momentum=0.0, weight_decay=1e-4, xs=XS, sched=sched)
    assert max(np.abs(a - b).max() for a, b in zip(_leaves(ours), plain)) > 1e-3


def test_weight_decay_excludes_norm_and_bias_when_configured():
    params = _params(1)
    wd = 0.05     # large, so that decay is visible next to the gradient step
    t = _train_cfg(base_lr=0.05, weight_decay=wd, weight_decay_norm_and_bias=False)
    ours = _run_jax(t, params, 4, xs=XS)
    theirs = _run_torch(params, 4, lr=0.05, momentum=0.9, weight_decay=wd, xs=XS,
                        no_decay_non_kernels=True)
    _assert_close(ours, theirs)
    decay_all = _run_jax(_train_cfg(base_lr=0.05, weight_decay=wd, weight_decay_norm_and_bias=True),
                         params, 4, xs=XS)
    for kern, a, b in zip(_is_kernel(params), _leaves(ours), _leaves(decay_all)):
        if kern:
            np.testing.assert_array_equal(a, b)
        else:
            assert np.abs(a - b).max() > 1e-5
    # the mask itself: kernels only
    mask = optimizer.decay_mask(params, decay_norm_and_bias=False)
    assert mask['backbone']['conv1']['kernel'] and mask['box_head']['fc6']['kernel']
    assert not mask['box_head']['fc6']['bias'] and not mask['backbone']['bn1']['scale']
    assert all(jax.tree_util.tree_leaves(optimizer.decay_mask(params, decay_norm_and_bias=True)))


def test_global_norm_clipping_when_configured():
    params = _params(2)
    xs = [x * 3 for x in XS]     # large gradients: norm well above the threshold
    g = jax.grad(_loss)(params, xs[0])
    assert float(optax.tree.norm(g)) > 5.0
    t = _train_cfg(base_lr=0.05, clip_norm=1.0)
    ours = _run_jax(t, params, len(xs), xs=xs)
    theirs = _run_torch(params, len(xs), lr=0.05, momentum=0.9, weight_decay=1e-4, xs=xs, clip=1.0)
    _assert_close(ours, theirs)
    unclipped = _run_jax(_train_cfg(base_lr=0.05, clip_norm=0.0), params, len(xs), xs=xs)
    assert max(np.abs(a - b).max() for a, b in zip(_leaves(ours), _leaves(unclipped))) > 1e-2
    # The first update's global norm is exactly lr * clip (no momentum history yet, no decay).
    tx = optimizer.build_optimizer(_train_cfg(base_lr=0.05, clip_norm=1.0, weight_decay=0.0), params, 0)
    upd, _ = tx.update(g, tx.init(params), params)
    assert float(optax.tree.norm(upd)) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize('frozen_stages, frozen', [
    (0, ()),
    (1, ('backbone/conv1', 'backbone/bn1')),
    (2, ('backbone/conv1', 'backbone/bn1', 'backbone/layer1_0')),
])
def test_frozen_parameters_get_no_update_not_even_weight_decay(frozen_stages, frozen):
    params = _params(3)
    t = _train_cfg(base_lr=0.05, weight_decay=0.1)
    after = _run_jax(t, params, 3, frozen_stages=frozen_stages, xs=XS)
    for path, before in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = '/'.join(k.key for k in path)
        now = after
        for k in path:
            now = now[k.key]
        if name.startswith(frozen):
            np.testing.assert_array_equal(np.asarray(now), np.asarray(before), err_msg=name)
        else:
            assert np.abs(np.asarray(now) - np.asarray(before)).max() > 1e-4, name


def test_train_step_never_reads_frozen_gradients():
    """make_train_step(frozen=mask): frozen gradients are zeros before the finiteness check and
    grad_norm (so XLA drops their computation); a NaN there does not skip the step."""
    from mrcnn_jax.training import train_step as ts
    params = {'backbone': {'conv1': {'kernel': jnp.ones((3,))}, 'layer2_0': {'kernel': jnp.ones((2,))}}}

    def loss_fn(v, batch, key):
        p = v['params']['backbone']
        # finite loss; d/d conv1 is not finite (sqrt at 0); d/d layer2_0 is 2 * kernel
        total = jnp.sum(jnp.sqrt(jnp.abs(p['conv1']['kernel'] - 1.0))) + jnp.sum(p['layer2_0']['kernel'] ** 2)
        return total, {'losses': {'loss_x': total}}

    tx = optimizer.build_optimizer(_train_cfg(weight_decay=0.0), params, frozen_stages=1)
    mask = optimizer.frozen_param_mask(params, 1)
    mesh = ts.make_mesh(jax.devices()[:1])
    batch = {'x': np.zeros((1, 1), np.float32)}
    for frozen, finite in ((None, 0.0), (mask, 1.0)):
        state = ts.place_state(ts.create_state({'params': params}, tx, jax.random.PRNGKey(0)), mesh)
        state, m = ts.make_train_step(loss_fn, tx, mesh, frozen=frozen)(state, ts.shard_batch(batch, mesh))
        assert float(m['finite']) == finite
    np.testing.assert_allclose(float(m['grad_norm']), np.sqrt(8.0), rtol=1e-6)   # |2 * ones(2)|
    np.testing.assert_array_equal(np.asarray(state.params['backbone']['conv1']['kernel']), np.ones(3))
    assert float(state.params['backbone']['layer2_0']['kernel'][0]) < 1.0
