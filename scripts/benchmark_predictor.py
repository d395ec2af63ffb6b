"""Predictor vs torchvision on one 800x1216-class photo with the same weights (issue 2, section 6).

    python scripts/benchmark_predictor.py [--runs 5] [--warmup 1] [--image NAME] [--json PATH]

torchvision's Mask R-CNN R50-FPN with seeded weights calibrated on the photo
(mrcnn_jax/testing/torchvision_reference.py: ~100 detections with spread scores) and
`Predictor.from_torchvision` of its state_dict, run on the same photo (a 640x427 COCO photo:
800x1201 at 800/1333, which torchvision pads to 800x1216 and the Predictor places on its 800x1344
bucket): image in, pasted masks out. The first call of each side (JAX compiles there), `--warmup`
untimed pairs, then `--runs` interleaved pairs (JAX, torch); medians and the median of the
per-pair ratios. Also prints the conversion time, XLA's compile time and whether the two
sides' detections agree. For the full comparison (batch 4, training, micro-benchmarks, memory)
see scripts/benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mrcnn_jax import benchmark as bm  # noqa: E402


def _agreement(ours: dict, ref: dict) -> str:
    import numpy as np
    n, m = len(ours['scores']), len(ref['scores'])
    if n != m or n == 0:
        return f'detections: ours {n}, torchvision {m}'
    labels = float(np.mean(ours['labels'] == ref['labels'].numpy()))
    score = float(np.abs(ours['scores'] - ref['scores'].numpy()).max())
    box = float(np.abs(ours['boxes'] - ref['boxes'].numpy()).max())
    a = ours['masks'] >= 0.5
    b = ref['masks'][:, 0].numpy() >= 0.5
    inter = np.logical_and(a, b).sum((1, 2))
    union = np.maximum(np.logical_or(a, b).sum((1, 2)), 1)
    return (f'detections: {n} both; same label in order {labels:.0%}; max |score diff| {score:.1e}; '
            f'max |box diff| {box:.1e} px; min mask IoU {float((inter / union).min()):.3f}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1, help='untimed pairs after the first calls')
    p.add_argument('--image', default='', help='file name in coco128_seg (default: the first 800x1216-class photo)')
    p.add_argument('--min-size', type=int, default=800)
    p.add_argument('--max-size', type=int, default=1333)
    p.add_argument('--json', default='')
    args = p.parse_args(argv)

    import torch  # before tensorflow, should anything import it
    torch.set_num_threads(bm._cores())
    from mrcnn_jax.predictor import Predictor
    from mrcnn_jax.testing.torchvision_reference import build_torchvision_maskrcnn, image_to_tensor

    settings = bm.Settings(min_size=args.min_size, max_size=args.max_size, runs=args.runs,
                           images=(args.image,) if args.image else ())
    samples, source = bm.select_samples(settings, n=1)
    image = samples[0].image
    h, w = image.shape[:2]
    rh, rw = bm.resized_size(h, w, args.min_size, args.max_size)
    info = bm.machine_info()
    print(bm.format_header(info, settings, f'{source}: {samples[0].name} (W x H) {w}x{h} -> {rw}x{rh}, '
                                           f'torchvision pads to {bm.padded_size(rh, rw)[1]}x{bm.padded_size(rh, rw)[0]}'),
          flush=True)

    t0 = time.perf_counter()
    model = build_torchvision_maskrcnn(seed=0, min_size=args.min_size, max_size=args.max_size,
                                       calibration_images=[image]).eval()
    build_s = time.perf_counter() - t0
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    predictor = Predictor.from_torchvision(state_dict, min_size=args.min_size, max_size=args.max_size)
    convert_s = time.perf_counter() - t0
    bucket = predictor.preprocess(image)[2]
    print(f'torchvision model built and calibrated in {build_s:.1f} s; converted in {convert_s:.1f} s; '
          f'Predictor bucket (W x H) {bucket[1]}x{bucket[0]}; load {bm.load_avg()}', flush=True)

    def jax_fn():
        return predictor(image)

    def torch_fn():
        with torch.inference_mode():
            out = model([image_to_tensor(image)])[0]
        return out

    firsts = {}
    with bm.CompileTimer() as compile_timer:
        timing = bm.interleave(jax_fn, torch_fn, args.runs, args.warmup,
                               on_first=lambda side, out: (firsts.__setitem__(side, out), compile_timer.stop()))
    row = {
        'name': 'predictor_b1', 'jax_median_s': timing.jax_median_s, 'torch_median_s': timing.torch_median_s,
        'ratio': timing.ratio, 'runs': len(timing.jax_runs), 'jax_compile_s': compile_timer.total_s,
        'jax_compile_breakdown_s': compile_timer.breakdown(), 'jax_first_call_s': timing.jax_first_s,
        'torch_first_call_s': timing.torch_first_s, 'jax_runs_s': timing.jax_runs,
        'torch_runs_s': timing.torch_runs, 'ratios': timing.ratios, 'convert_s': convert_s,
        'agreement': _agreement(firsts['jax'], firsts['torch']), 'image': samples[0].name,
        'load_avg': bm.load_avg(), 'device': bm.device_label(info),
    }
    print('\n' + bm.format_table([row]))
    print(f'\nJAX compile (XLA events: {", ".join(f"{k} {v:.1f} s" for k, v in row["jax_compile_breakdown_s"].items())}); '
          f'first calls: JAX {timing.jax_first_s:.1f} s, torch {timing.torch_first_s:.1f} s')
    print(f'per-run seconds: JAX {[round(x, 2) for x in timing.jax_runs]}, torch {[round(x, 2) for x in timing.torch_runs]}')
    print(row['agreement'])
    print(f'ratio = median over pairs of jax_s / torch_s; load average at end: {row["load_avg"]}')
    if args.json:
        bm.write_json(args.json, [row])
    return 0


if __name__ == '__main__':
    sys.exit(main())
