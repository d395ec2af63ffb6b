"""The jitted train step (train_step.py) and the loop around it (loop.py): NaN/Inf guard in the step
and in the loop, frozen parameters and FrozenBN statistics, the loss falls on the synthetic shapes
dataset, bf16 compute with float32 parameters.

The scenarios run in one subprocess (train_worker.py `train-step`, 1 CPU device, batch 2, the
tiny config with FrozenBN and frozen_stages=2): its float32 programs are the ones `mrcnn-jax
train` compiles for the same config (test_resume.py), so they come from the shared compilation
cache; bf16 compiles one more. The tests judge what it reports.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import train_helpers as th

BATCH, LOSS_STEPS = 2, 50       # measured: the last 5 of 50 steps average 0.42 x the first loss
FROZEN_PREFIXES = ('params/backbone/conv1/', 'params/backbone/layer1_')


@pytest.fixture(scope='module')
def res(tmp_path_factory):
    cache, data = th.shared_dirs(tmp_path_factory)
    out = tmp_path_factory.mktemp('train_step')
    p = th.run([str(th.WORKER), 'train-step', '--synthetic-dir', str(data), '--out', str(out),
                '--batch', str(BATCH), '--loss-steps', str(LOSS_STEPS)], th.subprocess_env(cache, fast_compile=False),
               timeout=1200)
    assert p.returncode == 0, th.tail(p)
    return json.loads((out / 'result.json').read_text())


@pytest.mark.parametrize('what', ['nan_pixel', 'inf_pixel'])
def test_non_finite_step_is_skipped_and_counted_then_training_goes_on(res, what):
    r = res[what]
    m = r['poisoned_metrics']
    assert m['finite'] == 0.0 and not np.isfinite(m['loss'])
    assert r['skipped_after_poison'] == 1 and r['step_after_poison'] == 1
    assert r['changed_by_poisoned_step'] == []      # params, optimizer state, FrozenBN: untouched
    # the next normal batch updates; the count stays
    assert r['next_metrics']['finite'] == 1.0 and np.isfinite(r['next_metrics']['loss'])
    assert r['skipped_after_next'] == 1 and r['step_after_next'] == 2
    params = [k for k in res['param_keys']]
    assert len(r['params_moved_by_next_step']) > len(params) // 2
    assert r['params_finite']


def test_degenerate_gt_box_is_filtered_not_fatal(res):
    """A NaN GT coordinate makes the box degenerate: it is left out of matching, the step is finite."""
    r = res['nan_box']
    assert r['metrics']['finite'] == 1.0 and np.isfinite(r['metrics']['loss'])
    assert r['skipped'] == 0 and r['params_finite']


def test_frozen_parameters_and_frozen_bn_statistics_never_change(res):
    c = res['config']
    assert c['norm'] == 'frozen_bn' and c['frozen_stages'] == 2
    assert c['base_lr'] > 0 and c['weight_decay'] > 0
    r = res['frozen']
    assert r['finite'] == [1.0, 1.0, 1.0]
    params = ['params/' + k for k in res['param_keys']]
    frozen_params = [k for k in params if k.startswith(FROZEN_PREFIXES)]
    stats = ['frozen/' + k for k in res['frozen_keys']]
    assert frozen_params and stats
    assert {k.rsplit('/', 1)[1] for k in stats} == {'weight', 'bias', 'running_mean', 'running_var'}
    changed = set(r['changed'])
    assert changed.isdisjoint(frozen_params), sorted(changed & set(frozen_params))
    assert changed.isdisjoint(stats), sorted(changed & set(stats))
    # every other kernel moves (gradient and/or weight decay), layer2 on included
    kernels = [k for k in params if k.endswith('kernel') and k not in frozen_params]
    assert [k for k in kernels if k not in changed] == []
    assert any(k.startswith('params/backbone/layer2_') for k in kernels)


def test_loss_falls_by_half_on_synthetic_shapes(res):
    """Overfit one batch (2 images) of the synthetic shapes dataset: total loss >= 50% lower."""
    curve = res['loss_curve']
    assert len(curve) == LOSS_STEPS and np.isfinite(curve).all()
    first, last = curve[0], float(np.mean(curve[-5:]))
    print(f'loss: first {first:.3f}, mean of the last 5 of {LOSS_STEPS} steps {last:.3f} '
          f'({100 * (1 - last / first):.0f}% lower); every 6th: {[round(x, 2) for x in curve[::6]]}')
    assert last <= 0.5 * first


def test_bfloat16_compute_keeps_float32_params_and_close_loss(res):
    r = res['bf16']
    assert r['model_dtype'] == 'bfloat16'
    m16, m32 = r['metrics16'], r['metrics32']
    print(f"loss float32 {m32['loss']:.4f}, bfloat16 {m16['loss']:.4f}; update cosine "
          f"{r['update_cosine']:.4f}, norm ratio {r['update_norm_ratio']:.3f}")
    assert m16['finite'] == 1.0 and np.isfinite(m16['loss'])
    assert m16['loss'] == pytest.approx(m32['loss'], rel=0.05)
    for k in ('loss_objectness', 'loss_classifier', 'loss_mask'):
        assert m16[k] == pytest.approx(m32[k], rel=0.1), k
    assert r['metric_dtypes16'] == ['float32']
    assert r['param_dtypes16'] == ['float32'] and r['opt_state_float_dtypes16'] == ['float32']
    assert r['params_moved'] > len(res['param_keys']) // 2
    assert r['update_cosine'] > 0.9 and 0.8 < r['update_norm_ratio'] < 1.25


def test_loop_reports_skipped_step_and_continues(res):
    r = res['loop']
    out = r['stdout']
    assert ('WARNING: non-finite loss or gradients: 1 update(s) skipped up to step 2 (1 in total); '
            'training continues') in out, out
    assert out.count('WARNING: non-finite') == 1
    assert sorted(r['metrics'], key=int) == ['1', '2', '3', '4']
    assert [r['metrics'][s]['finite'] for s in '1234'] == [1.0, 0.0, 1.0, 1.0]
    assert r['step'] == 4 and r['skipped'] == 1 and r['params_finite']
    assert 'step 4/4' in out and r['model_dir']


def test_cpu_step_uses_the_memory_optimized_schedule():
    """On XLA:CPU the step is compiled with the memory-optimized scheduler (train_step.
    compiler_options): the tiny step's temporary buffers are smaller than under XLA's default,
    concurrency-oriented order. Box-only (the scheduler is not about masks; half the compile
    time): 11.7 MB against 31.4 MB, measured (22 MB against 54 MB with the mask head)."""
    import jax
    import jax.numpy as jnp
    from mrcnn_jax.config import load_config
    from mrcnn_jax.models.mask_rcnn import build_model
    from mrcnn_jax.training import optimizer, train_step as ts
    from mrcnn_jax.training.losses import LossSettings, make_loss_fn
    cfg = load_config(th.REPO / 'configs' / 'tiny_test.py', ['--config.model.mask_on=False'])
    model = build_model(cfg.model)
    rng = np.random.default_rng(0)
    b, g, n = 2, cfg.data.max_instances, 128
    batch = {'images': rng.normal(0, 1, (b, n, n, 3)).astype(np.float32),
             'image_info': np.tile(np.asarray([[n, n, n, n, 1, 1]], np.float32), (b, 1)),
             'gt_boxes': np.tile(np.asarray([10, 12, 60, 70], np.float32), (b, g, 1)),
             'gt_classes': np.ones((b, g), np.int32), 'gt_is_crowd': np.zeros((b, g), bool),
             'gt_valid': np.ones((b, g), bool), 'gt_masks': np.ones((b, g, 28, 28), np.uint8)}
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(batch['images'][:1]),
                                           jnp.asarray(batch['image_info'][:1])))()
    tx = optimizer.build_optimizer(cfg.train, variables['params'], 0)
    mesh = ts.make_mesh(jax.devices()[:1])
    assert ts.compiler_options(mesh) == {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
    state = ts.place_state(ts.create_state(variables, tx, jax.random.PRNGKey(0)), mesh)
    temp = {}
    # Both compiled at LLVM -O0: buffer assignment (what memory_analysis reports) is decided
    # before code generation, so the sizes are -O2's, at half the compile time.
    o0 = {'xla_backend_optimization_level': 0}
    for name, options in (('ours', {**ts.compiler_options(mesh), **o0}), ('xla_default', o0)):
        step = ts.make_train_step(make_loss_fn(model, LossSettings.from_config(cfg.model)), tx, mesh, xla_options=options)
        compiled = step.lower(state, ts.shard_batch(batch, mesh)).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temp['ours'] < 0.7 * temp['xla_default'], temp
