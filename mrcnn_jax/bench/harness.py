"""Timing both sides of a case: interleaved pairs (A B A B ...), per-pair ratios, XLA's compile
events during JAX's first call, and `run_case`, which turns one case into one row."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

from mrcnn_jax.bench.cases import MICRO_CASES, THROUGHPUT_CASES, build_case, case_params
from mrcnn_jax.bench.context import Context
from mrcnn_jax.bench.memory import device_peaks_mb, reset_torch_device_peak
from mrcnn_jax.bench.report import load_avg


@dataclasses.dataclass
class Timing:
    jax_first_s: float
    torch_first_s: float
    jax_runs: list[float]
    torch_runs: list[float]

    @property
    def ratios(self) -> list[float]:
        """jax / torch of each interleaved pair."""
        return [a / b if b > 0 else float('nan') for a, b in zip(self.jax_runs, self.torch_runs)]

    @property
    def jax_median_s(self) -> float:
        return statistics.median(self.jax_runs)

    @property
    def torch_median_s(self) -> float:
        return statistics.median(self.torch_runs)

    @property
    def ratio(self) -> float:
        """Median of the per-pair ratios (not the ratio of the medians)."""
        return statistics.median(self.ratios)


def interleave(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], runs: int, warmup: int = 0,
               clock: Callable[[], float] = time.perf_counter,
               on_first: Callable[[str, Any], None] | None = None) -> Timing:
    """Times jax_fn and torch_fn alternately: first calls (A B), `warmup` untimed pairs, then
    `runs` timed pairs A B A B. Each fn must block until its result is computed."""
    if runs < 1:
        raise ValueError(f'runs must be >= 1, got {runs}')
    t0 = clock()
    out = jax_fn()
    jax_first = clock() - t0
    if on_first:
        on_first('jax', out)
    t0 = clock()
    out = torch_fn()
    torch_first = clock() - t0
    if on_first:
        on_first('torch', out)
    del out
    for _ in range(warmup):
        jax_fn()
        torch_fn()
    ja, ta = [], []
    for _ in range(runs):
        t0 = clock()
        jax_fn()
        ja.append(clock() - t0)
        t0 = clock()
        torch_fn()
        ta.append(clock() - t0)
    return Timing(jax_first, torch_first, ja, ta)


COMPILE_EVENTS = {
    '/jax/core/compile/jaxpr_trace_duration': 'trace',
    '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
    '/jax/core/compile/backend_compile_duration': 'backend_compile',
}


class CompileTimer:
    """Sums JAX's compile-time events (trace, lowering to MLIR, XLA backend compile) from entry
    until `stop()` (the end of the JAX side's first call) or exit."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self._on = True

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if self._on and event in COMPILE_EVENTS:
            self.events.append((COMPILE_EVENTS[event], float(duration)))

    def __enter__(self) -> 'CompileTimer':
        import jax.monitoring
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def stop(self) -> None:
        self._on = False

    def __exit__(self, *exc) -> None:
        import jax.monitoring
        self._on = False
        try:
            jax.monitoring.unregister_event_duration_listener(self._listener)
        except (AttributeError, ValueError, AssertionError):
            pass

    @property
    def total_s(self) -> float:
        return sum(d for _, d in self.events)

    def breakdown(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, d in self.events:
            out[k] = out.get(k, 0.0) + d
        return out


def run_case(name: str, ctx: Context, log: Callable[[str], None] = print) -> dict:
    """Times one case (both sides interleaved) and returns its row."""
    s = ctx.settings
    row: dict[str, Any] = {'name': name, 'jax_median_s': None, 'torch_median_s': None, 'ratio': None,
                           'runs': 0, 'params': case_params(name, ctx)}
    t0 = time.perf_counter()
    jax_fn, jax_summ = build_case(name, 'jax', ctx)
    jax_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch_fn, torch_summ = build_case(name, 'torch', ctx)
    torch_setup = time.perf_counter() - t0
    notes: dict[str, str] = {}

    def on_first(side, out):
        summ = jax_summ if side == 'jax' else torch_summ
        if summ is not None:
            notes[side] = summ(out)

    micro = name in MICRO_CASES
    reset_torch_device_peak()
    with CompileTimer() as compile_timer:
        timing = interleave(jax_fn, torch_fn, s.runs, s.micro_warmup if micro else s.warmup,
                            on_first=lambda side, out: (on_first(side, out), compile_timer.stop()))
    first_minus_median = max(timing.jax_first_s - timing.jax_median_s, 0.0)
    row.update(
        jax_median_s=timing.jax_median_s, torch_median_s=timing.torch_median_s, ratio=timing.ratio,
        runs=len(timing.jax_runs),
        # XLA's own account of the first call: tracing + lowering + backend compilation (from
        # jax.monitoring); the first call minus the steady-state median is kept beside it.
        jax_compile_s=(compile_timer.total_s if compile_timer.events else
                       (first_minus_median if name != 'paste_rle_100' else None)),
        jax_compile_breakdown_s=compile_timer.breakdown(),
        jax_first_minus_median_s=first_minus_median,
        jax_first_call_s=timing.jax_first_s, torch_first_call_s=timing.torch_first_s,
        jax_runs_s=timing.jax_runs, torch_runs_s=timing.torch_runs, ratios=timing.ratios,
        jax_setup_s=jax_setup, torch_setup_s=torch_setup,
        jax_output=notes.get('jax'), torch_output=notes.get('torch'),
        load_avg=load_avg())
    row.update(device_peaks_mb())
    if name in THROUGHPUT_CASES:
        n = s.throughput_batch if name == 'train_1024_bf16' else s.infer_batch
        row['images_per_call'] = n
        row['jax_images_per_s'] = n / timing.jax_median_s
        row['torch_images_per_s'] = n / timing.torch_median_s
    if name == 'forward_b1' and compile_timer.breakdown().get('backend_compile', 0.0) < 1.0:
        row['notes'] = ('JAX reused the program inference_b1 compiled (same function and shapes): '
                        'see inference_b1 for its compile time')
    return row
