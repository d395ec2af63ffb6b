"""Subprocess worker of the training tests. XLA_FLAGS (the device count, the optimization level)
is read when jax starts, so each configuration runs in its own process.

    python tests/training/train_worker.py reference --synthetic-dir D --out DIR --batch 32
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8)
    python tests/training/train_worker.py train-step --synthetic-dir D --out DIR --batch 2

`reference`: two train steps of the tiny model on the first two global batches of the synthetic
dataset, on a 1-device mesh and on a mesh of all devices, in this one process. Writes
DIR/{initial,one_1,one_2,all_1,all_2}.npz (params after step 1 / 2) and DIR/result.json
(metrics, batch sharding facts). test_multidevice.py compares the meshes, test_multihost.py the
2-process run against the 1-device one.

`train-step`: the scenarios of test_train_step.py (NaN/Inf guard in the step and in the loop,
frozen parameters, loss curve, bf16); writes DIR/result.json for the test to judge.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def _setup(synthetic_dir, batch: int, *extra: str):
    """What TrainLoop.build_state builds, so that programs match `mrcnn-jax train`'s."""
    import jax

    import train_helpers as th
    from mrcnn_jax.models.mask_rcnn import build_model
    from mrcnn_jax.training import losses, optimizer
    from mrcnn_jax.training.loop import init_variables

    cfg = th.config(synthetic_dir, f'train.batch_size={batch}', *extra)
    model = build_model(cfg.model)
    variables = jax.device_get(init_variables(model, cfg, jax.random.PRNGKey(cfg.seed)))
    tx = optimizer.build_optimizer(cfg.train, variables['params'], cfg.model.backbone.frozen_stages)
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    return cfg, model, variables, tx, rng, losses.make_loss_fn(model, losses.LossSettings.from_config(cfg.model))


def _batches(cfg, n: int) -> list[dict]:
    from mrcnn_jax.data import pipeline
    from mrcnn_jax.training.loop import MODEL_KEYS
    ds = pipeline.build_dataset(cfg, 'train', process_index=0, process_count=1)
    out = [{k: v for k, v in next(ds).items() if k in MODEL_KEYS} for _ in range(n)]
    ds.close()
    return out


def reference(args) -> None:
    import jax

    import train_helpers as th
    from mrcnn_jax.training import train_step as ts

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, _, variables, tx, rng, loss_fn = _setup(args.synthetic_dir, args.batch)
    batches = _batches(cfg, 2)
    np.savez(out / 'initial.npz', **th.flat(variables['params']))
    result = {'num_devices': len(jax.devices()), 'batch': args.batch}
    for name, devices in (('one', jax.devices()[:1]), ('all', jax.devices())):
        mesh = ts.make_mesh(devices)
        state = ts.place_state(ts.create_state(variables, tx, rng), mesh)
        step = ts.make_train_step(loss_fn, tx, mesh)
        r = result[name] = {'mesh_devices': int(mesh.devices.size), 'metrics': []}
        for i, batch in enumerate(batches):
            sharded = ts.shard_batch(batch, mesh)
            if i == 0:
                shards = sharded['images'].addressable_shards
                r.update({
                    'num_shards': len(shards),
                    'shard_shapes': sorted({tuple(s.data.shape) for s in shards}),
                    'shard_devices': sorted(int(s.device.id) for s in shards),
                    'shards_are_slices': all(
                        np.array_equal(np.asarray(s.data), batch['images'][s.index]) for s in shards),
                    'state_replicated': all(x.sharding.is_fully_replicated
                                            for x in jax.tree_util.tree_leaves(state)),
                })
            state, metrics = step(state, sharded)
            r['metrics'].append({k: float(v) for k, v in jax.device_get(metrics).items()})
            np.savez(out / f'{name}_{i + 1}.npz', **th.flat(jax.device_get(state.params)))
        r['skipped'] = int(jax.device_get(state.skipped))
        r['params_replicated'] = all(x.sharding.is_fully_replicated
                                     for x in jax.tree_util.tree_leaves(state.params))
        frozen = th.flat(jax.device_get(state.frozen))
        r['frozen_changed'] = [k for k, v in th.flat(variables['frozen']).items()
                               if not np.array_equal(frozen[k], v)]
    result['checkpoint'] = _checkpoint_roundtrip(out / 'checkpoints', state, variables, tx, rng)
    (out / 'result.json').write_text(json.dumps(result, indent=1))
    print('worker done', flush=True)


