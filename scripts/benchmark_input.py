"""Input-pipeline throughput: the TFRecord writer's conversion rate and the training pipeline's
images/s from those TFRecords (issue 3, section 6).

    python scripts/benchmark_input.py [--data ../shared/data/coco128_seg] [--canvas 1024]
        [--batch 2] [--steps 100] [--workers N] [--source tfrecord|coco_json]
        [--deterministic true|false] [--num-parallel-calls N] [--compare-order PAIRS]

Defaults: coco128_seg → TFRecords in a temporary folder, then the 'train' split (flip, masks at
112×112, 100 instances max) on a 1024×1024 canvas (min_size 800, max_size 1024), batch 2, with
the config's element order (`data.deterministic`, default True). Prints one JSON line with the
figures.

--compare-order P: the cost of a deterministic element order. Converts once, then times the
pipeline P times with `data.deterministic=False` and P times with True, interleaved
(False, True, False, True, ...: a noisy machine drifts alike for both), each a fresh pipeline
with its own warmup; reports every run, the medians and their ratio (True / False), and the
median of the per-pair ratios (the steadier figure on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _time_pipeline(pipeline, c, args):
    """(seconds to the end of the warmup, timed images/s, the last batch) of a fresh pipeline."""
    start = time.perf_counter()
    ds = pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=0)
    for _ in range(args.warmup):
        next(ds)
    first = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(ds)
    seconds = time.perf_counter() - start
    ds.close()
    return first, round(args.steps * args.batch / seconds, 1), batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=str(REPO.parent / 'shared' / 'data' / 'coco128_seg'))
    p.add_argument('--canvas', type=int, default=1024)
    p.add_argument('--min-size', type=int, default=800)
    p.add_argument('--max-size', type=int, default=1024)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--steps', type=int, default=100, help='timed batches')
    p.add_argument('--warmup', type=int, default=10, help='untimed batches first')
    p.add_argument('--workers', type=int, default=None, help='converter processes (default: cores)')
    p.add_argument('--shards', type=int, default=4)
    p.add_argument('--source', default='tfrecord', choices=('tfrecord', 'coco_json'))
    p.add_argument('--no-masks', action='store_true', help='box-only pipeline (mask_on=False)')
    p.add_argument('--out', default='', help='TFRecord folder (default: a temporary one)')
    p.add_argument('--deterministic', choices=('true', 'false'), default=None,
                   help="data.deterministic (default: the config's)")
    p.add_argument('--num-parallel-calls', type=int, default=None,
                   help="data.num_parallel_calls (default: the config's; -1 AUTOTUNE)")
    p.add_argument('--compare-order', type=int, default=0, metavar='PAIRS',
                   help='time PAIRS interleaved runs with deterministic False and True')
    args = p.parse_args(argv)

    ann = os.path.join(args.data, 'annotations.json')
    images = os.path.join(args.data, 'images')
    if not os.path.exists(ann):
        print(f'no dataset at {args.data}', file=sys.stderr)
        return 2

    from mrcnn_jax import config as config_lib
    from mrcnn_jax.data import pipeline, tfrecord

    out_dir = args.out or tempfile.mkdtemp(prefix='mrcnn_bench_')
    result = tfrecord.convert(ann, images, out_dir, num_shards=args.shards, prefix='bench',
                              num_workers=args.workers, progress=False)
    report = {
        'cores': os.cpu_count(),
        'convert_images': result.num_images_in_json,
        'convert_seconds': round(result.seconds, 2),
        'convert_images_per_s': round(result.images_per_second, 1),
        'convert_workers': args.workers if args.workers is not None else os.cpu_count(),
    }

    c = config_lib.default_config()
    c.data.source = args.source
    c.data.train_tfrecords = os.path.join(out_dir, 'bench-*.tfrecord')
    c.data.train_annotations, c.data.train_images = ann, images
    c.data.canvas = (args.canvas, args.canvas)
    c.data.min_size = (args.min_size,)
    c.data.max_size = args.max_size
    c.model.mask_on = not args.no_masks
    c.model.num_classes = 81
    c.train.batch_size = args.batch
    if args.num_parallel_calls is not None:
        c.data.num_parallel_calls = args.num_parallel_calls
    report.update({
        'pipeline_source': args.source,
        'canvas': args.canvas, 'batch': args.batch, 'masks': not args.no_masks,
        'mask_size': int(c.data.mask_size), 'max_instances': int(c.data.max_instances),
        'num_parallel_calls': int(c.data.num_parallel_calls),
        'warmup_batches': args.warmup, 'timed_batches': args.steps,
    })
    report['load_average_before'] = [round(v, 2) for v in os.getloadavg()]
    if args.compare_order:
        runs = {'false': [], 'true': []}
        for _ in range(args.compare_order):
            for det in ('false', 'true'):
                c.data.deterministic = det == 'true'
                runs[det].append(_time_pipeline(pipeline, c, args)[1])
        before, after = statistics.median(runs['false']), statistics.median(runs['true'])
        pairs = [t / f for f, t in zip(runs['false'], runs['true'])]
        report.update({
            'images_per_s_deterministic_false': runs['false'],
            'images_per_s_deterministic_true': runs['true'],
            'median_deterministic_false': round(before, 1),
            'median_deterministic_true': round(after, 1),
            'ratio_true_over_false': round(after / before, 3),
            # each pair ran back to back: its ratio cancels slow drifts of a shared machine
            'pair_ratios': [round(r, 3) for r in pairs],
            'median_pair_ratio': round(statistics.median(pairs), 3),
        })
    else:
        if args.deterministic is not None:
            c.data.deterministic = args.deterministic == 'true'
        report['deterministic'] = bool(c.data.deterministic)
        first, rate, batch = _time_pipeline(pipeline, c, args)
        report.update({'first_batches_seconds': first, 'pipeline_images_per_s': rate,
                       'batch_megabytes': round(sum(v.nbytes for v in batch.values()) / 2**20, 1)})
    report['load_average_after'] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report))
    if not args.out:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == '__main__':  # the guard matters: converter workers are spawned processes
    sys.exit(main())
