"""Smoke test of the benchmark's machinery (mrcnn_jax/bench/), not of speed.

The interleaved timer and its pair-by-pair ratios on a fake clock (two sides, and the four of
the Detectron2 cases); `main` in-process on tiny micro-benchmarks (JSON rows, table, ratios
recomputed from the per-pair times); one memory probe subprocess; the train batch built for the
model cases, on synthetic images; the one-line error of `mrcnn-jax benchmark` where torch cannot
be imported. The R50 cases themselves are far too slow for a test (minutes of compilation on 2
cores), except the Detectron2 column of inference_b1 at 128/192 on one synthetic photo: a real
calibrated Detectron2 R50-FPN saved as a model-zoo .pkl, loaded by `DefaultPredictor` and by
`Predictor.from_detectron2`, timed in rounds with stand-ins for the JAX / torchvision sides. Where
the vendored Detectron2 source is absent, the column is skipped with its reason (tested with
$MRCNN_JAX_DETECTRON2 pointing nowhere).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from mrcnn_jax.bench import cases, cli, context, harness, inputs, report

REPO = inputs.REPO
# Running cases needs both frameworks (and pycocotools for paste_rle_100); the rest does not.
needs_torch = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ('torch', 'torchvision', 'pycocotools')),
    reason='torch, torchvision and pycocotools are needed to run cases (pip install "mrcnn-jax[bench,coco]")')

REQUIRED = {'name': str, 'jax_median_s': float, 'torch_median_s': float, 'ratio': float, 'runs': int}


class FakeClock:
    """A clock that only moves when a fake workload says how long it took."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def workload(self, durations):
        it = iter(durations)

        def fn():
            self.t += next(it)
            return 'out'
        return fn


def test_interleave_takes_the_median_of_per_pair_ratios():
    clock = FakeClock()
    # first call, one warm-up, then three timed runs per side
    jax_fn = clock.workload([30.0, 5.0, 1.0, 2.0, 9.0])
    torch_fn = clock.workload([3.0, 5.0, 1.0, 4.0, 3.0])
    seen = []
    t = harness.interleave(jax_fn, torch_fn, runs=3, warmup=1, clock=clock,
                           on_first=lambda side, out: seen.append(side))
    assert seen == ['jax', 'torch']
    assert (t.jax_first_s, t.torch_first_s) == (30.0, 3.0)
    assert t.jax_runs == [1.0, 2.0, 9.0] and t.torch_runs == [1.0, 4.0, 3.0]
    assert t.ratios == [1.0, 0.5, 3.0]
    assert t.ratio == 1.0                                 # median of the pairs' ratios ...
    assert t.jax_median_s / t.torch_median_s == pytest.approx(2 / 3)   # ... not of the medians


def test_interleave_alternates_sides():
    order = []
    harness.interleave(lambda: order.append('a'), lambda: order.append('b'), runs=2, warmup=1)
    assert order == ['a', 'b'] * 4


def test_interleave_sides_runs_rounds_in_order():
    # The Detectron2 cases: rounds of JAX, torchvision, JAX on Detectron2's weights, Detectron2.
    clock = FakeClock()
    fns = {'jax': clock.workload([20.0, 1.0, 2.0]), 'torch': clock.workload([2.0, 2.0, 2.0]),
           'jax_d2': clock.workload([25.0, 3.0, 1.0]), 'd2': clock.workload([4.0, 2.0, 4.0])}
    order = []
    r = harness.interleave_sides(fns, runs=2, clock=clock, on_start=lambda side: order.append(('start', side)),
                                 on_first=lambda side, out: order.append(('first', side)))
    assert order == [(k, side) for side in fns for k in ('start', 'first')]
    assert r.first_s == {'jax': 20.0, 'torch': 2.0, 'jax_d2': 25.0, 'd2': 4.0}
    assert r.runs == {'jax': [1.0, 2.0], 'torch': [2.0, 2.0], 'jax_d2': [3.0, 1.0], 'd2': [2.0, 4.0]}
    assert r.ratios('jax', 'torch') == [0.5, 1.0] and r.ratios('jax_d2', 'd2') == [1.5, 0.25]
    assert r.ratio('jax_d2', 'd2') == pytest.approx(0.875) and r.median('d2') == 3.0
    seen = []
    calls = {side: (lambda side=side: seen.append(side)) for side in ('a', 'b', 'c')}
    harness.interleave_sides(calls, runs=2, warmup=1)
    assert seen == ['a', 'b', 'c'] * 4


