"""COCO evaluation of detections: results conversion, a streaming evaluator, COCOeval.

    evaluator = CocoEvaluator('instances_val2017.json', iou_types=('bbox', 'segm'), num_workers=4)
    for image_id, prediction in predictions:     # numpy dicts, as the Predictor returns them
        evaluator.add(image_id, prediction)       # pastes + RLE-encodes in a worker, keeps RLEs
    metrics = evaluator.evaluate()                # prints the COCO tables
    metrics['segm']['AP']
    evaluator.write_results('coco_instances_results.json')

A prediction for one image is a dict of numpy arrays, N detections, in original-image pixels:
  'boxes'      [N, 4] float32 xyxy
  'scores'     [N] float32
  'labels'     [N] int: COCO category ids, or contiguous ids mapped by `label_to_category_id`
  'masks'      [N, H, W] float32 probabilities in [0, 1] (or bool/uint8), pasted at the
               original size; or instead
  'mask_probs' [N, M, M] float32 per-box probabilities (M = 28), pasted here with 'boxes' by
               the model's paste rule (`paste_rule`: 'padded_resize' or 'pixel_centers', the
               conventions' `mask_paste`; `ops/paste.py`)
  'keypoints'  [N, K, 3] float32 (x, y, visibility)                    (for 'keypoints' only)
  'valid'      [N] bool, optional: rows to keep when the arrays are padded.

Only the compact COCO results (RLE strings, not masks) are kept, so memory grows with the number
of detections, not with image sizes.
"""

import collections
import concurrent.futures
import contextlib
import copy
import io
import json
import multiprocessing
import os
import pathlib
import warnings
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from mrcnn_jax.evaluation.rle import encode_rle, paste_masks_to_rle
from mrcnn_jax.ops.paste import DEFAULT_CHUNK_SIZE, check_rule

IOU_TYPES = ('bbox', 'segm', 'keypoints')
BACKENDS = ('pycocotools', 'faster_coco_eval')
# Names of COCOeval.stats, in its order.
DETECTION_STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                        'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
KEYPOINT_STAT_NAMES = ('AP', 'AP50', 'AP75', 'APm', 'APl', 'AR', 'AR50', 'AR75', 'ARm', 'ARl')
# The key of a COCO result entry that each iou type evaluates.
_RESULT_KEY = {'bbox': 'bbox', 'segm': 'segmentation', 'keypoints': 'keypoints'}

Backend = Literal['pycocotools', 'faster_coco_eval']


def stat_names(iou_type: str) -> tuple[str, ...]:
    """Names of the numbers COCOeval.summarize() computes for iou_type (12, or 10 for keypoints)."""
    return KEYPOINT_STAT_NAMES if iou_type == 'keypoints' else DETECTION_STAT_NAMES


def _check_iou_types(iou_types: Sequence[str]) -> tuple[str, ...]:
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f'iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}')
    return iou_types


def _map_labels(labels: np.ndarray, label_to_category_id: Any) -> np.ndarray:
    if label_to_category_id is None:
        return labels
    if isinstance(label_to_category_id, Mapping):
        try:
            return np.array([label_to_category_id[int(label)] for label in labels], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f'label {e.args[0]} has no entry in label_to_category_id') from None
    table = np.asarray(label_to_category_id, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(table)):
        raise IndexError(f'labels must lie in [0, {len(table)}) to index label_to_category_id, '
                         f'got {labels.min()}..{labels.max()}')
    return table[labels]


