"""Batched inference over a dataset, and COCO evaluation of a model on a split.

Images are preprocessed on the host exactly as `Predictor` does (torchvision's test-time
resize onto a canvas bucket), grouped by bucket into fixed-size batches (the last one padded)
and run as one compiled program per bucket, sharded over all local devices on a 'data' mesh
axis. Results stream out image by image into the `CocoEvaluator`, which pastes masks and
encodes RLEs in worker threads; memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)


class BatchedInference:
    """(key, uint8 image) items in, (key, prediction in original pixels) out, any order.

    Unreadable or malformed items are reported and skipped (`skipped` counts them).
    """

    def __init__(self, predictor, batch_size: int = 1, mesh: Mesh | None = None):
        self.predictor = predictor
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), ('data',))
        n = self.mesh.devices.size
        self.batch_size = max(int(batch_size), 1)
        if self.batch_size % n:
            self.batch_size = int(np.ceil(self.batch_size / n) * n)
            log.info('inference batch rounded up to %d (a multiple of %d devices)', self.batch_size, n)
        self._data = NamedSharding(self.mesh, P('data'))
        self._rep = NamedSharding(self.mesh, P())
        self._fn = jax.jit(predictor.model.apply, in_shardings=(self._rep, self._data, self._data),
                           out_shardings=self._rep)
        self.skipped: list[tuple[Any, str]] = []
        self.images_done = 0

    def _run(self, bucket, rows) -> Iterator[tuple[Any, dict]]:
        bs = self.batch_size
        canvas = np.zeros((bs, bucket[0], bucket[1], 3), np.float32)
        info = np.tile(np.asarray([bucket[0], bucket[1], bucket[0], bucket[1], 1, 1], np.float32), (bs, 1))
        for j, (_, x, inf) in enumerate(rows):
            canvas[j, :x.shape[0], :x.shape[1]] = x
            info[j] = inf
        variables = jax.device_put(self.predictor.variables, self._rep)
        raw = jax.device_get(self._fn(variables, jax.device_put(canvas, self._data),
                                      jax.device_put(info, self._data)))
        for j, (key, _, _) in enumerate(rows):
            yield key, self.predictor.postprocess({k: v[j] for k, v in raw.items()}, info[j])
            self.images_done += 1

    def __call__(self, items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, dict]]:
        pending: dict[tuple[int, int], list] = {}
        for key, image in items:
            try:
                x, info, bucket = self.predictor.preprocess(image)
            except (ValueError, TypeError) as e:
                log.warning('skipping %s: %s', key, e)
                self.skipped.append((key, str(e)))
                continue
            rows = pending.setdefault(bucket, [])
            rows.append((key, x, info))
            if len(rows) == self.batch_size:
                yield from self._run(bucket, rows)
                pending[bucket] = []
        for bucket, rows in pending.items():
            if rows:
                yield from self._run(bucket, rows)


def label_ids_for(cfg: ml_collections.ConfigDict, metadata: dict) -> list[int]:
    """Model class index -> COCO category id for a dataset's metadata."""
    if cfg.data.get('class_index', 'contiguous') == 'category_id':
        return list(range(cfg.model.num_classes))
    return [0] + [int(c) for c in metadata['category_ids']]


def evaluate(cfg: ml_collections.ConfigDict, predictor, *, split: str = 'val', max_images: int = 0,
             out_dir=None, batch_size: int | None = None, backend: str | None = None,
             progress: bool = True, verbose: bool = True, runner: BatchedInference | None = None) -> dict:
    """COCO bbox (and segm for mask models) evaluation of `predictor` on a split of `cfg.data`.

    Returns {'bbox': {...}, 'segm': {...}, 'num_images': n, 'skipped': k, 'seconds': s}; with
    out_dir, writes results.json (COCO results) and metrics.json there.
    """
    from tqdm import tqdm

    from mrcnn_jax.data import ground_truth
    from mrcnn_jax.evaluation.coco_eval import CocoEvaluator

    coco_gt = ground_truth.coco_ground_truth(cfg, split)
    total = len(coco_gt.imgs)
    if total == 0:
        raise ValueError(f'the {split} split of {cfg.data.source} has no images: nothing to evaluate')
    if max_images:
        total = min(total, max_images)
    iou_types = ('bbox', 'segm') if cfg.model.mask_on else ('bbox',)
    runner = runner or BatchedInference(predictor, batch_size or cfg.eval.batch_size)
    runner.skipped, runner.images_done = [], 0
    items = ((i, im) for i, im, _ in ground_truth.eval_images(cfg, split))
    if max_images:
        items = (it for _, it in zip(range(max_images), items))
    t0 = time.time()
    evaluator = CocoEvaluator(coco_gt, iou_types, backend=backend or cfg.eval.backend, num_workers=2,
                              verbose=verbose)
    with evaluator, tqdm(total=total, desc=f'eval {split}', unit='img', disable=not progress) as bar:
        for image_id, pred in runner(items):
            evaluator.add(image_id, pred)
            bar.update(1)
        if not evaluator.image_ids:
            raise ValueError(f'no readable images in the {split} split ({len(runner.skipped)} skipped)')
        metrics = evaluator.evaluate()
        if out_dir is not None:
            out = pathlib.Path(out_dir)
            evaluator.write_results(out / 'results.json')
    metrics = dict(metrics)
    metrics.update(num_images=runner.images_done, skipped=len(runner.skipped), seconds=time.time() - t0)
    if runner.skipped:
        log.warning('%d image(s) could not be read and were skipped', len(runner.skipped))
    if out_dir is not None:
        (pathlib.Path(out_dir) / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics


def make_evaluate_fn(cfg: ml_collections.ConfigDict, model, mesh=None) -> Callable[[Any, int], dict]:
    """evaluate_fn(variables, step) for the training loop: COCO eval of the val split (compiled once,
    variables swapped in each time)."""
    from mrcnn_jax.data import pipeline
    from mrcnn_jax.predictor import Predictor

    meta = pipeline.build_dataset(cfg, 'val', process_index=0, process_count=1).metadata
    holder: dict[str, Any] = {}

    def evaluate_fn(variables, step):
        if 'runner' not in holder:
            p = Predictor(cfg, variables, label_ids=label_ids_for(cfg, meta), paste=False)
            holder['runner'] = BatchedInference(p, cfg.eval.batch_size)
        runner = holder['runner']
        runner.predictor.variables = variables
        return evaluate(cfg, runner.predictor, max_images=cfg.eval.max_images, verbose=False,
                        progress=False, runner=runner)
    return evaluate_fn
