"""COCO evaluation of a model on a split.

Images go through `Predictor.predict_iter`, the one batched-inference path (resized onto canvas
buckets, fixed-size batches per bucket sharded over the predictor's device mesh). Results stream
out image by image into the `CocoEvaluator`, which pastes masks and encodes RLEs in worker
threads; memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Callable

import ml_collections
import numpy as np

log = logging.getLogger(__name__)


def label_ids_for(cfg: ml_collections.ConfigDict, metadata: dict) -> list[int]:
    """Model class index -> COCO category id for a dataset's metadata."""
    if cfg.data.class_index == 'category_id':
        return list(range(cfg.model.num_classes))
    return [0] + [int(c) for c in metadata['category_ids']]


def evaluate(cfg: ml_collections.ConfigDict, predictor, *, split: str = 'val', max_images: int = 0,
             out_dir=None, backend: str | None = None, progress: bool = True, verbose: bool = True) -> dict:
    """COCO bbox (and segm for mask models, keypoints for keypoint models) evaluation of
    `predictor` (its batch size and mesh) on a split of `cfg.data`.

    Keypoints are scored (pycocotools' OKS, with the dataset's sigmas: `keypoints.oks_sigmas`)
    when the model has a keypoint head and the annotations carry keypoints; otherwise a keypoint
    model gets one line saying why not, and its box (and mask) AP as usual.

    Returns {'bbox': {...}, 'segm': {...}, 'keypoints': {...}, 'num_images': n, 'skipped': k,
    'seconds': s} (with 'keypoints_not_evaluated': reason, for a keypoint model whose keypoints
    were not scored); with out_dir, writes results.json (COCO results) and metrics.json there.
    """
    from tqdm import tqdm

    from mrcnn_jax.data import ground_truth
    from mrcnn_jax.evaluation import keypoints
    from mrcnn_jax.evaluation.coco_eval import CocoEvaluator

    coco_gt = ground_truth.coco_ground_truth(cfg, split)
    total = len(coco_gt.imgs)
    if total == 0:
        raise ValueError(f'the {split} split of {cfg.data.source} has no images: nothing to evaluate')
    if max_images:
        total = min(total, max_images)
    iou_types = ('bbox', 'segm') if cfg.model.mask_on else ('bbox',)
    kpt_oks_sigmas, not_evaluated = None, None
    if cfg.model.get('keypoint_on', False):
        not_evaluated = keypoints.ground_truth_problem(coco_gt, int(cfg.model.num_keypoints))
        if not_evaluated is None:
            keypoints.prepare_ground_truth(coco_gt)
            iou_types += ('keypoints',)
            kpt_oks_sigmas = keypoints.oks_sigmas(keypoints.keypoint_names(coco_gt),
                                                  cfg.data.get('keypoint_oks_sigmas', ()))
        else:
            where = ground_truth.ground_truth_path(cfg, split) or f'the {split} split'
            print(f'keypoint AP not computed: {not_evaluated} ({where}); '
                  + ('box and mask AP only' if cfg.model.mask_on else 'box AP only'), flush=True)
    skipped: list[tuple[Any, str]] = []

    def on_error(key, e):
        log.warning('skipping %s: %s', key, e)
        skipped.append((key, str(e)))
    items = ((i, im) for i, im, _ in ground_truth.eval_images(cfg, split))
    if max_images:
        items = (it for _, it in zip(range(max_images), items))
    t0 = time.time()
    # masks are pasted as the model's reference pastes them (conventions.mask_paste)
    evaluator = CocoEvaluator(coco_gt, iou_types, backend=backend or cfg.eval.backend, num_workers=2,
                              paste_rule=predictor.conventions.mask_paste,
                              kpt_oks_sigmas=kpt_oks_sigmas, verbose=verbose)
    with evaluator, tqdm(total=total, desc=f'eval {split}', unit='img', disable=not progress) as bar:
        offset = predictor.conventions.keypoint_offset
        for image_id, pred in predictor.predict_iter(items, on_error=on_error):
            if offset and 'keypoints' in pred:   # back to COCO's pixel indices (Detectron2's -0.5)
                pred = {**pred, 'keypoints': pred['keypoints'] - np.asarray([offset, offset, 0.0], np.float32)}
            evaluator.add(image_id, pred)
            bar.update(1)
        if not evaluator.image_ids:
            raise ValueError(f'no readable images in the {split} split ({len(skipped)} skipped)')
        metrics = evaluator.evaluate()
        if out_dir is not None:
            out = pathlib.Path(out_dir)
            evaluator.write_results(out / 'results.json')
    metrics = dict(metrics)
    metrics.update(num_images=len(evaluator.image_ids), skipped=len(skipped), seconds=time.time() - t0)
    if not_evaluated is not None:
        metrics['keypoints_not_evaluated'] = not_evaluated
    if skipped:
        log.warning('%d image(s) could not be read and were skipped', len(skipped))
    if out_dir is not None:
        (pathlib.Path(out_dir) / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics


def make_evaluate_fn(cfg: ml_collections.ConfigDict, mesh=None) -> Callable[[Any, int], dict]:
    """evaluate_fn(variables, step) for the training loop: COCO eval of the val split (one
    Predictor on `mesh`, compiled once, variables swapped in each time)."""
    from mrcnn_jax.data import pipeline
    from mrcnn_jax.predictor import Predictor

    meta = pipeline.build_dataset(cfg, 'val', process_index=0, process_count=1).metadata
    holder: dict[str, Any] = {}

    def evaluate_fn(variables, step):
        if 'predictor' not in holder:
            holder['predictor'] = Predictor(cfg, variables, label_ids=label_ids_for(cfg, meta), paste=False,
                                            batch_size=cfg.eval.batch_size, mesh=mesh)
        predictor = holder['predictor']
        predictor.variables = variables
        return evaluate(cfg, predictor, max_images=cfg.eval.max_images, verbose=False, progress=False)
    return evaluate_fn