def prediction_to_coco_results(image_id: int, prediction: Mapping[str, Any],
                               iou_types: Sequence[str] = ('bbox', 'segm'), *,
                               label_to_category_id: Sequence[int] | Mapping[int, int] | None = None,
                               image_hw: tuple[int, int] | None = None, mask_threshold: float = 0.5,
                               chunk_size: int = DEFAULT_CHUNK_SIZE,
                               paste_rule: str = 'padded_resize') -> list[dict]:
    """One image's detections as COCO result entries, one merged dict per detection.

    Args:
      image_id: the COCO image id.
      prediction: dict of numpy arrays (see the module docstring): 'boxes' [N, 4] float32 xyxy,
        'scores' [N], 'labels' [N] int; with 'segm', 'masks' [N, H, W] or 'mask_probs' [N, M, M];
        with 'keypoints', 'keypoints' [N, K, 3]; optional 'valid' [N] bool marks rows to keep.
      iou_types: which fields to produce besides 'bbox' (always present): 'segm' adds
        'segmentation', 'keypoints' adds 'keypoints'.
      label_to_category_id: [num_labels] int array or dict mapping labels to COCO category ids;
        None when labels already are category ids.
      image_hw: (H, W) of the original image; required for 'mask_probs', checked against 'masks'.
      mask_threshold: a mask pixel is foreground when its probability is > mask_threshold by
        the torchvision paste rule (as torchvision's COCO evaluation), >= mask_threshold by the
        detectron2 rule (as Detectron2's); they differ only at exactly the threshold.
      chunk_size: instances pasted and encoded together (bounds temporary memory).
      paste_rule: 'padded_resize' or 'pixel_centers': how 'mask_probs' are pasted into the image
        (`ops.paste.paste_masks`), and the threshold comparison for 'mask_probs' and float
        'masks'. The model's `Conventions.mask_paste`.

    Returns:
      N dicts {'image_id': int, 'category_id': int, 'score': float, 'bbox': [x, y, w, h] floats,
      'segmentation': {'size': [H, W], 'counts': str} (with 'segm'),
      'keypoints': [x1, y1, v1, ..., xK, yK, vK] floats (with 'keypoints')}. Use
      `results_for_iou_type` before handing them to COCOeval (see there why).
    """
    iou_types = _check_iou_types(iou_types)
    boxes = np.asarray(prediction['boxes'], dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(prediction['scores'], dtype=np.float32).reshape(-1)
    labels = np.asarray(prediction['labels']).reshape(-1).astype(np.int64)
    num = boxes.shape[0]
    if scores.shape[0] != num or labels.shape[0] != num:
        raise ValueError(f'image {image_id}: boxes, scores and labels disagree on the number of '
                         f'detections: {boxes.shape}, {scores.shape}, {labels.shape}')
    keep = None
    if prediction.get('valid') is not None:
        keep = np.asarray(prediction['valid'], dtype=bool).reshape(-1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        num = boxes.shape[0]

    def per_detection(key: str, dtype=None) -> np.ndarray:
        array = np.asarray(prediction[key], dtype=dtype)
        if keep is not None:
            array = array[keep]
        if array.shape[0] != num:
            raise ValueError(f'image {image_id}: {key!r} has {array.shape[0]} rows for {num} detections')
        return array

    category_ids = _map_labels(labels, label_to_category_id)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # COCO boxes: XYWH
    image_id = int(image_id)
    results = [{'image_id': image_id, 'category_id': int(c), 'score': float(s),
                'bbox': [float(v) for v in b]}
               for c, s, b in zip(category_ids, scores, xywh)]

    if 'segm' in iou_types:
        if prediction.get('masks') is not None:
            masks = per_detection('masks')
            if masks.ndim == 4 and masks.shape[1] == 1:  # torchvision's [N, 1, H, W]
                masks = masks[:, 0]
            if masks.ndim != 3:
                raise ValueError(f"image {image_id}: 'masks' must be [N, H, W], got {masks.shape}")
            if image_hw is not None and tuple(masks.shape[1:]) != tuple(image_hw):
                raise ValueError(f"image {image_id}: 'masks' are {masks.shape[1:]} but the image is "
                                 f'{tuple(image_hw)}: masks must be pasted at the original size')
            rles = encode_rle(masks, threshold=mask_threshold, chunk_size=chunk_size,
                              paste_rule=paste_rule)
        elif prediction.get('mask_probs') is not None:
            if image_hw is None:
                raise ValueError(f"image {image_id}: 'mask_probs' need image_hw to be pasted")
            rles = paste_masks_to_rle(per_detection('mask_probs', np.float32), boxes, image_hw,
                                      threshold=mask_threshold, chunk_size=chunk_size,
                                      paste_rule=paste_rule)
        else:
            raise KeyError(f"image {image_id}: 'segm' evaluation needs 'masks' or 'mask_probs'")
        for result, rle in zip(results, rles):
            result['segmentation'] = rle

    if 'keypoints' in iou_types:
        if prediction.get('keypoints') is None:
            raise KeyError(f"image {image_id}: 'keypoints' evaluation needs 'keypoints'")
        # Coordinates are taken as given: the predictor owns the pixel convention (Detectron2
        # shifts its keypoints by -0.5 before writing them; torchvision does not).
        keypoints = per_detection('keypoints', np.float32).reshape(num, -1) if num else []
        for result, kps in zip(results, keypoints):
            result['keypoints'] = [float(v) for v in kps]
    return results


def results_for_iou_type(results: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict]:
    """New result dicts with only the fields COCOeval's `loadRes` should see for iou_type.

    Segm entries must not carry 'bbox': `COCO.loadRes` checks 'bbox' first and, when present,
    takes each detection's area from the box (w * h) instead of the mask. The area decides which
    area range (small / medium / large) an unmatched detection counts in, so APs/APm/APl would
    change. Keypoint entries likewise lose 'bbox' (loadRes then derives box and area from the
    keypoints, as for COCO keypoint results). The dicts are new because loadRes mutates them.

    Args:
      results: merged entries as `prediction_to_coco_results` makes them (or a results json).
      iou_type: 'bbox', 'segm' or 'keypoints'.

    Returns:
      dicts {'image_id', 'category_id', 'score', and 'bbox' | 'segmentation' | 'keypoints'}.
    """
    key = _RESULT_KEY[_check_iou_types(iou_type)[0]]
    missing = sum(key not in r for r in results)
    if missing:
        raise KeyError(f'{missing} of {len(results)} results have no {key!r} to evaluate {iou_type!r}')
    out = []
    for r in results:
        value = r[key]
        # Copied: loadRes and the evaluators may annotate what they are given.
        value = dict(value) if isinstance(value, Mapping) else list(value)
        out.append({'image_id': r['image_id'], 'category_id': r['category_id'],
                    'score': r['score'], key: value})
    return out


def _quiet(verbose: bool):
    # pycocotools prints its progress and tables with print().
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def load_coco_gt(coco_gt: Any, backend: Backend = 'pycocotools', verbose: bool = False) -> Any:
    """The ground truth as the backend's COCO object.

    Args:
      coco_gt: a path to an instances json, a dataset dict, or a COCO object (pycocotools' or
        faster-coco-eval's). An object of the other backend is converted through a deep copy of
        its dataset (evaluation annotates ground-truth dicts in place).
      backend: 'pycocotools' or 'faster_coco_eval'.
      verbose: let pycocotools print its loading messages.

    Returns:
      pycocotools.coco.COCO or faster_coco_eval.COCO.
    """
    if backend == 'pycocotools':
        from pycocotools.coco import COCO
    elif backend == 'faster_coco_eval':
        from faster_coco_eval import COCO
    else:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, os.PathLike)):
        if not pathlib.Path(coco_gt).is_file():
            raise FileNotFoundError(f'COCO annotations not found: {coco_gt}')
        with _quiet(verbose):
            return COCO(str(coco_gt))
    if isinstance(coco_gt, Mapping):
        dataset = coco_gt
    elif hasattr(coco_gt, 'dataset'):
        dataset = copy.deepcopy(coco_gt.dataset)
    else:
        raise TypeError(f'coco_gt must be a path, a dict or a COCO object, got {type(coco_gt)}')
    with _quiet(verbose):
        gt = COCO()
        gt.dataset = dict(dataset)
        gt.createIndex()
    return gt


