"""Shared setup of the train-step / loop / multi-device / multi-host / resume tests.

Every test here trains the same model with the same optimizer settings (`OVERRIDES` on
configs/tiny_test.py) in subprocesses (the device count is fixed when jax starts) that share one
persistent compilation cache per pytest session (`shared_dirs`): a process with the same device
topology and flags reuses what another compiled (e.g. the float32 batch-2 step of the three
`mrcnn-jax train` runs of test_resume.py). A compile of the tiny train step costs ~25-40 s on a
2-core CPU at -O0, a cache hit a few seconds. Tests are correct without the cache (a file run
alone just compiles more).

The data settings are the defaults' (`data.deterministic` included): the runs that must agree
bit for bit (test_resume.py) rely on the same element order as a user's run.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / 'configs' / 'tiny_test.py'
WORKER = pathlib.Path(__file__).resolve().parent / 'train_worker.py'

# FrozenBN with the stem and layer1 frozen (frozen_stages=2): every test then also exercises the
# 'frozen' collection and the optimizer's frozen-parameter mask. No warmup, so one step moves
# the parameters by lr * grad with lr = base_lr (equivalence tests compare real updates).
OVERRIDES = (
    'model.backbone.norm=frozen_bn',
    'model.backbone.frozen_stages=2',
    'train.base_lr=0.02',
    'train.warmup_steps=0',
    'train.decay_steps=()',
    'train.weight_decay=0.0001',
    'train.clip_norm=0.0',
    'data.synthetic_num_train=16',
    'data.synthetic_num_val=8',
    'data.synthetic_image_size=128',
)


def shared_dirs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(persistent compilation cache dir, synthetic dataset dir), one pair per pytest session.

    Found by name under the session's base temp dir, so every test module (and every
    subprocess it starts) uses the same ones. Under pytest-xdist (`make test`) each worker has its
    own base temp dir inside the session's: the cache goes in the session's, one for all workers,
    so that a worker's run reuses what another compiled (JAX's cache takes concurrent writers, as
    the suite's in-process cache in .pytest_cache already does); the dataset stays per worker
    (generating it takes a second, and two writers would race).
    """
    base = tmp_path_factory.getbasetemp() / 'mrcnn_training_shared'
    session = tmp_path_factory.getbasetemp().parent if os.environ.get('PYTEST_XDIST_WORKER') else base
    cache, data = session / 'mrcnn_training_jax_cache', base / 'synthetic'
    cache.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    from mrcnn_jax.data import synthetic
    synthetic.ensure_synthetic(config(data))
    return cache, data


def overrides(synthetic_dir, *extra: str) -> list[str]:
    return [*OVERRIDES, f'data.synthetic_dir={synthetic_dir}', *extra]


def config(synthetic_dir, *extra: str):
    from mrcnn_jax.config import load_config
    return load_config(TINY, overrides(synthetic_dir, *extra))


def cli_overrides(synthetic_dir, *extra: str) -> list[str]:
    return [f'--config.{o}' for o in overrides(synthetic_dir, *extra)]


# Subprocesses compile with LLVM at -O0 by default: about half the compile time of the default
# (-O2) for ~1.4x the step time, a good trade for tests that run few steps. Every process that
# must compute bit-identical results or share the compilation cache uses the same flags. The
# resume test compiles at XLA's default level (fast_compile=False), the one users train with.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def subprocess_env(cache_dir, devices: int = 0, fast_compile: bool = True, **extra: str) -> dict:
    """Environment of a test subprocess: CPU only, the shared compilation cache, -O0 compiles
    (XLA's default optimization level with fast_compile=False), `devices` virtual CPU devices
    (0: jax's default, one)."""
    flags = [FAST_COMPILE] if fast_compile else []
    if devices:
        flags.append(f'--xla_force_host_platform_device_count={devices}')
    env = dict(os.environ)
    for k in ('XLA_FLAGS', 'JAX_PLATFORMS', 'MRCNN_JAX_SIGKILL_AFTER_STEP', 'JAX_COORDINATOR_ADDRESS',
              'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
        env.pop(k, None)
    env.update({
        'JAX_PLATFORMS': 'cpu',
        'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
        # A size limit turns on the cache's file lock: concurrent test processes then never read
        # an entry another one is still writing.
        'JAX_COMPILATION_CACHE_MAX_SIZE': str(8 << 30),
        'TF_CPP_MIN_LOG_LEVEL': '2',
        'PYTHONPATH': os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep),
        'PYTHONUNBUFFERED': '1',
        'XLA_FLAGS': ' '.join(flags),
    })
    env.update(extra)
    return env


def run(args: list[str], env: dict, timeout: float = 600, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_concurrently(jobs: list[tuple[list[str], dict]], timeout: float = 900
                     ) -> list[subprocess.CompletedProcess]:
    """Start every (args, env) job at once, wait for all; kills the leftovers on timeout/error."""
    procs = [subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, env in jobs]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outs


def tail(p: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f'--- stdout ---\n{p.stdout[-n:]}\n--- stderr ---\n{p.stderr[-n:]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def reference_run(tmp_path_factory, cache, data) -> pathlib.Path:
    """train_worker.py `reference` on 8 virtual devices, once per session (test_multidevice.py
    and test_multihost.py both use it). Returns its output directory."""
    out = tmp_path_factory.getbasetemp() / 'mrcnn_training_shared' / 'reference'
    if not (out / 'result.json').exists():
        p = run([str(WORKER), 'reference', '--synthetic-dir', str(data), '--out', str(out),
                 '--batch', str(REFERENCE_BATCH)], subprocess_env(cache, devices=REFERENCE_DEVICES),
                timeout=1200)
        assert p.returncode == 0, tail(p)
    return out


# 8 devices x 4 images. With 1 image per device (global batch 8) the 8-device and 1-device steps
# differ by ~2e-5 relative for a reason unrelated to sharding: XLA:CPU picks another GEMM blocking
# for some small convolutions (layer4, the FPN 1x1 on 4x4 maps) when M = batch x H x W is 16
# rather than 128, the features then differ in the last bits (~1e-7), and the proposals' top-k /
# NMS order turns that into a few different background RoIs. From 4 images per device on, every
# convolution of the tiny model computes bitwise the same per image as on one device: the forward
# passes match exactly and only the order of the gradient sums differs (~1e-8).
REFERENCE_DEVICES, REFERENCE_BATCH = 8, 32


def restore_state(path) -> dict:
    """A TrainState checkpoint (orbax, any topology) as {'params/...': numpy array}."""
    import jax
    import orbax.checkpoint as ocp
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(path)
        tree = getattr(meta, 'item_metadata', meta)
        tree = getattr(tree, 'tree', tree)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        return flat(c.restore(path, target))


def flat(tree) -> dict:
    """{'a/b/c': numpy array} of a nested dict / pytree."""
    import jax
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
        out[key] = np.asarray(leaf)
    return out
