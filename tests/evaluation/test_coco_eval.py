"""COCO evaluation: results format, known APs, crowd handling, empty results, both backends."""

import copy
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip('pycocotools')
# pycocotools 2.0.x with numpy 2 warns on every decode.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from mrcnn_jax.evaluation.coco_eval import (CocoEvaluator, evaluate_coco,  # noqa: E402
                                            prediction_to_coco_results, results_for_iou_type)
from mrcnn_jax.ops.paste import paste_masks  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'data'
TINY_COCO = SHARED_DATA / 'coco_train2017_tiny' / 'annotations.json'


# ----------------------------------------------------------------------------------------------
# Building ground truth and predictions


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


def _uncompressed_rle(mask):
    """COCO's crowd format: run lengths (starting with background) of the column-major pixels."""
    flat = mask.flatten(order='F').astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {'size': list(mask.shape), 'counts': counts}


def _rect_mask(hw, x0, y0, x1, y1):
    mask = np.zeros(hw, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _dataset(images, anns, categories):
    for i, ann in enumerate(anns):
        ann.setdefault('id', i + 1)
        ann.setdefault('iscrowd', 0)
    return {'images': images, 'annotations': anns, 'categories': categories}


def _gt_from_masks(image_hw, instances, categories=({'id': 1, 'name': 'thing'},), image_id=1):
    """instances: (category_id, mask, iscrowd). bbox and area from the mask, as COCO's."""
    anns = []
    for category_id, mask, iscrowd in instances:
        segmentation = _uncompressed_rle(mask) if iscrowd else _rle(mask)
        anns.append({'image_id': image_id, 'category_id': category_id, 'iscrowd': iscrowd,
                     'segmentation': segmentation,
                     'bbox': [float(v) for v in mask_util.toBbox(_rle(mask))],
                     'area': float(mask.sum())})
    images = [{'id': image_id, 'height': image_hw[0], 'width': image_hw[1], 'file_name': 'x.png'}]
    return _dataset(images, anns, list(categories))


def _coco(dataset):
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    coco.createIndex()
    return coco


def _synthetic_dataset():
    """3 images, 3 categories with non-contiguous ids, polygons, RLEs and one crowd region."""
    rng = np.random.default_rng(0)
    categories = [{'id': 3, 'name': 'a'}, {'id': 7, 'name': 'b'}, {'id': 11, 'name': 'c'}]
    images, anns = [], []
    for image_id, (h, w) in zip([5, 9, 12], [(60, 80), (100, 70), (48, 48)]):
        images.append({'id': image_id, 'height': h, 'width': w, 'file_name': f'{image_id}.png'})
        for k in range(4):
            x0, y0 = rng.integers(0, w - 12), rng.integers(0, h - 12)
            x1, y1 = x0 + rng.integers(4, min(40, w - x0)), y0 + rng.integers(4, min(40, h - y0))
            category = categories[(image_id + k) % 3]['id']
            if k % 2:  # a polygon (a diamond inside the box)
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                poly = [[cx, y0, x1, cy, cx, y1, x0, cy]]
                rle = mask_util.merge(mask_util.frPyObjects(poly, h, w))
                anns.append({'image_id': image_id, 'category_id': category, 'segmentation': poly,
                             'bbox': list(mask_util.toBbox(rle)), 'area': float(mask_util.area(rle))})
            else:  # an RLE
                mask = _rect_mask((h, w), x0, y0, x1, y1)
                anns.append({'image_id': image_id, 'category_id': category, 'segmentation': _rle(mask),
                             'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                             'area': float(mask.sum())})
    crowd = _rect_mask((60, 80), 50, 30, 80, 60)
    anns.append({'image_id': 5, 'category_id': 3, 'iscrowd': 1, 'segmentation': _uncompressed_rle(crowd),
                 'bbox': [50.0, 30.0, 30.0, 30.0], 'area': float(crowd.sum())})
    return _dataset(images, anns, categories)


def _gt_predictions(coco, with_crowd_detections=False, mask_dtype=np.float32):
    """Each non-crowd ground truth as a detection (box xyxy, mask from its segmentation); with
    with_crowd_detections, each crowd region too, ranked first (a false positive there would
    lower the AP)."""
    predictions = {}
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if with_crowd_detections or not a['iscrowd']]
        anns.sort(key=lambda a: -a['iscrowd'])
        info = coco.imgs[image_id]
        xywh = np.array([a['bbox'] for a in anns], np.float32).reshape(-1, 4)
        masks = np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, info['height'], info['width']))
        predictions[image_id] = {
            'boxes': np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            'scores': np.linspace(1.0, 0.5, len(anns), dtype=np.float32),
            'labels': np.array([a['category_id'] for a in anns], np.int64),
            'masks': masks.astype(mask_dtype),
        }
    return predictions