def _empty_results(coco_gt: Any) -> Any:
    # COCO.loadRes([]) fails in pycocotools (it reads anns[0]); an index with no annotations
    # evaluates to AP 0 for every category that has ground truth.
    res = type(coco_gt)()
    res.dataset = {'images': list(coco_gt.dataset['images']),
                   'categories': copy.deepcopy(coco_gt.dataset.get('categories', [])),
                   'annotations': []}
    res.createIndex()
    return res


def _run_cocoeval(coco_gt: Any, dts: list[dict], iou_type: str, backend: Backend,
                  img_ids: Sequence[int] | None, kpt_oks_sigmas: Sequence[float] | None,
                  verbose: bool) -> np.ndarray:
    with _quiet(verbose):
        coco_dt = coco_gt.loadRes(dts) if dts else _empty_results(coco_gt)
        if backend == 'pycocotools':
            from pycocotools.cocoeval import COCOeval
            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
            if kpt_oks_sigmas is not None:
                coco_eval.params.kpt_oks_sigmas = np.asarray(kpt_oks_sigmas, dtype=np.float64)
        else:
            from faster_coco_eval import COCOeval_faster
            coco_eval = COCOeval_faster(
                coco_gt, coco_dt, iou_type, kpt_oks_sigmas=kpt_oks_sigmas,
                print_function=print if verbose else (lambda *args, **kwargs: None))
        if img_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats, dtype=np.float64)


