"""Keypoint evaluation of a split (`inference.evaluate`): keypoint AP beside box AP when the model
has a keypoint head and the annotations have keypoints, with the dataset's OKS sigmas; one clear
line and box AP otherwise; ground truth that pycocotools can read; results in COCO's format."""

import json

import numpy as np
import pytest

pytest.importorskip('pycocotools')
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

from keypoint_fakes import GroundTruthPredictor  # noqa: E402

from mrcnn_jax.config import load_config  # noqa: E402
from mrcnn_jax.data import coco, synthetic, synthetic_keypoints  # noqa: E402
from mrcnn_jax.evaluation import keypoints  # noqa: E402
from mrcnn_jax.evaluation.coco_eval import evaluate_coco  # noqa: E402
from mrcnn_jax.evaluation.inference import evaluate  # noqa: E402

CONFIG = 'configs/keypoints_test.py'


@pytest.fixture(scope='module')
def figures(tmp_path_factory):
    root = tmp_path_factory.mktemp('figures')
    cfg = load_config(CONFIG, [f'data.synthetic_dir={root}', 'data.synthetic_num_train=1',
                               'data.synthetic_num_val=5'])
    synthetic.ensure_synthetic(cfg)
    return cfg


def test_keypoint_ap_beside_box_ap_and_results_in_coco_keypoint_format(figures, tmp_path, capsys):
    ann = synthetic.ensure_synthetic(figures)['val'][0]
    metrics = evaluate(figures, GroundTruthPredictor(figures, ann), out_dir=tmp_path, progress=False)
    out = capsys.readouterr().out
    assert 'IoU metric: bbox' in out and 'IoU metric: keypoints' in out
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ]' in out
    assert metrics['keypoints']['AP'] == pytest.approx(1.0) and metrics['bbox']['AP'] == pytest.approx(1.0)
    assert 'keypoints_not_evaluated' not in metrics and metrics['num_images'] == 5
    results = json.loads((tmp_path / 'results.json').read_text())
    gt = json.load(open(ann))
    assert len(results) == len(gt['annotations'])
    assert {'image_id', 'category_id', 'score', 'keypoints'} <= set(results[0])
    assert len(results[0]['keypoints']) == 3 * 13
    assert json.loads((tmp_path / 'metrics.json').read_text())['keypoints']['AP'] == pytest.approx(1.0)
    # Noisy keypoints score below 1, more so with COCO's tighter face sigmas than the figures'.
    noisy = GroundTruthPredictor(figures, ann)
    prediction = noisy.prediction
    rng = np.random.default_rng(0)

    def shifted(image_id):
        p = prediction(image_id)
        p['keypoints'][..., :2] += rng.normal(0, 1.5, p['keypoints'][..., :2].shape)
        return p
    noisy.prediction = shifted
    ap = evaluate(figures, noisy, progress=False, verbose=False)['keypoints']['AP']
    figures.data.keypoint_oks_sigmas = (0.025,) * 13
    rng = np.random.default_rng(0)
    strict = evaluate(figures, noisy, progress=False, verbose=False)['keypoints']['AP']
    figures.data.keypoint_oks_sigmas = ()
    assert 0.0 < strict < ap < 1.0


def test_detectron2_keypoint_offset_is_undone_in_the_results(figures, tmp_path):
    """Under Detectron2's conventions the model predicts in its +0.5 frame: COCO evaluation
    subtracts conventions.keypoint_offset, as Detectron2's COCOEvaluator does."""
    ann = synthetic.ensure_synthetic(figures)['val'][0]
    pred = GroundTruthPredictor(figures, ann)
    pred.conventions.keypoint_offset = 0.5
    truth = pred.prediction

    def in_detectron2_frame(image_id):
        p = truth(image_id)
        p['keypoints'][..., :2] += 0.5
        return p
    pred.prediction = in_detectron2_frame
    metrics = evaluate(figures, pred, out_dir=tmp_path, progress=False, verbose=False)
    assert metrics['keypoints']['AP'] == pytest.approx(1.0)
    gt = {a['id']: a for a in json.load(open(ann))['annotations']}
    results = json.loads((tmp_path / 'results.json').read_text())
    first = next(a for a in gt.values() if a['image_id'] == results[0]['image_id'] and a['num_keypoints'])
    labelled = np.asarray(first['keypoints'], np.float32).reshape(-1, 3)[:, 2] > 0
    ours = [np.asarray(r['keypoints'], np.float32).reshape(-1, 3) for r in results if r['image_id'] == first['image_id']]
    truth_xy = np.asarray(first['keypoints'], np.float32).reshape(-1, 3)[labelled, :2]
    assert any(np.allclose(o[labelled, :2], truth_xy, atol=1e-4) for o in ours)


