"""Keypoints in `predict` (skeleton overlays, keypoints in the JSON), `eval` (keypoint AP table)
and `demo --task keypoints` (its parser); the skeleton each model is drawn with. The model is a
stand-in that predicts the ground truth (tests/keypoint_fakes.py): no compilation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from keypoint_fakes import GroundTruthPredictor
from PIL import Image

from mrcnn_jax import cli, visualize
from mrcnn_jax.config import load_config
from mrcnn_jax.data import coco, synthetic, synthetic_keypoints

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')
CONFIG = 'configs/keypoints_test.py'


def _one_figure():
    return {'boxes': np.array([[10, 10, 90, 90]], np.float32), 'scores': np.array([0.9], np.float32),
            'labels': np.array([1]), 'keypoints': np.array([[[20, 20, 1], [80, 20, 1], [50, 80, 1]]], np.float32),
            'keypoints_scores': np.array([[5.0, 5.0, -2.0]], np.float32)}


def test_draw_predictions_joins_keypoints_by_the_skeleton():
    black = np.zeros((100, 100, 3), np.uint8)
    colour = visualize.instance_colour(0)
    pixels = np.asarray(visualize.draw_predictions(black, _one_figure(), keypoint_skeleton=[[0, 1]]))
    assert tuple(pixels[20, 50]) == colour                   # on the line 0-1
    assert tuple(pixels[50, 35]) == (0, 0, 0)                 # 0-2 is not in the skeleton
    assert tuple(pixels[80, 50]) == colour                    # keypoint 2 is drawn
    hidden = np.asarray(visualize.draw_predictions(black, _one_figure(), keypoint_skeleton=[[0, 2]],
                                                   keypoint_threshold=0.0))
    assert tuple(hidden[80, 50]) == (0, 0, 0) and tuple(hidden[50, 35]) == (0, 0, 0)   # score -2
    [item] = visualize.predictions_to_json(_one_figure())
    assert item['keypoints'] == [[20.0, 20.0, 1.0], [80.0, 20.0, 1.0], [50.0, 80.0, 1.0]]
    assert item['keypoints_scores'] == [5.0, 5.0, -2.0]


def test_the_skeleton_of_each_model():
    cfg = load_config(CONFIG)
    figure = [list(p) for p in synthetic_keypoints.SKELETON]
    assert visualize.keypoint_skeleton(cfg) == figure                   # a model of the figures
    assert visualize.keypoint_skeleton(cfg, {'keypoint_skeleton': [[0, 3]]}) == [[0, 3]]
    cfg.data.source, cfg.model.num_keypoints = 'coco_json', 17
    coco_person = [[a - 1, b - 1] for a, b in coco.COCO_PERSON_SKELETON]
    assert visualize.keypoint_skeleton(cfg) == coco_person              # torchvision/Detectron2 COCO
    cfg.model.num_keypoints = 5
    assert visualize.keypoint_skeleton(cfg) == []                       # points only
    cfg.model.keypoint_on = False
    assert visualize.keypoint_skeleton(cfg) is None
    # an image without detections, a model without keypoints: nothing to draw, no error
    empty = {'boxes': np.zeros((0, 4)), 'scores': np.zeros(0), 'labels': np.zeros(0, int),
             'keypoints': np.zeros((0, 17, 3))}
    assert visualize.draw_predictions(np.zeros((8, 8, 3), np.uint8), empty).size == (8, 8)


@pytest.fixture(scope='module')
def figures(tmp_path_factory):
    root = tmp_path_factory.mktemp('figures')
    cfg = load_config(CONFIG, [f'data.synthetic_dir={root / "data"}', 'data.synthetic_num_train=1',
                               'data.synthetic_num_val=3'])
    ann, images = synthetic.ensure_synthetic(cfg)['val']
    model = root / 'model'                   # what the CLI reads besides the (faked) variables
    model.mkdir()
    (model / 'config.json').write_text(cfg.to_json())
    (model / 'metadata.json').write_text(json.dumps({'label_ids': [0, 1], 'class_names': ['__background__', 'person'],
                                                     'keypoint_skeleton': [[1, 2]]}))
    return cfg, ann, images, model


def test_predict_draws_skeletons_and_writes_keypoints(figures, tmp_path, monkeypatch, capsys):
    cfg, ann, images, model = figures
    fake = GroundTruthPredictor(cfg, ann)
    monkeypatch.setattr(cli, 'load_predictor', lambda *a, **k: fake)
    out = tmp_path / 'out'
    assert cli.main(['predict', images, '--checkpoint', str(model), '--out', str(out),
                     '--score-threshold', '0.0']) == 0
    assert 'wrote 3 overlay(s)' in capsys.readouterr().out
    record = json.loads((out / '000000.json').read_text())
    gt = json.load(open(ann))
    first = [a for a in gt['annotations'] if a['image_id'] == 1]
    assert len(record['instances']) == len(first)
    kps = np.asarray(record['instances'][0]['keypoints'])
    assert kps.shape == (13, 3) and len(record['instances'][0]['keypoints_scores']) == 13
    np.testing.assert_allclose(kps[:, :2], np.reshape(first[0]['keypoints'], (13, 3))[:, :2], atol=0.01)
    # the skeleton comes from the model directory's metadata: one line, shoulder to shoulder
    drawn = np.asarray(Image.open(out / '000000.png')).astype(int)
    plain = np.asarray(Image.open(f'{images}/000000.png')).astype(int)
    (x1, y1), (x2, y2) = kps[1, :2], kps[2, :2]
    r, c = int(round((y1 + y2) / 2)), int(round((x1 + x2) / 2))
    near = drawn[r - 1:r + 2, c - 1:c + 2].reshape(-1, 3)
    assert (near == visualize.instance_colour(0)).all(1).any()
    assert not (plain[r - 1:r + 2, c - 1:c + 2].reshape(-1, 3) == visualize.instance_colour(0)).all(1).any()


def test_eval_prints_the_keypoint_table_beside_bbox(figures, tmp_path, monkeypatch, capsys):
    cfg, ann, images, model = figures
    monkeypatch.setattr(cli, 'load_predictor', lambda *a, **k: GroundTruthPredictor(cfg, ann))
    out = tmp_path / 'eval'
    assert cli.main(['eval', '--checkpoint', str(model), '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'IoU metric: bbox' in text and 'IoU metric: keypoints' in text
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['keypoints']['AP'] == pytest.approx(1.0)
    assert all(len(r['keypoints']) == 39 for r in json.loads((out / 'results.json').read_text()))


def test_demo_takes_a_task():
    args = cli.build_parser().parse_args(['demo', '--task', 'keypoints'])
    assert args.task == 'keypoints' and args.workdir is None
    assert cli.build_parser().parse_args(['demo']).task == 'shapes'
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(['demo', '--task', 'faces'])
