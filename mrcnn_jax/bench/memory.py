"""Peak memory per side and case, each in a fresh subprocess that never imports the other
side's framework (`python -m mrcnn_jax.bench.cli --probe SIDE CASE --probe-dir DIR`): the
process's peak RSS (VmHWM) and, on a GPU, the device's peak; the Detectron2 column's sides
('jax_d2', 'd2') too where the row timed them. Also the in-process device peaks that `run_case`
records beside its timings."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

from mrcnn_jax.bench.cases import D2_SIDES, MICRO_CASES, MODEL_CASES, SIDES, TORCH_SIDES, build_case
from mrcnn_jax.bench.context import Context
from mrcnn_jax.bench.inputs import REPO, Settings
from mrcnn_jax.bench.report import cores, load_avg

PROBE_TIMEOUT_S = 3600


def reset_torch_device_peak() -> None:
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_peaks_mb() -> dict:
    """On a GPU, in this process: torch's peak allocation since the case began
    (`torch_device_peak_mb`) and JAX's peak since the process began (`jax_device_peak_so_far_mb`:
    XLA's allocator keeps no resettable peak, so this one only grows from case to case; the
    per-case figure comes from the probes)."""
    out: dict[str, float] = {}
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        out['torch_device_peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    jax = sys.modules.get('jax')
    if jax is not None and jax.default_backend() != 'cpu':
        stats = jax.devices()[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            out['jax_device_peak_so_far_mb'] = stats['peak_bytes_in_use'] / 2 ** 20
    return out


def probe_memory(name: str, side: str, probe_dir: str, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Runs `--probe side name` in a fresh interpreter; returns its report (or an 'error')."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    cmd = [sys.executable, '-m', 'mrcnn_jax.bench.cli', '--probe', side, name, '--probe-dir', probe_dir]
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'probe timed out after {timeout:.0f} s'}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('PROBE '):
            return json.loads(line[len('PROBE '):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {'error': f'probe exited with {proc.returncode}: ' + '\n'.join(tail)}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: VmHWM of /proc/self/status, which starts
    afresh at exec (ru_maxrss does not: after fork + exec it keeps the parent's RSS at the fork,
    so every probe would report at least the parent's size)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def probe_main(side: str, name: str, probe_dir: str) -> int:
    """Child process: build one side of one case, run it twice (first call + one steady run),
    print its peak memory as `PROBE {json}`."""
    with open(os.path.join(probe_dir, 'settings.json')) as f:
        settings = Settings.from_json(json.load(f))
    if side in TORCH_SIDES:
        import torch
        torch.set_num_threads(cores())
    ctx = Context(settings, probe_dir=probe_dir)
    fn, _ = build_case(name, side, ctx)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    steady = time.perf_counter() - t0
    report = {'side': side, 'case': name, 'rss_peak_mb': peak_rss_mb(),
              'first_call_s': first, 'steady_s': steady, 'device_peak_mb': None}
    if side not in TORCH_SIDES:
        import jax
        stats = jax.devices()[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            report['device_peak_mb'] = stats['peak_bytes_in_use'] / 2 ** 20
    else:
        import torch
        if torch.cuda.is_available():
            report['device_peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    print('PROBE ' + json.dumps(report), flush=True)
    return 0


def probe_rows(ctx: Context, rows: Sequence[dict], which: str, save: Callable[[], None]) -> bool:
    """Probes the timed rows that `which` selects ('model' cases, 'all', 'none'), each side in its
    own subprocess, and adds `{side}_peak_memory_mb` (the device's peak on a GPU, else peak RSS)
    and the probe's details to each row; `save()` after each row. Returns whether a probe failed.
    The parent's models are released first, so that the probes have the memory."""
    probed = [r for r in rows if r.get('jax_median_s') is not None and
              (which == 'all' or (which == 'model' and r['name'] in MODEL_CASES))]
    if not probed:
        return False
    failed = False
    print('\n## peak memory (one subprocess per side and case)', flush=True)
    with_model = any(r['name'] not in MICRO_CASES for r in probed)
    with_d2 = any(r.get('d2_median_s') is not None for r in probed)
    probe_dir = tempfile.mkdtemp(prefix='mrcnn_bench_probe_')
    try:
        ctx.save_for_probes(probe_dir, with_model, with_d2)
        ctx.release_models()
        for row in probed:
            sides = SIDES + (D2_SIDES if row.get('d2_median_s') is not None else ())
            for side in sides:
                rep = probe_memory(row['name'], side, probe_dir)
                if 'error' in rep:
                    failed = True
                    row[f'{side}_memory_error'] = rep['error']
                    print(f'  {row["name"]} {side}: {rep["error"]}', file=sys.stderr, flush=True)
                    continue
                peak = rep['device_peak_mb'] if rep.get('device_peak_mb') is not None else rep['rss_peak_mb']
                row[f'{side}_peak_memory_mb'] = peak
                row[f'{side}_peak_rss_mb'] = rep['rss_peak_mb']
                row[f'{side}_memory_kind'] = 'device' if rep.get('device_peak_mb') is not None else 'rss'
                row[f'{side}_probe_first_call_s'] = rep['first_call_s']
                print(f'  {row["name"]} {side}: peak {peak:.0f} MB ({row[f"{side}_memory_kind"]}), '
                      f'rss {rep["rss_peak_mb"]:.0f} MB, load {load_avg()}', flush=True)
            row['memory_load_avg'] = load_avg()
            save()
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return failed
