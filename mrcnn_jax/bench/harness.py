"""Timing the sides of a case: interleaved rounds (A B A B ..., or A B C D A B C D ... with the
Detectron2 column), per-pair ratios, XLA's compile events during each JAX side's first call, and
`run_case`, which turns one case into one row."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Mapping

from mrcnn_jax.bench.cases import (D2_CASES, D2_SIDES, MICRO_CASES, SIDES, THROUGHPUT_CASES, build_case,
                                   case_params)
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


@dataclasses.dataclass
class Rounds:
    """Several sides timed in interleaved rounds: each side's first call and timed runs."""
    first_s: dict[str, float]
    runs: dict[str, list[float]]

    def median(self, side: str) -> float:
        return statistics.median(self.runs[side])

    def ratios(self, a: str, b: str) -> list[float]:
        """a / b of each round."""
        return [x / y if y > 0 else float('nan') for x, y in zip(self.runs[a], self.runs[b])]

    def ratio(self, a: str, b: str) -> float:
        """Median of the per-round ratios a / b (not the ratio of the medians)."""
        return statistics.median(self.ratios(a, b))


def interleave_sides(fns: Mapping[str, Callable[[], Any]], runs: int, warmup: int = 0,
                     clock: Callable[[], float] = time.perf_counter,
                     on_first: Callable[[str, Any], None] | None = None,
                     on_start: Callable[[str], None] | None = None) -> Rounds:
    """Times the sides' fns in rounds, in the mapping's order: first calls (A B C ...), `warmup`
    untimed rounds, then `runs` timed rounds A B C A B C. Each fn must block until its result is
    computed. `on_start(side)` runs just before a side's first call, `on_first(side, out)` just
    after it (untimed both)."""
    if runs < 1:
        raise ValueError(f'runs must be >= 1, got {runs}')
    first: dict[str, float] = {}
    for side, fn in fns.items():
        if on_start:
            on_start(side)
        t0 = clock()
        out = fn()
        first[side] = clock() - t0
        if on_first:
            on_first(side, out)
        del out
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {side: [] for side in fns}
    for _ in range(runs):
        for side, fn in fns.items():
            t0 = clock()
            fn()
            times[side].append(clock() - t0)
    return Rounds(first, times)


def interleave(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], runs: int, warmup: int = 0,
               clock: Callable[[], float] = time.perf_counter,
               on_first: Callable[[str, Any], None] | None = None) -> Timing:
    """Times jax_fn and torch_fn alternately: first calls (A B), `warmup` untimed pairs, then
    `runs` timed pairs A B A B. Each fn must block until its result is computed."""
    r = interleave_sides({'jax': jax_fn, 'torch': torch_fn}, runs, warmup, clock, on_first)
    return Timing(r.first_s['jax'], r.first_s['torch'], r.runs['jax'], r.runs['torch'])


COMPILE_EVENTS = {
    '/jax/core/compile/jaxpr_trace_duration': 'trace',
    '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
    '/jax/core/compile/backend_compile_duration': 'backend_compile',
}


class CompileTimer:
    """Sums JAX's compile-time events (trace, lowering to MLIR, XLA backend compile) from entry
    (or from `start()`, with `on=False`) until `stop()` (the end of the JAX side's first call) or
    exit."""

    def __init__(self, on: bool = True):
        self.events: list[tuple[str, float]] = []
        self._on = on

    def start(self) -> None:
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


def _side_fields(row: dict, name: str, side: str, rounds: Rounds, timer: CompileTimer | None) -> None:
    """The `{side}_*` fields of a row: median, first call, runs and, for a JAX side, compile."""
    median = rounds.median(side)
    first = rounds.first_s[side]
    row[f'{side}_median_s'] = median
    row[f'{side}_first_call_s'] = first
    row[f'{side}_runs_s'] = rounds.runs[side]
    if timer is not None:
        first_minus_median = max(first - median, 0.0)
        # XLA's own account of the first call: tracing + lowering + backend compilation (from
        # jax.monitoring); the first call minus the steady-state median is kept beside it.
        row[f'{side}_compile_s'] = (timer.total_s if timer.events else
                                    (first_minus_median if name != 'paste_rle_100' else None))
        row[f'{side}_compile_breakdown_s'] = timer.breakdown()
        row[f'{side}_first_minus_median_s'] = first_minus_median


