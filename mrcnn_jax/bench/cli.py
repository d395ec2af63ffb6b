"""JAX against torchvision, and Detectron2 (FPN, C4 or Cascade), each on the same weights, images
and machine (issue 6, section 1).

    python scripts/benchmark.py [--quick] [--only NAME[,NAME]] [--runs N] [--json PATH]
    mrcnn-jax benchmark [the same arguments]

One run builds torchvision's Mask R-CNN R50-FPN with seeded, calibrated weights
(`mrcnn_jax.testing.torchvision_reference`, calibrated on the benchmark images), converts its
state_dict with `Predictor.from_torchvision` and times, on the same real photos
(`../shared/data/coco128_seg`, else synthetic photo-like images):

  inference_b1    image in -> pasted masks out, 800/1333 sizing: `Predictor(image)` vs `model([x])`
  inference_b4    4 images of one canvas bucket: `Predictor(batch_size=4)(images)` vs `model(4 x)`
  forward_b1      the model alone on a preprocessed canvas (no paste): our jitted `model.apply`
                  vs torchvision's backbone + rpn + roi_heads on its transformed ImageList
  train_step_b2   one SGD step at batch 2 on torchvision's padded canvas: `make_train_step`
                  (FrozenBN, frozen stem + res2, 1-device mesh) vs `model(images, targets)`,
                  `sum(losses).backward()`, `SGD.step()`
  roi_align_{7x7,14x14}_{gather,einsum}
                  multi-level RoIAlign (1000 RoIs -> 7x7 and 100 RoIs -> 14x14, 256 channels,
                  on the FPN of an 800x1216 canvas) vs torchvision's MultiScaleRoIAlign
  nms_{1000,5000} fixed-size NMS (IoU 0.7, every kept box returned) vs torchvision.ops.nms
  paste_rle_100   100 masks of 28x28 pasted into a 427x640 image, thresholded at 0.5 and
                  RLE-encoded: `evaluation.rle.paste_masks_to_rle` vs `paste_masks_in_image` +
                  pycocotools (as torchvision's COCO evaluation does)
  train_1024_bf16 (GPU default; `--only throughput` elsewhere) a train step on
                  `--throughput-batch` (16) photos letterboxed onto 1024x1024, bf16 compute
                  (`model.dtype='bfloat16'`, float32 parameters) vs torch autocast(bfloat16);
                  the row adds images/s per side (issue 6's H100 goal: >= 40 images/s)
  inference_bf16_b8 (GPU default) 8 photos per Predictor call, 800/1333, bf16 compute vs torch
                  autocast(bfloat16) inference; images/s and ms per image

Detectron2 column (inference_b1, forward_b1, train_step_b2): where Detectron2's source is found
(vendored at `../shared/vendor/detectron2`, or $MRCNN_JAX_DETECTRON2; `--no-detectron2` turns it
off), the run also builds Detectron2's `COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml` (or
the zoo config `--d2-config` names: `mask_rcnn_R_50_C4_3x.yaml`, `Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml`)
with seeded weights
calibrated on the same photos (`mrcnn_jax.testing.detectron2_reference`), saves them as a model-zoo
.pkl, and adds two sides to those cases' rounds (JAX, torch, JAX on Detectron2's weights,
Detectron2): `Predictor.from_detectron2(pkl, config_file=yaml)` (Detectron2's conventions: PIL
resize on the host, its mask paste, masks thresholded at 0.5 as Detectron2 returns them) against
Detectron2 as users run it, `DefaultPredictor(cfg)(image_bgr)`; for forward_b1, our jitted model
against Detectron2's backbone + proposal generator + RoI heads on its preprocessed image; for
train_step_b2, our jitted train step (Detectron2's losses) against Detectron2's model in training
mode with torch SGD, on the same two photos and their annotations. The
same-weights comparisons are JAX vs torchvision on torchvision's weights (`ratio`) and JAX vs
Detectron2 on Detectron2's (`ratio_jax_d2`); torchvision and Detectron2 have different weights. Without
the source the column is skipped with a message naming what is missing (rows: `d2_skipped`).

Each case runs JAX and torch interleaved (A B A B ...): one first call each (JAX compiles there),
optional warm-up pairs, then `--runs` timed pairs. A row gives the medians per side and the
median of the per-pair ratios jax / torch (< 1: JAX is faster), JAX's compile time (XLA's own
events during the first call: tracing + lowering + backend compile, from `jax.monitoring`; the
first call minus the steady-state median is kept as `jax_first_minus_median_s`) and torch's first
call. Peak memory is measured per side and case in a fresh subprocess
(`python -m mrcnn_jax.bench.cli --probe SIDE CASE --probe-dir DIR`, which never imports the other
side's framework): the process's peak RSS (VmHWM: imports, weights, compilation, a first and a
steady run) and, on a GPU, the device's peak (JAX `memory_stats()['peak_bytes_in_use']`,
`torch.cuda.max_memory_allocated`), which then fills `*_peak_memory_mb`.

Cores are shared: JAX's and torch's thread pools are both sized to the available cores (torch's
is set here). Numbers from a machine with other work running are noisy; every row records the
load average after it (`load_avg`). On a GPU, JAX is started without preallocation
(XLA_PYTHON_CLIENT_PREALLOCATE=false) so that both frameworks fit on one device.

Output: a header naming the machine, versions and thread counts, a markdown table, and with
`--json PATH` a list of rows {"name", "jax_median_s", "torch_median_s", "ratio", "runs",
"jax_compile_s", "torch_first_call_s", "jax_peak_memory_mb", "torch_peak_memory_mb", ...}; with
the Detectron2 column also "jax_d2_median_s", "d2_median_s", "ratio_jax_d2" (median over rounds
of jax_d2_s / d2_s), "jax_d2_compile_s", "d2_first_call_s", "jax_d2_peak_memory_mb",
"d2_peak_memory_mb", ..., or "d2_skipped" / "d2_error".
`--quick`: 320/512 sizing, 2 runs, smaller RoIAlign cases (a smoke run, not a measurement).
`--data DIR`: another COCO-style folder (annotations.json + images/) of photos, e.g. a copy of
coco128_seg on a machine without `../shared`. On a GPU, per-case device peaks are also recorded in
process (`torch_device_peak_mb`, reset per case; `jax_device_peak_so_far_mb`, XLA's peak since
the process began, which cannot be reset).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from mrcnn_jax.bench.cases import ALL_SIDES, CASES, D2_CASES, MICRO_CASES, MODEL_CASES, THROUGHPUT_CASES
from mrcnn_jax.bench.context import Context
from mrcnn_jax.bench.harness import run_case
from mrcnn_jax.bench.inputs import DATASET, Settings, padded_size, resized_size
from mrcnn_jax.bench.memory import probe_main, probe_rows
from mrcnn_jax.bench.report import (cores, device_label, format_header, format_outputs, format_table,
                                    load_avg, machine_info, write_json)

NO_TORCH = 'error: the benchmark compares against torchvision: pip install "mrcnn-jax[bench]"'


def _hide_gpu_from_tensorflow() -> None:
    tf = sys.modules.get('tensorflow')
    if tf is not None:
        try:
            tf.config.set_visible_devices([], 'GPU')
        except Exception:  # already initialized: nothing more to do
            pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='benchmark', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='cases: ' + ', '.join(CASES))
    p.add_argument('--quick', action='store_true', help='smoke run: 320/512 sizing, 2 runs, smaller micro cases')
    p.add_argument('--only', default='', help='comma-separated case names (or "model", "micro", "throughput"); '
                   'default: all, the throughput cases only on a GPU')
    p.add_argument('--runs', type=int, default=0, help='timed pairs per case (default 5, quick 2)')
    p.add_argument('--warmup', type=int, default=None, help='untimed pairs after the first calls (model cases)')
    p.add_argument('--json', default='', help='write the rows to this JSON file')
    p.add_argument('--memory', choices=('model', 'all', 'none'), default='model',
                   help='peak-memory probes (a subprocess per side and case): model cases, all, none')
    p.add_argument('--min-size', type=int, default=0)
    p.add_argument('--max-size', type=int, default=0)
    p.add_argument('--images', default='', help='comma-separated file names in coco128_seg (4 of one bucket)')
    p.add_argument('--synthetic', action='store_true', help='synthetic images even if ../shared/data exists')
    p.add_argument('--data', default='', help=f'COCO-style folder of the photos (default {DATASET})')
    p.add_argument('--throughput-batch', type=int, default=0,
                   help='images per step of train_1024_bf16 (default 16, quick 2)')
    p.add_argument('--micro-canvas', default='', help='HxW of the RoIAlign FPN canvas (default: the image class)')
    p.add_argument('--micro-rois', type=int, default=0, help='RoIs of both RoIAlign cases (default 1000 / 100)')
    p.add_argument('--d2-config', default='', help='the Detectron2 column\'s model-zoo config (default '
                   'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml; C4: ..._R_50_C4_3x.yaml, Cascade: '
                   'Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml)')
    p.add_argument('--no-detectron2', action='store_true',
                   help='leave out the Detectron2 column (inference_b1, forward_b1), which otherwise runs '
                   'where its source is found (../shared/vendor/detectron2 or $MRCNN_JAX_DETECTRON2)')
    p.add_argument('--probe', nargs=2, metavar=('SIDE', 'CASE'), help=argparse.SUPPRESS)
    p.add_argument('--probe-dir', default='', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_cases(only: str, gpu: bool = False) -> list[str]:
    """The cases `--only` names (groups: model, micro, throughput); by default all, the
    throughput cases only where there is a GPU."""
    if not only:
        return list(MODEL_CASES + MICRO_CASES + (THROUGHPUT_CASES if gpu else ()))
    names: list[str] = []
    for item in (x.strip() for x in only.split(',') if x.strip()):
        group = {'model': MODEL_CASES, 'micro': MICRO_CASES, 'throughput': THROUGHPUT_CASES}.get(item)
        if group:
            names += [n for n in group if n not in names]
        elif item in CASES:
            if item not in names:
                names.append(item)
        else:
            raise SystemExit(f'unknown case {item!r}; known: {", ".join(CASES)} (or model, micro, throughput)')
    return [n for n in CASES if n in names]   # canonical order: inference before training


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')   # JAX and torch share a GPU
    if args.probe:
        side, name = args.probe
        if side not in ALL_SIDES or name not in CASES:
            raise SystemExit(f'--probe SIDE CASE: SIDE in {ALL_SIDES}, CASE in {CASES}')
        return probe_main(side, name, args.probe_dir)

    try:
        import torch  # before tensorflow, should anything import it (see tests/conftest.py)
        import torchvision  # noqa: F401
    except ImportError:
        print(NO_TORCH, file=sys.stderr)
        return 2
    _hide_gpu_from_tensorflow()
    torch.set_num_threads(cores())
    names = resolve_cases(args.only, gpu=torch.cuda.is_available())
    settings = Settings.from_args(args)
    ctx = Context(settings)
    try:
        return _run(args, names, ctx)
    finally:
        ctx.close()


def detectron2_line(ctx: Context, names: list[str]) -> str:
    """The header's Detectron2 line: what runs, or why the column is skipped ('' when no case
    selected has the column)."""
    if not any(n in D2_CASES for n in names):
        return ''
    reason = ctx.d2_skip_reason
    if reason is not None:
        return (f'column skipped ({reason}); JAX and torchvision only. The Detectron2 column needs its '
                'source (../shared/vendor/detectron2, or $MRCNN_JAX_DETECTRON2) and its pip dependencies')
    import detectron2
    from mrcnn_jax.testing.detectron2_reference import detectron2_root
    return (f'{getattr(detectron2, "__version__", "?")} from {detectron2_root()} (no C++ extension), '
            f'{ctx.settings.d2_config}, on {ctx.device}, in {", ".join(n for n in names if n in D2_CASES)}')


def _run(args: argparse.Namespace, names: list[str], ctx: Context) -> int:
    settings = ctx.settings
    info = machine_info()
    info['detectron2'] = detectron2_line(ctx, names)
    info['detectron2_used'] = bool(info['detectron2']) and ctx.d2_skip_reason is None
    needs_images = any(n not in MICRO_CASES for n in names)
    source = ctx.samples_source if needs_images else 'none (micro-benchmarks only)'
    print(format_header(info, settings, source), flush=True)
    if needs_images:
        for x in ctx.samples:
            h, w = x.image.shape[:2]
            rh, rw = resized_size(h, w, settings.min_size, settings.max_size)
            print(f'  {x.name} (W x H): {w}x{h} -> {rw}x{rh}, padded {padded_size(rh, rw)[1]}x{padded_size(rh, rw)[0]}, '
                  f'{len(x.boxes)} instances', flush=True)
        t0 = time.perf_counter()
        ctx.tv_model
        print(f'torchvision model built and calibrated on these images in {time.perf_counter() - t0:.1f} s '
              f'(load {load_avg()})', flush=True)
    if info['detectron2_used']:
        t0 = time.perf_counter()
        try:
            ctx.d2_pkl
            print(f"Detectron2's model built, calibrated on these images and saved as a model-zoo .pkl in "
                  f'{time.perf_counter() - t0:.1f} s (load {load_avg()})', flush=True)
        except Exception:  # each Detectron2 case records the error; the rest goes on
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            print("Detectron2's model could not be built: its column fails in every case (JAX and "
                  'torchvision still run)', flush=True)
    label = device_label(info)
    rows: list[dict] = []

    def save() -> None:
        if args.json:
            write_json(args.json, rows)

    failed = False
    for name in names:
        print(f'\n## {name}  (load {load_avg()})', flush=True)
        try:
            row = run_case(name, ctx)
        except Exception as e:  # keep going: one broken case must not hide the others
            failed = True
            row = {'name': name, 'jax_median_s': None, 'torch_median_s': None, 'ratio': None, 'runs': 0,
                   'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc(),
                   'load_avg': load_avg()}
            print(row['traceback'], file=sys.stderr, flush=True)
        row['device'] = label
        if ctx.tv_build_s is not None and name not in MICRO_CASES:
            row['torch_model_build_s'] = ctx.tv_build_s
        if ctx.d2_build_s is not None and name in D2_CASES:
            row['d2_model_build_s'] = ctx.d2_build_s
        if row.get('d2_error'):
            failed = True
        rows.append(row)
        if row.get('jax_median_s') is not None:
            d2 = (f', jax on d2 weights {row["jax_d2_median_s"]:.4f} s, detectron2 {row["d2_median_s"]:.4f} s, '
                  f'ratio jax/d2 {row["ratio_jax_d2"]:.3f} (first calls {row["jax_d2_first_call_s"]:.2f} / '
                  f'{row["d2_first_call_s"]:.2f} s)' if row.get('d2_median_s') is not None else '')
            print(f'  jax {row["jax_median_s"]:.4f} s, torch {row["torch_median_s"]:.4f} s, ratio '
                  f'{row["ratio"]:.3f}, jax first call {row["jax_first_call_s"]:.2f} s, torch first call '
                  f'{row["torch_first_call_s"]:.2f} s{d2}{format_outputs(row)} '
                  f'load {row["load_avg"]}', flush=True)
        save()

    if probe_rows(ctx, rows, args.memory, save):
        failed = True

    print('\n' + format_table(rows), flush=True)
    print(f'\nratio = median over pairs of jax_s / torch_s (< 1: JAX faster); load average at end: {load_avg()}')
    if any(r.get('d2_median_s') is not None for r in rows):
        print("ratio jax/d2 = median over rounds of jax_s / detectron2_s, both on Detectron2's weights")
    if args.json:
        write_json(args.json, rows)
        print(f'wrote {args.json}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
