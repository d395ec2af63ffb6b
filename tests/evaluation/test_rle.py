"""COCO RLE of masks (evaluation/rle.py): both paths equal pycocotools' encoding of the pasted mask."""

import numpy as np
import pytest

pytest.importorskip('pycocotools')
# pycocotools 2.0.x with numpy 2 warns on every decode.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')
from pycocotools import mask as mask_util  # noqa: E402

from mrcnn_jax.evaluation.rle import encode_rle, paste_masks_to_rle  # noqa: E402
from mrcnn_jax.ops.paste import paste_masks  # noqa: E402


def test_rle_paths_equal_encoding_the_full_mask():
    rng = np.random.default_rng(5)
    image_hw = (45, 66)
    masks = rng.random((19, 28, 28), dtype=np.float32)
    # Sub-pixel to larger than the image, many crossing its border.
    corner = rng.uniform(-0.3, 1.1, (19, 2)) * np.array([66, 45])
    boxes = np.concatenate([corner, corner + rng.uniform(0.5, 80, (19, 2))], axis=1).astype(np.float32)
    binary = paste_masks(masks, boxes, image_hw) > 0.5
    assert binary.any(axis=(1, 2)).sum() > 10
    want = [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary]
    for rle in want:
        rle['counts'] = rle['counts'].decode('ascii')
    assert paste_masks_to_rle(masks, boxes, image_hw, chunk_size=4) == want
    assert encode_rle(binary, chunk_size=3) == want
    assert encode_rle(paste_masks(masks, boxes, image_hw)) == want  # float input: > 0.5
    assert all(isinstance(r['counts'], str) and r['size'] == list(image_hw) for r in want)
    np.testing.assert_array_equal(mask_util.decode(want).transpose(2, 0, 1), binary)


def test_empty():
    assert paste_masks_to_rle(np.zeros((0, 28, 28)), np.zeros((0, 4)), (5, 6)) == []


def _encoded(binary):
    want = [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary]
    for rle in want:
        rle['counts'] = rle['counts'].decode('ascii')
    return want


def test_detectron2_paste_rule_reaches_the_encoding():
    """paste_rule='pixel_centers' pastes as `paste_masks(rule='pixel_centers')` and thresholds with >=,
    in `paste_masks_to_rle`, `encode_rle` and the COCO evaluator's workers."""
    from mrcnn_jax.evaluation.coco_eval import CocoEvaluator, prediction_to_coco_results

    rng = np.random.default_rng(6)
    image_hw = (45, 66)
    n = 12
    masks = rng.random((n, 28, 28), dtype=np.float32)
    masks[:3] = 0.5  # exactly the threshold: foreground by Detectron2's >= only
    corner = rng.uniform(-0.2, 0.8, (n, 2)) * np.array([66, 45])
    boxes = np.concatenate([corner, corner + rng.uniform(3, 50, (n, 2))], axis=1).astype(np.float32)
    binary = paste_masks(masks, boxes, image_hw, threshold=0.5, rule='pixel_centers')
    assert binary[:3].any() and binary.any(axis=(1, 2)).sum() > n // 2
    want = _encoded(binary)
    assert paste_masks_to_rle(masks, boxes, image_hw, chunk_size=5, paste_rule='pixel_centers') == want
    assert paste_masks_to_rle(masks, boxes, image_hw) != want  # torchvision's rule is another paste
    probs = paste_masks(masks, boxes, image_hw, rule='pixel_centers')
    assert encode_rle(probs, paste_rule='pixel_centers') == want  # float input: >= 0.5
    assert encode_rle(probs) == _encoded(probs > 0.5) != want

    prediction = {'boxes': boxes, 'scores': np.linspace(1, 0.1, n, dtype=np.float32),
                  'labels': np.ones(n, np.int64), 'mask_probs': masks}
    results = prediction_to_coco_results(3, prediction, image_hw=image_hw, paste_rule='pixel_centers')
    assert [r['segmentation'] for r in results] == want
    gt = {'images': [{'id': 3, 'height': 45, 'width': 66}], 'annotations': [],
          'categories': [{'id': 1, 'name': 'thing'}]}
    with CocoEvaluator(gt, verbose=False, num_workers=1, paste_rule='pixel_centers') as evaluator:
        evaluator.add(3, prediction)
        assert [r['segmentation'] for r in evaluator.results] == want
    with pytest.raises(ValueError, match='rule'):
        CocoEvaluator(gt, verbose=False, paste_rule='caffe2')