def run_case(name: str, ctx: Context, log: Callable[[str], None] = print) -> dict:
    """Times one case (its sides interleaved) and returns its row. The R50-FPN inference cases
    (D2_CASES) add the Detectron2 column where `ctx.d2_skip_reason` is None: JAX on Detectron2's
    weights ('jax_d2') and Detectron2 ('d2') in the same rounds as JAX and torchvision; a failure
    to build those two sides is recorded in the row (`d2_error`) and the case goes on without them."""
    s = ctx.settings
    row: dict[str, Any] = {'name': name, 'jax_median_s': None, 'torch_median_s': None, 'ratio': None,
                           'runs': 0, 'params': case_params(name, ctx)}
    fns: dict[str, Callable[[], Any]] = {}
    summs: dict[str, Callable[[Any], str] | None] = {}
    for side in SIDES:
        t0 = time.perf_counter()
        fns[side], summs[side] = build_case(name, side, ctx)
        row[f'{side}_setup_s'] = time.perf_counter() - t0
    if name in D2_CASES:
        reason = ctx.d2_skip_reason
        if reason is not None:
            row['d2_skipped'] = reason
        else:
            try:
                for side in D2_SIDES:
                    t0 = time.perf_counter()
                    fns[side], summs[side] = build_case(name, side, ctx)
                    row[f'{side}_setup_s'] = time.perf_counter() - t0
            except Exception as e:  # the JAX / torchvision comparison still runs
                for side in D2_SIDES:
                    fns.pop(side, None)
                row['d2_error'] = f'{type(e).__name__}: {e}'
                row['d2_traceback'] = traceback.format_exc()
                print(row['d2_traceback'], file=sys.stderr, flush=True)
                log(f'  Detectron2 column failed ({row["d2_error"].splitlines()[0][:200]}); '
                    f'timing JAX and torchvision only')
    notes: dict[str, str] = {}
    jax_sides = [x for x in fns if x.startswith('jax')]

    micro = name in MICRO_CASES
    reset_torch_device_peak()
    with contextlib.ExitStack() as stack:
        timers = {x: stack.enter_context(CompileTimer(on=False)) for x in jax_sides}

        def on_start(side):
            if side in timers:
                timers[side].start()

        def on_first(side, out):
            if side in timers:
                timers[side].stop()
            if summs[side] is not None:
                notes[side] = summs[side](out)

        rounds = interleave_sides(fns, s.runs, s.micro_warmup if micro else s.warmup,
                                  on_first=on_first, on_start=on_start)
    for side in fns:
        _side_fields(row, name, side, rounds, timers.get(side))
        row[f'{side}_output'] = notes.get(side)
    row.update(ratio=rounds.ratio('jax', 'torch'), ratios=rounds.ratios('jax', 'torch'), runs=s.runs,
               load_avg=load_avg())
    if 'd2' in fns:
        # the same-weights comparison with Detectron2: JAX on Detectron2's checkpoint over Detectron2
        row.update(ratio_jax_d2=rounds.ratio('jax_d2', 'd2'), ratios_jax_d2=rounds.ratios('jax_d2', 'd2'))
    row.update(device_peaks_mb())
    if name in THROUGHPUT_CASES:
        n = s.throughput_batch if name == 'train_1024_bf16' else s.infer_batch
        row['images_per_call'] = n
        row['jax_images_per_s'] = n / row['jax_median_s']
        row['torch_images_per_s'] = n / row['torch_median_s']
    if name == 'forward_b1':
        reused = [x for x in jax_sides if timers[x].breakdown().get('backend_compile', 0.0) < 1.0]
        if reused:
            row['notes'] = (f'{" and ".join(reused)}: JAX reused the program inference_b1 compiled (same '
                            f'function and shapes): see inference_b1 for its compile time')
    return row