def test_resolve_cases():
    # The bf16 throughput cases (issue 6's H100 goals) run by default only where there is a GPU.
    assert cli.resolve_cases('') == list(cases.MODEL_CASES + cases.MICRO_CASES)
    assert cli.resolve_cases('', gpu=True) == list(cases.CASES)
    assert cli.resolve_cases('throughput') == list(cases.THROUGHPUT_CASES)
    assert cli.resolve_cases('micro,inference_b1') == ['inference_b1', *cases.MICRO_CASES]
    assert cli.resolve_cases('train_step_b2,inference_b4') == ['inference_b4', 'train_step_b2']
    with pytest.raises(SystemExit):
        cli.resolve_cases('nope')


def _check_rows(rows, names):
    assert isinstance(rows, list) and [r['name'] for r in rows] == names
    for r in rows:
        assert 'error' not in r, r.get('traceback')
        for key, typ in REQUIRED.items():
            assert isinstance(r[key], typ), (r['name'], key, r[key])
        assert r['runs'] == 2 == len(r['jax_runs_s']) == len(r['torch_runs_s'])
        ratios = [a / b for a, b in zip(r['jax_runs_s'], r['torch_runs_s'])]
        assert r['ratios'] == pytest.approx(ratios)
        assert r['ratio'] == pytest.approx(statistics.median(ratios))
        assert r['jax_median_s'] == pytest.approx(statistics.median(r['jax_runs_s']))
        assert r['torch_median_s'] == pytest.approx(statistics.median(r['torch_runs_s']))
        assert r['torch_first_call_s'] > 0 and r['load_avg'] and r['device']