def _evaluate(coco, predictions, iou_types=('bbox', 'segm'), **kwargs):
    evaluator = CocoEvaluator(coco, iou_types, verbose=False, **kwargs)
    for image_id, prediction in predictions.items():
        evaluator.add(image_id, prediction)
    return evaluator.evaluate()


def _noisy_predictions(coco, seed):
    """Jittered boxes, shifted masks, shuffled scores, dropped and false detections."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for image_id, p in _gt_predictions(coco).items():
        n = len(p['scores'])
        h, w = p['masks'].shape[1:]
        keep = rng.random(n) > 0.15
        boxes = p['boxes'] + rng.normal(0, 1.5, p['boxes'].shape).astype(np.float32)
        masks = p['masks'].copy()
        for i in range(n):
            masks[i] = np.roll(masks[i], tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
        fp = rng.integers(0, 3)
        fp_xy = rng.uniform(0, min(h, w) / 2, (fp, 2)).astype(np.float32)
        fp_boxes = np.concatenate([fp_xy, fp_xy + rng.uniform(5, 30, (fp, 2)).astype(np.float32)], axis=1)
        fp_masks = paste_masks(np.ones((fp, 28, 28), np.float32), fp_boxes, (h, w))
        predictions[image_id] = {
            'boxes': np.concatenate([boxes[keep], fp_boxes]),
            'scores': rng.random(keep.sum() + fp).astype(np.float32),
            'labels': np.concatenate([p['labels'][keep], rng.choice(coco.getCatIds(), fp)]),
            'masks': np.concatenate([masks[keep], fp_masks]),
        }
    return predictions


# ----------------------------------------------------------------------------------------------
# Results format


def test_result_entries_format():
    prediction = {
        'boxes': np.array([[10.5, 20.0, 30.5, 60.0], [0.0, 0.0, 5.0, 5.0]], np.float32),
        'scores': np.array([0.9, 0.3], np.float32),
        'labels': np.array([1, 0]),
        'masks': np.stack([_rect_mask((64, 48), 10, 20, 31, 61), np.zeros((64, 48))]).astype(np.float32) * 0.8,
        'keypoints': np.arange(2 * 17 * 3, dtype=np.float32).reshape(2, 17, 3),
    }
    results = prediction_to_coco_results(42, prediction, ('bbox', 'segm', 'keypoints'),
                                         label_to_category_id=[7, 9], image_hw=(64, 48))
    first = results[0]
    assert set(first) == {'image_id', 'category_id', 'score', 'bbox', 'segmentation', 'keypoints'}
    assert first['image_id'] == 42 and first['category_id'] == 9 and results[1]['category_id'] == 7
    assert first['bbox'] == [10.5, 20.0, 20.0, 40.0]  # XYWH
    assert isinstance(first['segmentation']['counts'], str) and first['segmentation']['size'] == [64, 48]
    assert mask_util.area(first['segmentation']) == 21 * 41
    assert len(first['keypoints']) == 51 and first['keypoints'][:3] == [0.0, 1.0, 2.0]
    json.dumps(results)  # JSON-ready
    # Segm entries handed to COCOeval carry no 'bbox': loadRes would take the area from the box.
    segm = results_for_iou_type(results, 'segm')
    assert set(segm[0]) == {'image_id', 'category_id', 'score', 'segmentation'}
    assert set(results_for_iou_type(results, 'keypoints')[0]) == {'image_id', 'category_id', 'score', 'keypoints'}
    assert 'bbox' in results[0]  # the originals are untouched
    # A mapping dict, padded rows with a valid mask, and masks pasted lazily from 28 x 28 probabilities.
    probs = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    padded = {'boxes': np.concatenate([prediction['boxes'], np.zeros((1, 4), np.float32)]),
              'scores': np.array([0.9, 0.3, 0.0], np.float32), 'labels': np.array([1, 0, 0]),
              'mask_probs': probs, 'valid': np.array([True, True, False])}
    lazy = prediction_to_coco_results(42, padded, ('bbox', 'segm'), label_to_category_id={0: 7, 1: 9},
                                      image_hw=(64, 48))
    assert len(lazy) == 2 and [r['category_id'] for r in lazy] == [9, 7]
    pasted = paste_masks(probs[:2], padded['boxes'][:2], (64, 48)) > 0.5
    assert [r['segmentation'] for r in lazy] == [_rle(m) for m in pasted]


# ----------------------------------------------------------------------------------------------
# Known APs


def test_ground_truth_as_predictions_gives_ap_1_synthetic():
    dataset = _synthetic_dataset()
    coco = _coco(dataset)
    metrics = _evaluate(coco, _gt_predictions(coco))
    for iou_type in ('bbox', 'segm'):
        for name in ('AP', 'AP50', 'AP75', 'AR10', 'AR100'):  # not AR1: 2 objects of a class in one image
            assert metrics[iou_type][name] == pytest.approx(1.0, abs=1e-12), (iou_type, name)
    # Also with contiguous labels 0..2 and a mapping to the category ids 3, 7, 11.
    contiguous = {i: dict(p, labels=np.searchsorted([3, 7, 11], p['labels'])) for i, p in _gt_predictions(coco).items()}
    assert _evaluate(coco, contiguous, label_to_category_id=[3, 7, 11]) == metrics


def test_ground_truth_as_predictions_gives_ap_1_tiny_coco():
    if not TINY_COCO.exists():
        pytest.skip(f'shared data not found at {TINY_COCO}')
    coco = COCO(str(TINY_COCO))
    assert any(a['iscrowd'] for a in coco.anns.values())
    # The crowd region is predicted too, with the top score: a detection on a crowd region is
    # ignored, not a false positive.
    predictions = _gt_predictions(coco, with_crowd_detections=True, mask_dtype=np.uint8)
    metrics = _evaluate(coco, predictions, backend='pycocotools')
    for iou_type in ('bbox', 'segm'):
        for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100'):
            assert metrics[iou_type][name] == pytest.approx(1.0, abs=1e-12), (iou_type, name)
    # Control: without the crowd annotation, the same detection is a top-ranked false positive.
    crowd_free = copy.deepcopy(coco.dataset)
    crowd_free['annotations'] = [a for a in crowd_free['annotations'] if not a['iscrowd']]
    metrics = _evaluate(_coco(crowd_free), predictions, ('segm',))
    assert metrics['segm']['AP'] < 0.999


def _two_boxes_case():
    """2 GTs, 3 detections of one category, in a 40 x 60 image (x, y, w, h):

      GT A = (0, 0, 10, 10), GT B = (20, 0, 10, 25) (area 250).
      d1 score 0.9 = A exactly                  IoU 1.0  -> TP at every threshold
      d2 score 0.8 = (40, 30, 10, 8)            IoU 0    -> FP
      d3 score 0.7 = (20, 0, 10, 17), inside B  IoU 170 / 250 = 0.68 -> TP for t <= 0.65, FP for t >= 0.70

    COCO AP samples the interpolated precision (max precision at recall >= r) at 101 recalls
    r = 0, 0.01, ..., 1:
      t in {.50, .55, .60, .65}: TP FP TP -> (recall, precision) (.5, 1), (.5, .5), (1, 2/3):
        r <= .5 (51 points) -> 1, r > .5 (50 points) -> 2/3:  AP_t = (51 + 100/3) / 101 = 253/303
      t in {.70, ..., .95} (6): TP FP FP -> recall stays .5: AP_t = 51/101
      AP50 = 253/303, AP75 = 51/101, AP = (4 * 253/303 + 6 * 153/303) / 10 = 193/303.
      AR100 = (4 * 1 + 6 * 0.5) / 10 = 0.7; AR1 (d1 only) = 0.5. All areas < 32^2: APs = AP.
    Boxes and masks are the same pixel rectangles, so bbox and segm give the same numbers.
    """
    hw = (40, 60)
    gt = _gt_from_masks(hw, [(1, _rect_mask(hw, 0, 0, 10, 10), 0), (1, _rect_mask(hw, 20, 0, 30, 25), 0)])
    boxes = np.array([[0, 0, 10, 10], [40, 30, 50, 38], [20, 0, 30, 17]], np.float32)
    prediction = {'boxes': boxes, 'scores': np.array([0.9, 0.8, 0.7], np.float32),
                  'labels': np.array([1, 1, 1]),
                  'masks': np.stack([_rect_mask(hw, *map(int, b)) for b in boxes]).astype(np.float32)}
    return gt, prediction


@pytest.mark.parametrize('backend', ['pycocotools', 'faster_coco_eval'])
def test_hand_made_case_has_known_ap(backend):
    if backend == 'faster_coco_eval':
        pytest.importorskip('faster_coco_eval')
    gt, prediction = _two_boxes_case()
    metrics = _evaluate(_coco(gt), {1: prediction}, backend=backend)
    for iou_type in ('bbox', 'segm'):
        m = metrics[iou_type]
        assert m['AP50'] == pytest.approx(253 / 303, abs=1e-12)
        assert m['AP75'] == pytest.approx(51 / 101, abs=1e-12)
        assert m['AP'] == pytest.approx(193 / 303, abs=1e-12)
        assert m['APs'] == pytest.approx(193 / 303, abs=1e-12)
        assert m['APm'] == -1 and m['APl'] == -1  # no medium or large objects
        assert m['AR1'] == pytest.approx(0.5) and m['AR100'] == pytest.approx(0.7)


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_detection_on_crowd_region_is_ignored(iou_type):
    """GT A = (0, 0, 10, 10) and a crowd region (30, 30)-(60, 60) of the same category. d1 = A
    (score 0.9), d2 = (35, 35)-(50, 50) inside the crowd region with the higher score 0.95.

    COCO matches d2 to the crowd region (crowd IoU = intersection / detection area = 1) and
    ignores it: AP = 1. Were the region an ordinary object, d2 would be a FP ranked first (IoU
    225 / 900 = 0.25) and the region a missed object: precision 1/2 at recall 1/2, AP = 0.5 *
    51/101. Without the region at all, d2 is a FP ranked first and AP = 0.5.
    """
    hw = (60, 60)
    a, crowd = _rect_mask(hw, 0, 0, 10, 10), _rect_mask(hw, 30, 30, 60, 60)
    boxes = np.array([[0, 0, 10, 10], [35, 35, 50, 50]], np.float32)
    prediction = {'boxes': boxes, 'scores': np.array([0.9, 0.95], np.float32), 'labels': np.array([1, 1]),
                  'masks': np.stack([a, _rect_mask(hw, 35, 35, 50, 50)]).astype(np.float32)}

    def ap(instances):
        return _evaluate(_coco(_gt_from_masks(hw, instances)), {1: prediction}, (iou_type,))[iou_type]

    with_crowd = ap([(1, a, 0), (1, crowd, 1)])
    assert with_crowd['AP'] == pytest.approx(1.0) and with_crowd['AR100'] == pytest.approx(1.0)
    assert ap([(1, a, 0), (1, crowd, 0)])['AP'] == pytest.approx(0.5 * 51 / 101)
    assert ap([(1, a, 0)])['AP'] == pytest.approx(0.5)


@pytest.mark.parametrize('backend', ['pycocotools', 'faster_coco_eval'])
def test_zero_detections_give_ap_0(backend):
    if backend == 'faster_coco_eval':
        pytest.importorskip('faster_coco_eval')
    coco = _coco(_synthetic_dataset())
    evaluator = CocoEvaluator(coco, ('bbox', 'segm'), backend=backend, verbose=False)
    for image_id in coco.getImgIds():
        h, w = coco.imgs[image_id]['height'], coco.imgs[image_id]['width']
        evaluator.add(image_id, {'boxes': np.zeros((0, 4), np.float32), 'scores': np.zeros(0, np.float32),
                                 'labels': np.zeros(0, np.int64), 'masks': np.zeros((0, h, w), np.float32)})
    metrics = evaluator.evaluate()
    for iou_type in ('bbox', 'segm'):
        assert metrics[iou_type]['AP'] == 0.0 and metrics[iou_type]['AR100'] == 0.0
    assert evaluate_coco(coco, [], ('bbox',), backend=backend, verbose=False)['bbox']['AP'] == 0.0
    with pytest.raises(ValueError, match='no images'):
        CocoEvaluator(coco, verbose=False).evaluate()


# ----------------------------------------------------------------------------------------------
# Backends, workers, files


def test_pycocotools_and_faster_coco_eval_agree():
    pytest.importorskip('faster_coco_eval')
    cases = [(_coco(_synthetic_dataset()), 0)]
    if TINY_COCO.exists():
        cases.append((COCO(str(TINY_COCO)), 1))
    for coco, seed in cases:
        predictions = _noisy_predictions(coco, seed)
        a = _evaluate(coco, predictions, backend='pycocotools')
        b = _evaluate(coco, predictions, backend='faster_coco_eval')
        assert 0.1 < a['segm']['AP'] < 0.95 and 0.1 < a['bbox']['AP'] < 0.95  # a non-trivial case
        for iou_type in ('bbox', 'segm'):
            np.testing.assert_allclose(list(b[iou_type].values()), list(a[iou_type].values()), rtol=0, atol=1e-12)


@pytest.mark.parametrize('executor', ['thread', 'process'])
def test_workers_give_the_same_results(executor):
    coco = _coco(_synthetic_dataset())
    rng = np.random.default_rng(0)
    predictions = {}
    for image_id, p in _noisy_predictions(coco, 2).items():
        n = len(p['scores'])
        predictions[image_id] = {'boxes': p['boxes'], 'scores': p['scores'], 'labels': p['labels'],
                                 'mask_probs': rng.random((n, 28, 28), dtype=np.float32)}
    serial = CocoEvaluator(coco, verbose=False)
    parallel = CocoEvaluator(coco, verbose=False, num_workers=2, executor=executor, max_pending=1)
    for evaluator in (serial, parallel):
        for image_id in sorted(predictions, reverse=True):
            evaluator.add(image_id, predictions[image_id])
    assert parallel.results == serial.results and parallel.image_ids == serial.image_ids
    assert parallel.evaluate() == serial.evaluate()


def test_write_results_round_trip(tmp_path):
    coco = _coco(_synthetic_dataset())
    evaluator = CocoEvaluator(coco, verbose=False)
    for image_id, prediction in _noisy_predictions(coco, 3).items():
        evaluator.add(image_id, prediction)
    metrics = evaluator.evaluate()
    path = evaluator.write_results(tmp_path / 'out' / 'results.json')
    loaded = json.loads(path.read_text())
    assert loaded == evaluator.results
    assert evaluate_coco(coco, loaded, ('bbox', 'segm'), verbose=False) == metrics


def test_add_rejects_unknown_and_repeated_images():
    coco = _coco(_synthetic_dataset())
    evaluator = CocoEvaluator(coco, ('bbox',), verbose=False)
    empty = {'boxes': np.zeros((0, 4)), 'scores': np.zeros(0), 'labels': np.zeros(0, int)}
    with pytest.raises(KeyError):
        evaluator.add(1234, empty)
    evaluator.add(5, empty)
    with pytest.raises(ValueError):
        evaluator.add(5, empty)


def test_prints_the_standard_table(capsys):
    gt, prediction = _two_boxes_case()
    evaluator = CocoEvaluator(_coco(gt), ('bbox',))
    evaluator.add(1, prediction)
    evaluator.evaluate()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(' Average')]
    assert len(lines) == 12
    assert lines[1].endswith(f'= {253 / 303:0.3f}')


# ----------------------------------------------------------------------------------------------
# Keypoints


def _keypoint_dataset():
    """One 100 x 120 image, 2 people with the 17 COCO keypoints (some not labelled)."""
    rng = np.random.default_rng(0)
    anns = []
    for i, (x0, y0) in enumerate([(10, 10), (60, 30)]):
        xy = rng.uniform(0, 40, (17, 2)) + [x0, y0]
        v = np.where(rng.random(17) < 0.2, 0, 2)
        kps = np.concatenate([xy * (v[:, None] > 0), v[:, None]], axis=1)
        anns.append({'id': i + 1, 'image_id': 1, 'category_id': 1, 'iscrowd': 0,
                     'keypoints': kps.flatten().tolist(), 'num_keypoints': int((v > 0).sum()),
                     'bbox': [x0, y0, 40.0, 40.0], 'area': 1600.0,
                     'segmentation': [[x0, y0, x0 + 40, y0, x0 + 40, y0 + 40, x0, y0 + 40]]})
    return {'images': [{'id': 1, 'height': 100, 'width': 120, 'file_name': 'p.png'}], 'annotations': anns,
            'categories': [{'id': 1, 'name': 'person', 'keypoints': [str(k) for k in range(17)],
                            'skeleton': []}]}


@pytest.mark.parametrize('backend', ['pycocotools', 'faster_coco_eval'])
def test_keypoints_round_trip(backend, tmp_path):
    if backend == 'faster_coco_eval':
        pytest.importorskip('faster_coco_eval')
    coco = _coco(_keypoint_dataset())
    anns = coco.loadAnns(coco.getAnnIds())
    keypoints = np.array([a['keypoints'] for a in anns], np.float32).reshape(2, 17, 3)
    xywh = np.array([a['bbox'] for a in anns], np.float32)
    prediction = {'boxes': np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                  'scores': np.array([0.9, 0.8], np.float32), 'labels': np.array([1, 1]),
                  'keypoints': keypoints}
    evaluator = CocoEvaluator(coco, ('bbox', 'keypoints'), backend=backend, verbose=False)
    evaluator.add(1, prediction)
    metrics = evaluator.evaluate()
    assert set(metrics['keypoints']) == {'AP', 'AP50', 'AP75', 'APm', 'APl', 'AR', 'AR50', 'AR75', 'ARm', 'ARl'}
    assert metrics['keypoints']['AP'] == pytest.approx(1.0) and metrics['bbox']['AP'] == pytest.approx(1.0)
    assert evaluator.results[0]['keypoints'] == [float(v) for v in keypoints[0].flatten()]
    # Noisy keypoints: a value below 1, the same after a trip through the results json.
    noise = np.random.default_rng(1).normal(0, 2, keypoints.shape).astype(np.float32)
    noisy = dict(prediction, keypoints=keypoints + noise)
    evaluator = CocoEvaluator(coco, ('keypoints',), backend=backend, verbose=False)
    evaluator.add(1, noisy)
    metrics = evaluator.evaluate()
    assert 0.0 < metrics['keypoints']['AP'] < 1.0
    path = evaluator.write_results(tmp_path / 'kp.json')
    assert evaluate_coco(coco, json.loads(path.read_text()), ('keypoints',), backend=backend,
                         verbose=False) == metrics
    # No detections: AP 0.
    evaluator = CocoEvaluator(coco, ('keypoints',), backend=backend, verbose=False)
    evaluator.add(1, {'boxes': np.zeros((0, 4)), 'scores': np.zeros(0), 'labels': np.zeros(0, int),
                      'keypoints': np.zeros((0, 17, 3))})
    assert evaluator.evaluate()['keypoints']['AP'] == 0.0
