"""`mrcnn-jax data to-tfrecord | show` (also `python -m mrcnn_jax.data.cli ...`).

Wiring into the main CLI:
    data = subparsers.add_parser('data', help='datasets: convert, inspect')
    mrcnn_jax.data.cli.add_subcommands(data.add_subparsers(dest='data_command', required=True))
    ...
    args.func(args)          # every subcommand sets `func`; it returns an exit code
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mrcnn_jax.config import load_config


def _to_tfrecord(args) -> int:
    from mrcnn_jax.data import tfrecord
    from mrcnn_jax.data.validation import DataError
    try:
        result = tfrecord.convert(
            args.annotations, args.images, args.out, num_shards=args.shards, prefix=args.prefix,
            strict=args.strict, num_workers=args.workers,
            with_masks=False if args.no_masks else None,
            write_ground_truth=not args.no_ground_truth, progress=not args.quiet)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(result.format())
    prefix_path = result.metadata_path[:-len('.metadata.json')]
    print(f"use: data.source='tfrecord', data.<split>_tfrecords='{prefix_path}-*.tfrecord'")
    return 0


def _show(args) -> int:
    from mrcnn_jax.data import drawing, pipeline
    from mrcnn_jax.models.conventions import Conventions
    config = load_config(args.config, args.set)
    conventions = Conventions.from_config(config.model.conventions)
    os.makedirs(args.out, exist_ok=True)
    global_batch = args.batch_size or min(int(config.train.batch_size if args.split == 'train'
                                              else config.eval.batch_size), args.num)
    ds = pipeline.build_dataset(config, args.split, process_index=0, process_count=1,
                                seed=args.seed, batch_size=global_batch)
    written = 0
    for step, batch in enumerate(ds):
        for i in range(batch['images'].shape[0]):
            if written >= args.num:
                break
            image = drawing.draw_element(batch, i, ds.metadata, conventions)
            path = os.path.join(args.out, f'{args.split}_step{step:03d}_{i:02d}_id'
                                          f"{int(batch['image_id'][i])}.png")
            image.save(path)
            written += 1
        if written >= args.num:
            break
    print(f'wrote {written} images to {args.out}')
    return 0


def add_subcommands(subparsers) -> None:
    """Registers `to-tfrecord` and `show` on the `data` command's subparsers (module docstring)."""
    p = subparsers.add_parser(
        'to-tfrecord', help='COCO json + images → sharded TFRecords',
        description='Converts a COCO instances json and its image folder into sharded TFRecords '
                    '(+ metadata, record index and ground-truth json beside them).')
    p.add_argument('--annotations', required=True, help='COCO instances json')
    p.add_argument('--images', required=True, help='image folder (file_name is relative to it)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--shards', type=int, default=8)
    p.add_argument('--prefix', default=None, help='shard name prefix (default: json file stem)')
    p.add_argument('--strict', action='store_true',
                   help='fail on the first bad image or annotation instead of skipping it')
    p.add_argument('--workers', type=int, default=None, help='encoding processes (default: cores)')
    p.add_argument('--no-masks', action='store_true', help='do not store instance masks')
    p.add_argument('--no-ground-truth', action='store_true',
                   help='do not write <prefix>.annotations.json')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p.set_defaults(func=_to_tfrecord)

    s = subparsers.add_parser(
        'show', help='write PNGs of augmented batches with boxes and masks drawn',
        description='Runs the input pipeline of a config and draws what the model would see.')
    s.add_argument('--config', required=True, help='config file (Python, get_config())')
    s.add_argument('--out', required=True, help='output folder')
    s.add_argument('--num', type=int, default=8, help='images to write')
    s.add_argument('--split', default='train', choices=('train', 'val'))
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--batch-size', type=int, default=0, help='global batch (default: config)')
    s.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='config override, e.g. --set data.canvas=(512,512); repeatable')
    s.set_defaults(func=_show)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    parser = argparse.ArgumentParser(prog='mrcnn-jax data')
    add_subcommands(parser.add_subparsers(dest='data_command', required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