def evaluate_coco(coco_gt: Any, results: Sequence[Mapping[str, Any]],
                  iou_types: Sequence[str] = ('bbox', 'segm'), *, backend: Backend = 'pycocotools',
                  img_ids: Sequence[int] | None = None,
                  kpt_oks_sigmas: Sequence[float] | None = None,
                  verbose: bool = True) -> dict[str, dict[str, float]]:
    """Runs COCOeval on COCO results for each iou type and prints the standard tables.

    Args:
      coco_gt: ground truth: path, dataset dict or COCO object (see `load_coco_gt`).
      results: COCO result entries (merged or not), e.g. a loaded results json; each iou type
        reads its own key ('bbox', 'segmentation', 'keypoints'). May be empty.
      iou_types: subset of ('bbox', 'segm', 'keypoints').
      backend: 'pycocotools' or 'faster_coco_eval' (C++, same numbers).
      img_ids: images to evaluate on (default: every image of the ground truth). Images listed
        without detections count as images with zero detections.
      kpt_oks_sigmas: [K] per-keypoint OKS sigmas; None for COCO's 17 person keypoints.
      verbose: print the tables (and the backend's progress).

    Returns:
      {iou_type: {stat name: float}}: the 12 numbers AP, AP50, AP75, APs, APm, APl, AR1, AR10,
      AR100, ARs, ARm, ARl (keypoints: the 10 numbers AP, AP50, AP75, APm, APl, AR, AR50, AR75,
      ARm, ARl), in [0, 1]; -1 where COCOeval has nothing to average (e.g. no small objects).
    """
    iou_types = _check_iou_types(iou_types)
    gt = load_coco_gt(coco_gt, backend, verbose)
    unknown = {r['category_id'] for r in results} - set(gt.getCatIds())
    if unknown:
        warnings.warn(f'results have category ids absent from the ground truth, which COCOeval '
                      f'ignores: {sorted(unknown)[:10]} (labels not mapped to category ids?)')
    metrics = {}
    for iou_type in iou_types:
        if verbose:
            print(f'IoU metric: {iou_type}')
        dts = results_for_iou_type(results, iou_type)
        stats = _run_cocoeval(gt, dts, iou_type, backend, img_ids, kpt_oks_sigmas, verbose)
        metrics[iou_type] = {name: float(v) for name, v in zip(stat_names(iou_type), stats)}
    return metrics


