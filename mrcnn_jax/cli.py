"""`mrcnn-jax`: convert, train, eval, predict, export, data, benchmark, demo.

Configs are Python files returning a ConfigDict; any field can be overridden on the command line
with `--config.section.field=value` (e.g. `--config.train.steps=20`).

Compiled programs are kept in JAX's persistent compilation cache, so a second `predict`, `eval`
or `train` on the same model and image sizes skips XLA compilation: under
`$XDG_CACHE_HOME/mrcnn_jax/jax_cache` (default `~/.cache/mrcnn_jax/jax_cache`), or the folder in
`MRCNN_JAX_COMPILATION_CACHE`; `--no-compile-cache` or `MRCNN_JAX_COMPILATION_CACHE=0` turns it
off, and a `JAX_COMPILATION_CACHE_DIR` you set yourself is left as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
COMPILATION_CACHE_ENV = 'MRCNN_JAX_COMPILATION_CACHE'


def default_compilation_cache_dir() -> pathlib.Path:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return pathlib.Path(base) / 'mrcnn_jax' / 'jax_cache'


def enable_compilation_cache(disabled: bool = False) -> str | None:
    """Turn on JAX's persistent compilation cache (see the module docstring); returns its folder
    or None when off. Every program is kept, the small ones too (unless the user set
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS): for the tiny shapes model the resize, paste and
    postprocessing programs are 0.4 s of the 6 s that a predict spends compiling. The cache is
    capped at 4 GiB (least recently used entries go first; the cap also makes JAX lock entries,
    so processes sharing the folder never read a half-written one)."""
    setting = os.environ.get(COMPILATION_CACHE_ENV, '').strip()
    if disabled or setting.lower() in ('0', 'off', 'false', 'no'):
        return None
    import jax
    if jax.config.jax_compilation_cache_dir:         # the user's own JAX_COMPILATION_CACHE_DIR
        return jax.config.jax_compilation_cache_dir
    path = str(default_compilation_cache_dir()) if setting.lower() in ('', '1', 'on', 'true', 'yes') else setting
    jax.config.update('jax_compilation_cache_dir', path)
    if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:
        jax.config.update('jax_compilation_cache_max_size', 4 << 30)
    return path


def _split_overrides(argv):
    """Separate `--config.x=y` overrides (argparse cannot declare them) from the rest."""
    rest, overrides = [], []
    for a in argv:
        (overrides if a.startswith('--config.') else rest).append(a)
    return rest, overrides


def load_predictor(checkpoint, config_path=None, overrides=(), **kwargs):
    """A Predictor from a model directory, a training workdir, or a torchvision .pth file."""
    from mrcnn_jax.config import apply_overrides, load_config
    from mrcnn_jax.predictor import Predictor

    path = pathlib.Path(checkpoint)
    cfg = load_config(config_path, overrides) if config_path else None
    if path.is_file() and path.suffix in ('.pth', '.pt'):
        # The model section comes from the weights; data and eval from --config, then overrides.
        p = Predictor.from_torchvision(str(path))
        merged = p.config
        if cfg is not None:
            merged.data, merged.eval = cfg.data, cfg.eval
        apply_overrides(merged, overrides)
        return Predictor(merged, p.variables, label_ids=p.label_ids, class_names=p.class_names, **kwargs)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    if (path / 'model' / 'config.json').exists():
        path = path / 'model'
    if cfg is None and overrides:
        from mrcnn_jax.model_dir import config_from_json
        cfg = apply_overrides(config_from_json((path / 'config.json').read_text()), overrides)
    return Predictor.from_checkpoint(path, cfg, **kwargs)


def model_metadata(checkpoint) -> dict:
    """metadata.json of a model directory or training workdir ({} for a .pth or when absent)."""
    import json
    path = pathlib.Path(checkpoint)
    for d in (path / 'model', path):
        if (d / 'config.json').exists() and (d / 'metadata.json').exists():
            return json.loads((d / 'metadata.json').read_text())
    return {}


def _cmd_convert(args, overrides) -> int:
    from mrcnn_jax.model_dir import save_model_dir
    from mrcnn_jax.predictor import Predictor

    settings = dict(score_thresh=args.score_thresh, nms_thresh=args.nms_thresh,
                    detections_per_img=args.detections_per_img, min_size=args.min_size, max_size=args.max_size)
    if args.source == 'detectron2':
        if not args.config_file:
            print('error: --from detectron2 needs --config-file, the yaml config the checkpoint was trained '
                  'with', file=sys.stderr)
            return 2
        p = Predictor.from_detectron2(args.input, config_file=args.config_file, **settings)
        source = f'detectron2:{os.path.basename(args.input)} ({os.path.basename(args.config_file)})'
    else:
        if args.config_file:
            print('error: --config-file is for --from detectron2', file=sys.stderr)
            return 2
        defaults = dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=100, min_size=800, max_size=1333)
        p = Predictor.from_torchvision(args.input, **{k: defaults[k] if v is None else v for k, v in settings.items()})
        source = f'torchvision:{os.path.basename(args.input)}'
    meta = {'label_ids': [int(x) for x in p.label_ids], 'class_names': p.class_names,
            'label_space': p.label_space, 'source': source}
    import jax
    out = save_model_dir(args.output, p.config, jax.device_get(p.variables), meta)
    m = p.config.model
    kind = 'Keypoint R-CNN' if m.keypoint_on else 'Mask R-CNN' if m.mask_on else 'Faster R-CNN'
    if m.roi.heads == 'cascade':
        kind = f'Cascade {kind}'
    arch = f'X{m.backbone.depth}-{m.backbone.groups}x{m.backbone.width_per_group}d' if m.backbone.groups > 1 \
        else f'R{m.backbone.depth}'
    layout = 'FPN' if m.fpn.enabled else 'C4'
    print(f'converted {args.source} {kind} {arch}-{layout} ({m.num_classes} classes with the background; labels: '
          f'{p.label_space}) -> {out}')
    return 0


def _cmd_train(args, overrides) -> int:
    from mrcnn_jax.config import load_config
    from mrcnn_jax.training.loop import train

    cfg = load_config(args.config, overrides)
    train(cfg, args.workdir)
    return 0


def _cmd_eval(args, overrides) -> int:
    import json

    from mrcnn_jax.evaluation.inference import evaluate

    p = load_predictor(args.checkpoint, args.config, overrides, paste=False)
    cfg = p.config
    p.batch_size = args.batch_size or cfg.eval.batch_size
    if args.annotations or args.images:
        if not (args.annotations and args.images):
            print('--annotations and --images go together', file=sys.stderr)
            return 2
        cfg.data.source = 'coco_json'
        cfg.data.val_annotations = args.annotations
        cfg.data.val_images = args.images
        if np.array_equal(p.label_ids, np.arange(cfg.model.num_classes)):
            # The model's class index is the category id (torchvision's 91-way COCO head): the
            # dataset is read the same way, so its check of num_classes against the categories
            # agrees. (Results carry p.label_ids[label] either way.)
            cfg.data.class_index = 'category_id'
    out = pathlib.Path(args.out or (pathlib.Path(args.checkpoint) / 'eval'))
    try:
        metrics = evaluate(cfg, p, max_images=args.max_images, out_dir=out, backend=args.backend)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
    print(f'wrote {out / "results.json"} and {out / "metrics.json"}')
    return 0


def _expand_images(paths):
    out = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def _cmd_predict(args, overrides) -> int:
    import json


    from mrcnn_jax.visualize import draw_predictions, keypoint_skeleton, predictions_to_json

    files = _expand_images(args.images)
    if not files:
        print('error: no images given (or the folders hold none)', file=sys.stderr)
        return 1
    p = load_predictor(args.checkpoint, args.config, overrides, batch_size=args.batch_size)
    names = dict(zip((int(i) for i in p.label_ids), p.class_names))
    skeleton = keypoint_skeleton(p.config, model_metadata(args.checkpoint))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    originals = {}
    bad = []

    def items():
        from mrcnn_jax.data.images import load_image
        for f in files:
            try:
                originals[f] = load_image(str(f))
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
                bad.append((f, str(e)))
                print(f'skipping {f}: {e}', file=sys.stderr)
                continue
            yield f, originals[f]

    from tqdm import tqdm
    unusable = []
    n = 0
    for f, pred in tqdm(p.predict_iter(items(), on_error=lambda f, e: unusable.append((f, e))),
                        total=len(files), desc='predict', unit='img'):
        image = originals.pop(f)
        draw_predictions(image, pred, names, args.score_threshold,
                         keypoint_skeleton=skeleton).save(out / f'{f.stem}.png')
        record = {'image': str(f), 'height': int(image.shape[0]), 'width': int(image.shape[1]),
                  'instances': predictions_to_json(pred, names, args.score_threshold)}
        (out / f'{f.stem}.json').write_text(json.dumps(record))
        n += 1
    for f, e in unusable:
        originals.pop(f, None)
        print(f'skipping {f}: {e}', file=sys.stderr)
    skipped = len(bad) + len(unusable)
    print(f'wrote {n} overlay(s) and JSON file(s) to {out}' + (f'; skipped {skipped} unreadable file(s)' if skipped else ''))
    return 0 if n else 1


def _cmd_export(args, overrides) -> int:
    from mrcnn_jax.export import export_predictor

    p = load_predictor(args.checkpoint, args.config, overrides)
    canvas = tuple(args.canvas) if args.canvas else None
    out = export_predictor(p, args.out, batch_size=args.batch_size, canvas=canvas)
    print(f'exported to {out}')
    return 0


def _cmd_benchmark(args, overrides) -> int:
    from mrcnn_jax.bench.cli import main as benchmark_main
    return benchmark_main(args.rest)


def _cmd_demo(args, overrides) -> int:
    from mrcnn_jax import demo
    if args.workdir is None:
        args.workdir = 'demo_out' if args.task == 'shapes' else f'demo_{args.task}_out'
    return demo.main(args.workdir, overrides, task=args.task)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='mrcnn-jax', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_help = f'do not use the persistent compilation cache (also: {COMPILATION_CACHE_ENV}=0)'
    ap.add_argument('--no-compile-cache', dest='no_cache_first', action='store_true', help=cache_help)
    common = argparse.ArgumentParser(add_help=False)       # also accepted after the subcommand
    common.add_argument('--no-compile-cache', action='store_true', help=cache_help)
    sub = ap.add_subparsers(dest='command', required=True)

    c = sub.add_parser('convert', parents=[common],
                       help='convert torchvision or Detectron2 weights to a model directory')
    c.add_argument('--from', dest='source', default='torchvision', choices=['torchvision', 'detectron2'])
    c.add_argument('input', help='torchvision: .pth state_dict (maskrcnn_/fasterrcnn_resnet50_fpn, current or '
                                 'legacy keys); detectron2: model-zoo .pkl or training .pth')
    c.add_argument('output', help='output model directory')
    c.add_argument('--config-file', help='detectron2: the yaml config of the checkpoint (_BASE_ chains followed)')
    c.add_argument('--score-thresh', type=float, help='default: 0.05 (torchvision), the config\'s (detectron2)')
    c.add_argument('--nms-thresh', type=float, help='default: 0.5 / the config\'s')
    c.add_argument('--detections-per-img', type=int, help='default: 100 / the config\'s')
    c.add_argument('--min-size', type=int, help='test-time shortest side; default: 800 / the config\'s')
    c.add_argument('--max-size', type=int, help='default: 1333 / the config\'s')
    c.set_defaults(func=_cmd_convert)

    t = sub.add_parser('train', parents=[common], help='train (resumes from the workdir\'s latest checkpoint)')
    t.add_argument('--config', required=True)
    t.add_argument('--workdir', required=True)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser('eval', parents=[common], help='COCO evaluation of a checkpoint on a dataset')
    e.add_argument('--checkpoint', required=True, help='model directory, training workdir or .pth')
    e.add_argument('--config', help='config file (default: the checkpoint\'s own)')
    e.add_argument('--annotations', help='COCO instances json (default: the config\'s val split)')
    e.add_argument('--images', help='image folder of --annotations')
    e.add_argument('--out', help='where results.json and metrics.json go (default CHECKPOINT/eval)')
    e.add_argument('--max-images', type=int, default=0)
    e.add_argument('--batch-size', type=int, default=None)
    e.add_argument('--backend', choices=['pycocotools', 'faster_coco_eval'], default=None)
    e.set_defaults(func=_cmd_eval)

    p = sub.add_parser('predict', parents=[common], help='overlay PNG + instances JSON per image')
    p.add_argument('images', nargs='+', help='image files or folders')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--config')
    p.add_argument('--out', required=True)
    p.add_argument('--score-threshold', type=float, default=0.5)
    p.add_argument('--batch-size', type=int, default=1)
    p.set_defaults(func=_cmd_predict)

    x = sub.add_parser('export', parents=[common], help='serialize inference with jax.export (StableHLO)')
    x.add_argument('--checkpoint', required=True)
    x.add_argument('--config')
    x.add_argument('--out', required=True)
    x.add_argument('--batch-size', type=int, default=2)
    x.add_argument('--canvas', type=int, nargs=2, metavar=('H', 'W'))
    x.set_defaults(func=_cmd_export)

    d = sub.add_parser('data', help='datasets: to-tfrecord, show')
    from mrcnn_jax.data import cli as data_cli
    data_cli.add_subcommands(d.add_subparsers(dest='data_command', required=True))

    b = sub.add_parser('benchmark', help='JAX vs torchvision and Detectron2 timings (see mrcnn-jax benchmark --help)')
    b.add_argument('rest', nargs=argparse.REMAINDER)
    b.set_defaults(func=_cmd_benchmark)

    m = sub.add_parser('demo', parents=[common],
                       help='synthetic data: generate, train, evaluate, draw (shapes or keypoints)')
    m.add_argument('--workdir', default=None, help='default: demo_out (shapes), demo_keypoints_out (keypoints)')
    m.add_argument('--task', choices=['shapes', 'keypoints'], default='shapes',
                   help='shapes: Mask R-CNN on coloured shapes (make demo); keypoints: Keypoint '
                        'R-CNN on stick figures (make demo-keypoints)')
    m.set_defaults(func=_cmd_demo)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['benchmark']:
        # Its own parser takes every argument (argparse.REMAINDER would not take a leading --help).
        from mrcnn_jax.bench.cli import main as benchmark_main
        return benchmark_main(argv[1:])
    rest, overrides = _split_overrides(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    args = build_parser().parse_args(rest)
    if overrides and args.command not in ('train', 'eval', 'predict', 'export', 'demo'):
        print(f'--config.* overrides are not used by {args.command}', file=sys.stderr)
        return 2
    if args.command not in ('data', 'benchmark'):       # the benchmark measures compilation
        enable_compilation_cache(args.no_cache_first or args.no_compile_cache)
    if args.command == 'data':
        return args.func(args)
    return args.func(args, overrides)


if __name__ == '__main__':
    sys.exit(main())
