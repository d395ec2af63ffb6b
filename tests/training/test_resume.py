"""Exact resume through the real CLI: 6 steps straight == 3 steps, SIGKILL, resume for 3 steps.

`mrcnn-jax train` runs in subprocesses. The killed run saves a checkpoint at step 3, runs step 4,
waits for pending checkpoint writes and SIGKILLs itself (loop.py's MRCNN_JAX_SIGKILL_AFTER_STEP
hook), so step 4's work is lost. The rerun on the same workdir must resume from step 3, see the
same batches (data iterator position restored) and end bit-identical to the straight run (CPU).

The straight run and the killed one are also two fresh runs of the same config and seed: up to
step 3 they must agree bit for bit (the default data order is deterministic; with
`data.deterministic=False` tf.data's parallel maps reorder elements and they do not). Every run
compiles at XLA's default optimization level, as `mrcnn-jax train` does for a user, not at the
-O0 of the other training tests.
"""

from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest

import train_helpers as th

STEPS, EVERY, KILL_AFTER = 6, 3, 4
LINE = re.compile(r'^step (\d+)/(\d+) \| (loss [^|]*)\| lr ([0-9.e+-]+) \| ([0-9.]+) s/step \| '
                  r'([0-9.]+) img/s \| ETA (\S+)(?: \(first step: includes compilation\))?$', re.M)


# Eight parallel calls per map stage instead of AUTOTUNE (which starts low and stays low behind a
# slow consumer such as a train step): several elements are in flight from the first batch on, so
# without a deterministic order the runs would see other batches within the first steps.
PARALLEL_CALLS = 8


def _args(workdir, data):
    return ['-m', 'mrcnn_jax.cli', 'train', '--config', str(th.TINY), '--workdir', str(workdir),
            *th.cli_overrides(data, f'train.steps={STEPS}', f'train.checkpoint_every={EVERY}',
                              'train.log_every=1', 'train.batch_size=2',
                              f'data.num_parallel_calls={PARALLEL_CALLS}')]


def _progress(stdout: str) -> dict[int, tuple]:
    """{step: (loss text with every term, lr)} from the progress lines."""
    return {int(m.group(1)): (m.group(3).strip(), m.group(4)) for m in LINE.finditer(stdout)}


def _env(cache, **extra):
    return th.subprocess_env(cache, fast_compile=False, **extra)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    cache, data = th.shared_dirs(tmp_path_factory)
    straight_dir = tmp_path_factory.mktemp('straight')
    resumed_dir = tmp_path_factory.mktemp('resumed')
    # the straight run and the run to be killed side by side (2 cores), then the rerun
    straight, killed = th.run_concurrently([
        (_args(straight_dir, data), _env(cache)),
        (_args(resumed_dir, data), _env(cache, MRCNN_JAX_SIGKILL_AFTER_STEP=str(KILL_AFTER))),
    ])
    assert straight.returncode == 0, th.tail(straight)
    ckpts_after_kill = sorted(int(p.name) for p in (resumed_dir / 'checkpoints').iterdir()
                              if p.name.isdigit())
    resumed = th.run(_args(resumed_dir, data), _env(cache), timeout=900)
    assert resumed.returncode == 0, th.tail(resumed)
    return {'straight': straight, 'killed': killed, 'resumed': resumed, 'ckpts_after_kill': ckpts_after_kill,
            'straight_dir': straight_dir, 'resumed_dir': resumed_dir}


def test_kill_is_a_real_sigkill_after_step_4_with_checkpoint_3_on_disk(runs):
    killed = runs['killed']
    assert killed.returncode == -signal.SIGKILL, th.tail(killed)
    steps = sorted(_progress(killed.stdout))
    assert steps == [1, 2, 3, 4], th.tail(killed)      # step 4 ran, and nothing after it
    assert 'starting from scratch' in killed.stdout
    assert runs['ckpts_after_kill'] == [3]              # step 4 was never saved


def test_two_fresh_runs_are_bit_identical(runs):
    """Same config, same seed, data.deterministic at its default: the same batches in the same
    order however many elements the parallel maps have in flight, so the same losses at every
    step and the same state in the step-3 checkpoints, bit for bit."""
    straight, killed = _progress(runs['straight'].stdout), _progress(runs['killed'].stdout)
    for s in range(1, KILL_AFTER + 1):
        assert killed[s] == straight[s], (s, killed[s], straight[s])
    a = th.restore_state(runs['straight_dir'] / 'checkpoints' / str(EVERY) / 'state')
    b = th.restore_state(runs['resumed_dir'] / 'checkpoints' / str(EVERY) / 'state')
    assert a.keys() == b.keys() and int(a['step']) == EVERY
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f'{len(differ)} of {len(a)} arrays differ, e.g. {differ[:3]}'


def test_rerun_resumes_from_step_3(runs):
    out = runs['resumed'].stdout
    assert 'resuming from step 3' in out, th.tail(runs['resumed'])
    assert 'starting from scratch' not in out
    assert sorted(_progress(out)) == [4, 5, 6]


def test_resumed_run_sees_the_same_batches_and_losses(runs):
    straight, resumed = _progress(runs['straight'].stdout), _progress(runs['resumed'].stdout)
    assert sorted(straight) == list(range(1, STEPS + 1)), th.tail(runs['straight'])
    # Loss terms depend on the batch: equal values at 4..6 mean the iterator resumed at batch 4
    # (restarting the data at batch 1 would change them), and lr follows the restored step.
    for s in range(KILL_AFTER, STEPS + 1):
        assert resumed[s] == straight[s], (s, resumed[s], straight[s])
    assert len({straight[s][0] for s in range(1, STEPS + 1)}) == STEPS   # batches differ per step
    data = json.loads((runs['resumed_dir'] / 'checkpoints' / str(STEPS) / 'data' / 'metadata').read_text())
    assert data['step'] == STEPS


def test_final_state_is_bit_identical(runs):
    a = th.restore_state(runs['straight_dir'] / 'checkpoints' / str(STEPS) / 'state')
    b = th.restore_state(runs['resumed_dir'] / 'checkpoints' / str(STEPS) / 'state')
    assert a.keys() == b.keys()
    assert any(k.startswith('opt_state') for k in a) and any(k.startswith('frozen') for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert int(a['step']) == STEPS and int(a['skipped']) == 0
    # ... and so are the exported model variables (workdir/model)
    from mrcnn_jax.model_dir import load_model_dir
    _, va, ma = load_model_dir(runs['straight_dir'] / 'model')
    _, vb, mb = load_model_dir(runs['resumed_dir'] / 'model')
    fa, fb = th.flat(va), th.flat(vb)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k
    assert ma['step'] == mb['step'] == STEPS


def test_progress_line_fields(runs):
    """loss and every loss term, lr, s/step, img/s and ETA, on every log step."""
    lines = [m for m in LINE.finditer(runs['straight'].stdout)]
    assert len(lines) == STEPS
    for m in lines:
        terms = m.group(3)
        for term in ('objectness', 'rpn_box_reg', 'classifier', 'box_reg', 'mask'):
            assert re.search(rf'\b{term} -?[0-9.]+', terms), terms
        assert float(m.group(4)) == pytest.approx(0.02, rel=1e-3)   # no warmup, no decay
        assert float(m.group(5)) > 0 and float(m.group(6)) > 0
    assert lines[-1].group(7) == '0m00s'