class CocoEvaluator:
    """Streams predictions image by image into COCO results, then runs COCOeval.

    `add` converts each image's prediction (mask pasting, thresholding, RLE encoding) in a pool of
    `num_workers` threads or processes and keeps only the compact results; at most `max_pending`
    images wait in the pool, so memory does not grow with the dataset. `evaluate` evaluates on
    the images added so far (images added with zero detections count).

    Attributes:
      coco_gt: the ground truth, as the backend's COCO object.
      iou_types: the iou types evaluated.
    """

    def __init__(self, coco_gt: Any, iou_types: Sequence[str] = ('bbox', 'segm'), *,
                 backend: Backend = 'pycocotools', num_workers: int = 0,
                 executor: Literal['thread', 'process'] = 'thread',
                 label_to_category_id: Sequence[int] | Mapping[int, int] | None = None,
                 mask_threshold: float = 0.5, paste_rule: str = 'padded_resize',
                 kpt_oks_sigmas: Sequence[float] | None = None,
                 max_pending: int | None = None, verbose: bool = True):
        """Args:
          coco_gt: ground truth: path to an instances json, dataset dict or COCO object.
          iou_types: subset of ('bbox', 'segm', 'keypoints').
          backend: 'pycocotools' or 'faster_coco_eval'.
          num_workers: 0 converts in `add` itself; > 0 uses a pool of that many workers.
          executor: 'thread' (numpy's einsum and RLE encoding run in parallel threads; the
            prediction arrays are read later, so do not modify them after `add`) or 'process'
            (spawned processes; predictions are pickled, which is cheap for 'mask_probs' and
            costly for full-image 'masks').
          label_to_category_id: maps prediction labels to COCO category ids ([num_labels] int
            array or dict); None when labels are category ids.
          mask_threshold: mask pixels with probability > mask_threshold are foreground (>= by
            the detectron2 paste rule).
          paste_rule: 'padded_resize' (default) or 'pixel_centers', the model's
            `Conventions.mask_paste`: how 'mask_probs' are pasted and thresholded in the
            workers (see `prediction_to_coco_results`), so that a Detectron2 model's masks are
            scored as Detectron2 pastes them.
          kpt_oks_sigmas: [K] OKS sigmas for keypoints other than COCO's 17.
          max_pending: images converted or queued at once (default 2 * num_workers).
          verbose: print the COCO tables.
        """
        if backend not in BACKENDS:
            raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
        if executor not in ('thread', 'process'):
            raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}")
        self.iou_types = _check_iou_types(iou_types)
        self.paste_rule = check_rule(paste_rule)
        self.backend = backend
        self.coco_gt = load_coco_gt(coco_gt, backend, verbose)
        self.num_workers = max(int(num_workers), 0)
        self.executor = executor
        self.max_pending = max_pending or 2 * max(self.num_workers, 1)
        self.kpt_oks_sigmas = kpt_oks_sigmas
        self.verbose = verbose
        self._convert_kwargs = dict(
            iou_types=self.iou_types,
            label_to_category_id=(dict(label_to_category_id) if isinstance(label_to_category_id, Mapping)
                                  else None if label_to_category_id is None
                                  else np.asarray(label_to_category_id, dtype=np.int64)),
            mask_threshold=mask_threshold, paste_rule=self.paste_rule)
        # image_id -> its results (None while its conversion is pending), in the order added.
        self._results: dict[int, list[dict] | None] = {}
        self._pending: collections.deque = collections.deque()
        self._pool: concurrent.futures.Executor | None = None

    def add(self, image_id: int, prediction: Mapping[str, Any]) -> None:
        """Queues one image's prediction for conversion to COCO results.

        Args:
          image_id: a COCO image id of the ground truth; each image at most once.
          prediction: dict of numpy arrays in original-image pixels (see the module docstring);
            zero detections is fine (all arrays with N = 0).
        """
        image_id = int(image_id)
        if image_id not in self.coco_gt.imgs:
            raise KeyError(f'image id {image_id} is not in the ground truth')
        if image_id in self._results:
            raise ValueError(f'image id {image_id} was already added')
        info = self.coco_gt.imgs[image_id]
        args = (image_id, dict(prediction))
        kwargs = dict(self._convert_kwargs, image_hw=(int(info['height']), int(info['width'])))
        if self.num_workers == 0:
            self._results[image_id] = prediction_to_coco_results(*args, **kwargs)
            return
        self._results[image_id] = None
        self._pending.append((image_id, self._get_pool().submit(prediction_to_coco_results, *args, **kwargs)))
        self._collect(self.max_pending)

    def _get_pool(self) -> concurrent.futures.Executor:
        if self._pool is None:
            if self.executor == 'thread':
                self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
            else:
                # spawn, not fork: forking a process that runs JAX's threads can deadlock.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.num_workers, mp_context=multiprocessing.get_context('spawn'))
        return self._pool

    def _collect(self, max_left: int) -> None:
        """Waits for the oldest conversions until at most max_left are pending."""
        while len(self._pending) > max_left:
            image_id, future = self._pending.popleft()
            try:
                self._results[image_id] = future.result()
            except BaseException:
                del self._results[image_id]  # so that it can be added again
                raise

    @property
    def results(self) -> list[dict]:
        """All COCO result entries so far (merged: 'bbox' and 'segmentation' / 'keypoints'), in
        the order the images were added; waits for pending conversions."""
        self._collect(0)
        return [r for image_results in self._results.values() for r in image_results]

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images added so far, in order."""
        return list(self._results)

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Runs COCOeval for each iou type on the images added so far, printing the tables.

        Returns:
          {iou_type: {stat name: float}} as `evaluate_coco`; zero detections give AP 0.0.
        """
        if not self._results:
            raise ValueError('no images were added to the evaluator: nothing to evaluate')
        results = self.results
        self.close()
        return evaluate_coco(self.coco_gt, results, self.iou_types, backend=self.backend,
                             img_ids=self.image_ids, kpt_oks_sigmas=self.kpt_oks_sigmas,
                             verbose=self.verbose)

    def write_results(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes the results json: a list of merged entries, one per detection.

        Entries carry 'bbox' alongside 'segmentation' (as Detectron2's results files do); drop it
        before evaluating segm with plain pycocotools, or use `evaluate_coco`, which does.

        Returns:
          the path written.
        """
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'w') as f:
            json.dump(self.results, f)
        return path

    def close(self) -> None:
        """Finishes pending conversions and shuts the worker pool down (re-created on `add`)."""
        self._collect(0)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> 'CocoEvaluator':
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