def _checkpoint_roundtrip(directory, state, variables, tx, rng) -> dict:
    """Save the 8-device state (async), restore it into an 8-device and into a 1-device target:
    arrays must land in the target's shardings with the same values."""
    import jax

    import train_helpers as th
    from mrcnn_jax.training import train_step as ts
    from mrcnn_jax.training.checkpoint import Checkpointer

    saved = th.flat(jax.device_get(state))
    ck = Checkpointer(directory, save_every=2)
    started = ck.save(2, state, {'step': 2})
    ck.wait()
    out = {'save_started': bool(started), 'steps': sorted(ck.manager.all_steps())}
    for name, devices in (('all', jax.devices()), ('one', jax.devices()[:1])):
        mesh = ts.make_mesh(devices)
        target = ts.place_state(ts.create_state(variables, tx, rng), mesh)
        restored, data_state, step = ck.restore(target)
        want = ts.replicated(mesh)
        out[name] = {
            'step': step, 'data_state': data_state,
            'shardings_ok': all(x.sharding.is_equivalent_to(want, x.ndim)
                                for x in jax.tree_util.tree_leaves(restored)),
            'differ': [k for k, v in th.flat(jax.device_get(restored)).items()
                       if not np.array_equal(v, saved[k])],
        }
    ck.close()
    return out


def _poison(batch: dict, what: str) -> dict:
    b = {k: v.copy() for k, v in batch.items()}
    if what == 'nan_pixel':
        b['images'][0, 40, 50, 1] = np.nan
    elif what == 'inf_pixel':
        b['images'][1, 3, 7, 0] = np.inf
    elif what == 'nan_box':
        b['gt_boxes'][0, 0, 2] = np.nan
    else:
        raise ValueError(what)
    return b


class ListDataset:
    """A dataset for train(): fixed batches in order, with the pipeline's get_state/set_state."""

    def __init__(self, batches):
        self.batches, self.step, self.metadata = list(batches), 0, {}

    def __next__(self):
        b = self.batches[self.step % len(self.batches)]
        self.step += 1
        return b

    def get_state(self):
        return {'step': self.step}

    def set_state(self, s):
        self.step = int(s['step'])