def test_keypoint_model_on_annotations_without_keypoints_gets_one_line_and_box_ap(tmp_path, capsys):
    cfg = load_config(CONFIG, [f'data.synthetic_dir={tmp_path}', 'data.synthetic_task=shapes',
                               'data.synthetic_num_train=1', 'data.synthetic_num_val=3',
                               'model.num_classes=5'])
    ann = synthetic.ensure_synthetic(cfg)['val'][0]
    metrics = evaluate(cfg, GroundTruthPredictor(cfg, ann), progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if 'keypoint AP' in line]
    assert lines == [f'keypoint AP not computed: the annotations have no keypoints ({ann}); box AP only']
    assert metrics['bbox']['AP'] == pytest.approx(1.0) and 'keypoints' not in metrics
    assert metrics['keypoints_not_evaluated'] == 'the annotations have no keypoints'


def test_keypoint_count_mismatch_is_reported_not_crashed(figures, capsys):
    ann = synthetic.ensure_synthetic(figures)['val'][0]
    figures.model.num_keypoints = 17
    try:
        metrics = evaluate(figures, GroundTruthPredictor(figures, ann, num_keypoints=17),
                           progress=False, verbose=False)
    finally:
        figures.model.num_keypoints = 13
    assert 'have 13 keypoints per instance, the model predicts 17' in capsys.readouterr().out
    assert metrics['bbox']['AP'] == pytest.approx(1.0) and 'keypoints' not in metrics


def test_oks_sigmas_per_dataset(caplog):
    coco_sigmas = keypoints.oks_sigmas(coco.COCO_PERSON_KEYPOINTS)
    np.testing.assert_allclose(coco_sigmas, np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72,
                                                      .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10)
    np.testing.assert_allclose(keypoints.oks_sigmas([f'keypoint_{i}' for i in range(17)]), coco_sigmas)
    figure = keypoints.oks_sigmas(synthetic_keypoints.KEYPOINT_NAMES)
    np.testing.assert_allclose(figure, synthetic_keypoints.OKS_SIGMAS)
    # the figures' joints that COCO has get COCO's sigmas; the head gets the shoulders'
    by_name = dict(zip(coco.COCO_PERSON_KEYPOINTS, coco_sigmas))
    for name, sigma in zip(synthetic_keypoints.KEYPOINT_NAMES, figure):
        assert sigma == by_name.get(name, by_name['left_shoulder'])
    np.testing.assert_allclose(keypoints.oks_sigmas(['left_wrist', 'nose']), [0.062, 0.026])
    np.testing.assert_allclose(keypoints.oks_sigmas(['a', 'b'], configured=(0.1, 0.2)), [0.1, 0.2])
    with pytest.raises(ValueError, match='has 1 values for 2 keypoints'):
        keypoints.oks_sigmas(['a', 'b'], configured=(0.1,))
    np.testing.assert_allclose(keypoints.oks_sigmas(['tip', 'tail']), [0.0669] * 2, atol=1e-4)
    assert 'no OKS sigmas known' in caplog.text


def test_ground_truth_with_other_categories_and_no_num_keypoints_evaluates():
    """An instances json: people with keypoints (one without `num_keypoints`), a car without
    keypoints; pycocotools reads both fields of every annotation of every category."""
    kps = [20, 20, 2, 30, 20, 2, 25, 30, 1]
    gt = {'images': [{'id': 1, 'height': 60, 'width': 80, 'file_name': 'a.png'}],
          'categories': [{'id': 1, 'name': 'person', 'keypoints': ['a', 'b', 'c']},
                         {'id': 3, 'name': 'car'}],
          'annotations': [
              {'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 30, 30], 'area': 600.0,
               'iscrowd': 0, 'keypoints': kps},
              {'id': 2, 'image_id': 1, 'category_id': 3, 'bbox': [50, 5, 20, 20], 'area': 400.0,
               'iscrowd': 0}]}
    from pycocotools.coco import COCO
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    assert keypoints.ground_truth_problem(coco_gt, 3) is None
    assert keypoints.ground_truth_problem(coco_gt, 4).endswith('the model predicts 4')
    keypoints.prepare_ground_truth(coco_gt)
    assert coco_gt.anns[1]['num_keypoints'] == 3 and coco_gt.anns[2]['num_keypoints'] == 0
    results = [{'image_id': 1, 'category_id': 1, 'score': 0.9, 'bbox': [10, 10, 30, 30],
                'keypoints': kps},
               {'image_id': 1, 'category_id': 3, 'score': 0.8, 'bbox': [50, 5, 20, 20],
                'keypoints': [0] * 9}]
    metrics = evaluate_coco(coco_gt, results, ('bbox', 'keypoints'), verbose=False,
                            kpt_oks_sigmas=keypoints.oks_sigmas(['a', 'b', 'c'], (0.05,) * 3))
    assert metrics['keypoints']['AP'] == pytest.approx(1.0) and metrics['bbox']['AP'] == pytest.approx(1.0)