@needs_torch
def test_main_micro_benchmarks_write_json_rows(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    names = ['roi_align_7x7_gather', 'roi_align_7x7_einsum', 'nms_1000', 'paste_rle_100']
    rc = cli.main(['--quick', '--only', ','.join(names), '--runs', '2', '--memory', 'none',
                   '--micro-canvas', '64x96', '--micro-rois', '16', '--json', str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    _check_rows(rows, names)
    by_name = {r['name']: r for r in rows}
    for name in names[:3]:    # jitted: XLA's compile events were counted
        assert by_name[name]['jax_compile_s'] > 0
        assert by_name[name]['jax_compile_breakdown_s'].get('backend_compile', 0) > 0
    assert by_name['paste_rle_100']['jax_compile_s'] is None      # host numpy
    assert by_name['nms_1000']['jax_output'] == by_name['nms_1000']['torch_output']   # same kept count
    text = capsys.readouterr().out
    assert '| case | runs | JAX s | torch s | ratio jax/torch |' in text
    assert 'AMD' in text or 'cores' in text                        # the header names the machine
    assert 'host memory: transparent hugepages' in text            # and its allocator settings


@needs_torch
def test_memory_probe_runs_each_side_in_a_subprocess(tmp_path):
    out = tmp_path / 'bench.json'
    rc = cli.main(['--quick', '--only', 'nms_1000', '--runs', '2', '--memory', 'all',
                   '--json', str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())
    _check_rows([row], ['nms_1000'])
    for side in ('jax', 'torch'):
        assert row[f'{side}_peak_memory_mb'] > 10, row.get(f'{side}_memory_error')
        assert row[f'{side}_memory_kind'] in ('rss', 'device')


def test_train_batch_on_synthetic_samples():
    from mrcnn_jax.config import default_config
    samples = inputs.synthetic_samples(2, seed=1)
    cfg = default_config()
    cfg.data.min_size, cfg.data.max_size, cfg.data.max_instances, cfg.data.mask_size = (320,), 512, 12, 28
    batch = inputs.train_batch(samples, cfg)
    h, w = samples[0].image.shape[:2]
    rh, rw = inputs.resized_size(h, w, 320, 512)
    assert batch['images'].shape == (2,) + inputs.padded_size(rh, rw) + (3,)
    assert batch['gt_masks'].shape == (2, 12, 28, 28) and batch['gt_masks'].dtype == np.uint8
    for i, s in enumerate(samples):
        n = len(s.boxes)
        assert batch['gt_valid'][i].sum() == n and not batch['gt_is_crowd'][i].any()
        np.testing.assert_array_equal(batch['gt_classes'][i, :n], s.classes)
        np.testing.assert_allclose(batch['gt_boxes'][i, :n], s.boxes * [rw / w, rh / h, rw / w, rh / h], rtol=1e-5)
        np.testing.assert_allclose(batch['image_info'][i], [h, w, rh, rw, rh / h, rw / w], rtol=1e-6)
        assert batch['gt_masks'][i, :n].mean() > 0.5       # ellipses fill most of their box
        assert not batch['images'][i, rh:].any() and not batch['images'][i, :, rw:].any()


def test_crop_masks_samples_cell_centres():
    mask = np.zeros((1, 10, 20), np.uint8)
    mask[0, :, 10:] = 1
    crop = inputs.crop_masks(mask, np.asarray([[0, 0, 20, 10]], np.float32), 4)
    np.testing.assert_array_equal(crop[0], [[0, 0, 1, 1]] * 4)


def test_table_shows_errors_and_missing_fields():
    rows = [{'name': 'inference_b1', 'jax_median_s': None, 'torch_median_s': None, 'ratio': None,
             'runs': 0, 'error': 'RuntimeError: boom'},
            {'name': 'nms_1000', 'jax_median_s': 0.5, 'torch_median_s': 0.25, 'ratio': 2.0, 'runs': 5,
             'load_avg': [1.0, 2.0, 3.0]}]
    table = report.format_table(rows)
    assert 'error: RuntimeError: boom' in table
    assert '| nms_1000 | 5 | 0.5000 | 0.2500 | 2.00 |' in table and '1.0/2.0/3.0' in table


def test_letterbox_places_the_photo_on_a_square_canvas():
    (sample,) = inputs.synthetic_samples(1, seed=2)          # 640x427 photo-like image
    out = inputs.letterbox(sample, 256)
    scale = 256 / 640
    rh = round(427 * scale)
    assert out.image.shape == (256, 256, 3) and out.masks.shape == (len(sample.masks), 256, 256)
    assert out.image[:rh].any() and not out.image[rh:].any()      # black below the photo
    np.testing.assert_allclose(out.boxes, sample.boxes * scale, rtol=1e-6)
    for m, b in zip(out.masks, out.boxes):                       # each mask stays inside its box
        ys, xs = np.nonzero(m)
        assert xs.min() >= b[0] - 1 and xs.max() <= b[2] + 1 and ys.min() >= b[1] - 1 and ys.max() <= b[3] + 1
    np.testing.assert_array_equal(out.classes, sample.classes)


def test_table_gives_images_per_second_for_throughput_cases():
    rows = [{'name': 'train_1024_bf16', 'jax_median_s': 0.08, 'torch_median_s': 0.16, 'ratio': 0.5,
             'runs': 5, 'images_per_call': 8, 'jax_images_per_s': 100.0, 'torch_images_per_s': 50.0}]
    table = report.format_table(rows)
    assert '| train_1024_bf16 | 8 | 100 | 50.0 | 10.0 | 20.0 |' in table


def test_benchmark_without_torch_names_the_extra_in_one_line():
    # A fresh interpreter where `import torch` fails: the CLI module imports without torch, and
    # the command says what to install (the bench extra) instead of a traceback.
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
            "from mrcnn_jax import cli; sys.exit(cli.main(['benchmark', '--quick', '--only', 'nms_1000']))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [cli.NO_TORCH]
    assert 'pip install "mrcnn-jax[bench]"' in cli.NO_TORCH and cli.NO_TORCH.startswith('error: ')


# -- the Detectron2 column ------------------------------------------------------------------------
def _stand_ins(monkeypatch):
    """build_case with instant stand-ins for the JAX and torchvision sides (their R50 models are
    the slow part); the Detectron2 column's sides are the real ones."""
    real = harness.build_case

    def build(name, side, ctx):
        if side in cases.SIDES:
            return (lambda: {'scores': np.zeros(3)}), cases._summ_detections
        return real(name, side, ctx)
    monkeypatch.setattr(harness, 'build_case', build)


def _tiny_context(runs: int = 2, **kw) -> context.Context:
    settings = inputs.Settings(min_size=64, max_size=96, runs=runs, num_images=1, synthetic=True, **kw)
    return context.Context(settings)


def test_detectron2_column_is_skipped_with_its_reason(monkeypatch, tmp_path):
    _stand_ins(monkeypatch)
    monkeypatch.setenv('MRCNN_JAX_DETECTRON2', str(tmp_path / 'no_detectron2_here'))
    ctx = _tiny_context()
    assert 'Detectron2 source not found' in ctx.d2_skip_reason and str(tmp_path) in ctx.d2_skip_reason
    row = harness.run_case('inference_b1', ctx, log=lambda msg: None)
    assert row['d2_skipped'] == ctx.d2_skip_reason and 'd2_median_s' not in row and 'd2_error' not in row
    assert row['jax_median_s'] is not None and row['torch_median_s'] is not None   # the rest still runs
    line = cli.detectron2_line(ctx, ['inference_b1', 'nms_1000'])
    assert line.startswith('column skipped (ImportError: Detectron2 source not found')
    assert 'MRCNN_JAX_DETECTRON2' in line
    assert cli.detectron2_line(ctx, ['nms_1000']) == ''                  # no case with the column
    assert '| inference_b1 | Detectron2 skipped: ImportError: Detectron2 source not found' in report.format_table([row])
    assert 'd2_skipped' not in harness.run_case('inference_b4', ctx, log=lambda msg: None)   # not a D2 case
    off = _tiny_context(detectron2=False)
    assert off.d2_skip_reason == 'turned off (--no-detectron2)'
    assert cli.parse_args(['--no-detectron2']).no_detectron2 and not inputs.Settings.from_args(
        cli.parse_args(['--no-detectron2'])).detectron2


def test_product_and_benchmark_modules_do_not_import_detectron2():
    code = ('import sys, mrcnn_jax, mrcnn_jax.predictor, mrcnn_jax.cli, mrcnn_jax.bench.cli, mrcnn_jax.bench.harness; '
            'bad = [m for m in ("detectron2", "torch") if m in sys.modules]; assert not bad, bad')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


@needs_torch
def test_detectron2_column_at_a_tiny_size(monkeypatch):
    # Where the vendored source is absent this skips (locally) with the reason the benchmark prints.
    ctx = _tiny_context(runs=1)      # one timed round (the rounds' order and medians: tests above)
    if ctx.d2_skip_reason is not None:
        pytest.skip(f'Detectron2 column unavailable: {ctx.d2_skip_reason}')
    _stand_ins(monkeypatch)
    try:
        row = harness.run_case('inference_b1', ctx, log=lambda msg: None)
    finally:
        ctx.close()
    assert 'd2_error' not in row, row.get('d2_traceback')
    assert not os.path.exists(ctx.d2_pkl)                                # close() removed the checkpoint
    for side in cases.ALL_SIDES:                                          # four sides in the same rounds
        assert len(row[f'{side}_runs_s']) == 1 and row[f'{side}_first_call_s'] > 0
        assert row[f'{side}_median_s'] == pytest.approx(statistics.median(row[f'{side}_runs_s']))
    ratios = [a / b for a, b in zip(row['jax_d2_runs_s'], row['d2_runs_s'])]
    assert row['ratios_jax_d2'] == pytest.approx(ratios)
    assert row['ratio_jax_d2'] == pytest.approx(statistics.median(ratios))
    assert row['jax_d2_compile_s'] > 0 and row['jax_d2_compile_breakdown_s'].get('backend_compile', 0) > 0
    # The same weights on both sides: Detectron2's DefaultPredictor and our Predictor of its .pkl
    # find (nearly) the same instances on the photo.
    n_jax, n_d2 = (int(row[f'{side}_output'].split()[-1]) for side in ('jax_d2', 'd2'))
    assert n_d2 > 0 and abs(n_jax - n_d2) <= max(1, n_d2 // 20), (n_jax, n_d2)
    table = report.format_table([row])
    assert 'ratio jax/d2' in table and 'same-weights comparison with Detectron2' in table
    assert f'| inference_b1 | 1 | {report._fmt(row["jax_median_s"], 4)} |' in table
    assert report._fmt(row['ratio_jax_d2'], 2) in table.split('ratio jax/d2')[-1]