def train_step(args) -> None:
    import jax
    import jax.numpy as jnp

    import train_helpers as th
    from mrcnn_jax.models.mask_rcnn import build_model
    from mrcnn_jax.training import losses, optimizer
    from mrcnn_jax.training import train_step as ts
    from mrcnn_jax.training.loop import train

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, _, variables, tx, rng, loss_fn = _setup(args.synthetic_dir, args.batch)
    mesh = ts.make_mesh()
    frozen = optimizer.frozen_param_mask(variables['params'], cfg.model.backbone.frozen_stages)
    step = ts.make_train_step(loss_fn, tx, mesh, frozen=frozen)   # as loop.py builds it
    batches = _batches(cfg, 4)
    p0 = th.flat(variables['params'])
    res = {'config': {'norm': cfg.model.backbone.norm, 'frozen_stages': cfg.model.backbone.frozen_stages,
                      'base_lr': cfg.train.base_lr, 'weight_decay': cfg.train.weight_decay},
           'param_keys': sorted(p0), 'frozen_keys': sorted(th.flat(variables['frozen']))}

    def fresh():
        return ts.place_state(ts.create_state(variables, tx, rng), mesh)

    def host(state):
        return th.flat(jax.device_get(state))

    def changed(a, b, prefixes=('params/', 'opt_state/', 'frozen/')):
        return sorted(k for k in a if k.startswith(prefixes) and not np.array_equal(a[k], b[k]))

    def run(state, batch):
        state, m = step(state, ts.shard_batch(batch, mesh))
        return state, {k: float(v) for k, v in jax.device_get(m).items()}

    # NaN / Inf guard in the step
    for what in ('nan_pixel', 'inf_pixel'):
        s = fresh()
        before = host(s)
        s, m1 = run(s, _poison(batches[0], what))
        after = host(s)
        s, m2 = run(s, batches[1])
        again = host(s)
        res[what] = {
            'poisoned_metrics': m1, 'next_metrics': m2,
            'skipped_after_poison': int(after['skipped']), 'step_after_poison': int(after['step']),
            'changed_by_poisoned_step': changed(before, after),
            'skipped_after_next': int(again['skipped']), 'step_after_next': int(again['step']),
            'params_moved_by_next_step': changed(after, again, ('params/',)),
            'params_finite': bool(all(np.isfinite(v).all() for k, v in again.items() if k.startswith('params/'))),
        }
    s, m = run(fresh(), _poison(batches[0], 'nan_box'))
    res['nan_box'] = {'metrics': m, 'skipped': int(host(s)['skipped']),
                      'params_finite': bool(all(np.isfinite(v).all() for k, v in host(s).items()
                                                if k.startswith('params/')))}

    # frozen parameters and FrozenBN statistics over 3 steps
    s = fresh()
    before = host(s)
    finite = []
    for b in batches[:3]:
        s, m = run(s, b)
        finite.append(m['finite'])
    res['frozen'] = {'finite': finite, 'changed': changed(before, host(s), ('params/', 'frozen/'))}

    # the loss curve: overfit one batch of the synthetic dataset
    s = fresh()
    curve = []
    for _ in range(args.loss_steps):
        s, m = run(s, batches[0])
        curve.append(m['loss'])
    res['loss_curve'] = curve

    # bf16 compute: one step from the same state and batch as float32
    s32, m32 = run(fresh(), batches[0])
    cfg16 = th.config(args.synthetic_dir, f'train.batch_size={args.batch}', 'model.dtype=bfloat16')
    model16 = build_model(cfg16.model)
    step16 = ts.make_train_step(losses.make_loss_fn(model16, losses.LossSettings.from_config(cfg16.model)), tx, mesh, frozen=frozen)
    s16, m16 = step16(fresh(), ts.shard_batch(batches[0], mesh))
    p16, p32 = th.flat(jax.device_get(s16.params)), th.flat(jax.device_get(s32.params))
    d16 = np.concatenate([(p16[k] - p0[k]).ravel() for k in p0])
    d32 = np.concatenate([(p32[k] - p0[k]).ravel() for k in p0])
    res['bf16'] = {
        'model_dtype': cfg16.model.dtype,
        'metrics32': m32,
        'metrics16': {k: float(v) for k, v in jax.device_get(m16).items()},
        'metric_dtypes16': sorted({str(v.dtype) for v in m16.values()}),
        'param_dtypes16': sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(s16.params)}),
        'opt_state_float_dtypes16': sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(s16.opt_state)
                                            if jnp.issubdtype(x.dtype, jnp.floating)}),
        'params_moved': sum(not np.array_equal(p16[k], p0[k]) for k in p0),
        'update_cosine': float(d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32))),
        'update_norm_ratio': float(np.linalg.norm(d16) / np.linalg.norm(d32)),
    }

    # the loop: a NaN batch at step 2 of 4 is reported and training continues
    cfg_loop = th.config(args.synthetic_dir, f'train.batch_size={args.batch}', 'train.steps=4',
                         'train.log_every=1', 'train.checkpoint_every=100')
    seen = {}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        state = train(cfg_loop, out / 'loop_workdir',
                      dataset=ListDataset([batches[0], _poison(batches[1], 'nan_pixel'), batches[2], batches[3]]),
                      on_metrics=lambda i, m: seen.__setitem__(i, {k: float(v) for k, v in m.items()}))
    final = host(state)
    res['loop'] = {'stdout': buf.getvalue(), 'metrics': seen, 'step': int(final['step']),
                   'skipped': int(final['skipped']),
                   'params_finite': bool(all(np.isfinite(v).all() for k, v in final.items()
                                             if k.startswith('params/'))),
                   'model_dir': (out / 'loop_workdir' / 'model' / 'config.json').exists()}
    (out / 'result.json').write_text(json.dumps(res, indent=1))
    print('worker done', flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('mode', choices=['reference', 'train-step'])
    ap.add_argument('--synthetic-dir', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--batch', type=int, required=True)
    ap.add_argument('--loss-steps', type=int, default=60)
    args = ap.parse_args()
    {'reference': reference, 'train-step': train_step}[args.mode](args)


if __name__ == '__main__':
    main()
