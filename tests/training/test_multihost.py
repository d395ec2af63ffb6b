"""Multi-host data parallelism, proven on one machine: two `mrcnn-jax train` processes on localhost
(jax.distributed with a loopback coordinator, gloo CPU collectives, 4 CPU devices each) train
jointly and end where a single process on one device ends with the same global batches (the
1-device run of train_worker.py `reference`, shared with test_multidevice.py).

Each process reads its own half of every global batch (the input pipeline's per-host slice,
`build_dataset` with jax.process_index / process_count), passes it through
`jax.make_array_from_process_local_data` (train_step.shard_batch) and runs the one jitted step on
the 8-device global mesh; checkpoints and the exported model directory are written
cooperatively (orbax). The launch is the one for GPU nodes without a cluster manager
(loop.initialize_distributed): JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set on
each process and `--config.distributed=True`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import train_helpers as th

# 4 images per device (train_helpers.REFERENCE_BATCH explains why); 2 x 4 devices.
PROCESSES, LOCAL_DEVICES, BATCH, STEPS = 2, 4, th.REFERENCE_BATCH, 2
LOSS = re.compile(r'^step (\d+)/\d+ \| loss ([0-9.]+) \(([^)]*)\)', re.M)


def _losses(stdout: str) -> dict[int, dict[str, float]]:
    out = {}
    for m in LOSS.finditer(stdout):
        terms = re.findall(r'([a-z_]+) (-?[0-9.]+)', m.group(3))
        out[int(m.group(1))] = {'loss': float(m.group(2)), **{f'loss_{k}': float(v) for k, v in terms}}
    return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    cache, data = th.shared_dirs(tmp_path_factory)
    ref = th.reference_run(tmp_path_factory, cache, data)
    workdir = tmp_path_factory.mktemp('multihost') / 'work'
    args = ['-m', 'mrcnn_jax.cli', 'train', '--config', str(th.TINY), '--workdir', str(workdir),
            *th.cli_overrides(data, f'train.batch_size={BATCH}', f'train.steps={STEPS}',
                              'train.checkpoint_every=1', 'train.log_every=1', 'distributed=True')]
    port = th.free_port()
    jobs = [(args, th.subprocess_env(cache, devices=LOCAL_DEVICES, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
                                     JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(i)))
            for i in range(PROCESSES)]
    outs = th.run_concurrently(jobs, timeout=900)
    for i, o in enumerate(outs):
        assert o.returncode == 0, f'process {i}\n' + th.tail(o)
    return {'multi': outs, 'workdir': workdir, 'ref': ref,
            'ref_result': json.loads((ref / 'result.json').read_text())}


def test_both_processes_joined_one_8_device_mesh(runs):
    p0, p1 = runs['multi']
    assert f'starting from scratch: {STEPS} steps, global batch {BATCH}, 8 device(s) (cpu)' in p0.stdout, \
        th.tail(p0)
    assert sorted(_losses(p0.stdout)) == [1, 2]      # only process 0 prints progress
    assert _losses(p1.stdout) == {}


def test_joint_losses_equal_single_device_losses(runs):
    multi = _losses(runs['multi'][0].stdout)
    for s in (1, 2):
        single = runs['ref_result']['one']['metrics'][s - 1]
        assert set(multi[s]) == {'loss', 'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier',
                                 'loss_box_reg', 'loss_mask'}
        for k, v in multi[s].items():      # printed with 4 decimals
            assert v == pytest.approx(single[k], abs=1.5e-4), (s, k)


def test_joint_params_equal_single_device_params(runs):
    """Step 1 (the joint checkpoint 1): params within 1e-5 relative, per array. Step 2 (the exported
    model): as a whole, since proposal choices may flip once the params differ in the last bits."""
    from mrcnn_jax.model_dir import load_model_dir
    f0 = dict(np.load(runs['ref'] / 'initial.npz'))
    f1 = dict(np.load(runs['ref'] / 'one_1.npz'))
    f2 = dict(np.load(runs['ref'] / 'one_2.npz'))
    c1 = th.restore_state(runs['workdir'] / 'checkpoints' / '1' / 'state')
    m1 = {k: c1['params/' + k] for k in f1}
    worst = 0.0
    for k in f1:
        rel = float(np.linalg.norm(m1[k] - f1[k]) / max(np.linalg.norm(f1[k]), 1e-12))
        worst = max(worst, rel)
        assert rel <= 1e-5, (k, rel)
        if not np.array_equal(f1[k], f0[k]):       # the update itself agrees as closely
            rel_u = float(np.linalg.norm(m1[k] - f1[k]) / np.linalg.norm(f1[k] - f0[k]))
            assert rel_u <= 1e-4, (k, rel_u)
    assert sum(not np.array_equal(f1[k], f0[k]) for k in f1) > len(f1) // 2     # a real step
    _, vm, meta = load_model_dir(runs['workdir'] / 'model')
    assert meta['step'] == STEPS
    m2 = {k[len('params/'):]: v for k, v in th.flat(vm).items() if k.startswith('params/')}
    assert m2.keys() == f2.keys()
    rel2 = float(np.sqrt(sum(np.sum((m2[k] - f2[k]) ** 2) for k in f2) / sum(np.sum(f2[k] ** 2) for k in f2)))
    print(f'2 processes x 4 devices vs 1 device: step 1 worst relative param difference {worst:.2e}; '
          f'step 2 relative difference of all params {rel2:.2e}')
    assert rel2 <= 1e-5


def test_checkpoints_written_jointly_with_the_data_position(runs):
    from mrcnn_jax.model_dir import load_model_dir
    ckpts = runs['workdir'] / 'checkpoints'
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [1, 2]
    state = json.loads((ckpts / '2' / 'data' / 'metadata').read_text())
    assert state['step'] == STEPS and state['global_batch_size'] == BATCH
    assert state['process_count'] == PROCESSES
    # the jointly written state is complete: it restores (here, in one process) to the exported params
    restored = th.restore_state(ckpts / '2' / 'state')
    _, vm, _ = load_model_dir(runs['workdir'] / 'model')
    for k, v in th.flat(vm).items():
        assert np.array_equal(restored[k], v), k
    assert int(restored['step']) == STEPS and int(restored['skipped']) == 0
