"""Input-pipeline throughput: the TFRecord writer's conversion rate and the training pipeline's
images/s from those TFRecords (issue 3, section 6).

    python scripts/benchmark_input.py [--data ../shared/data/coco128_seg] [--canvas 1024]
        [--batch 2] [--steps 100] [--workers N] [--source tfrecord|coco_json]

Defaults: coco128_seg → TFRecords in a temporary folder, then the 'train' split (flip, masks at
112×112, 100 instances max) on a 1024×1024 canvas (min_size 800, max_size 1024), batch 2.
Prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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
    start = time.perf_counter()
    ds = pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=0)
    for _ in range(args.warmup):
        next(ds)
    report['first_batches_seconds'] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(ds)
    seconds = time.perf_counter() - start
    report.update({
        'pipeline_source': args.source,
        'canvas': args.canvas, 'batch': args.batch, 'masks': not args.no_masks,
        'mask_size': int(c.data.mask_size), 'max_instances': int(c.data.max_instances),
        'timed_batches': args.steps,
        'pipeline_images_per_s': round(args.steps * args.batch / seconds, 1),
        'batch_megabytes': round(sum(v.nbytes for v in batch.values()) / 2**20, 1),
    })
    print(json.dumps(report))
    ds.close()
    if not args.out:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == '__main__':  # the guard matters: converter workers are spawned processes
    sys.exit(main())
