"""`mrcnn-jax convert` and `mrcnn-jax eval` end to end, on a small torchvision Mask R-CNN.

The model is torchvision's Mask R-CNN with a ResNet-18 FPN body and the COCO layout (91 classes:
the class index is the COCO category id), seeded and calibrated (mrcnn_jax/testing/
torchvision_reference.py) on the test images, at 128/192 sizing; saved as a .pth state_dict.
Its classifier is biased so that only categories 1, 3 and 18 (and background) can win.

* convert: the CLI writes a model directory (config.json, metadata.json, variables/) and prints
  one line; `Predictor.from_checkpoint` on it gives exactly `Predictor.from_torchvision(pth)`'s
  detections and masks.
* eval: on a COCO dataset whose category ids are not contiguous (1, 3, 18), the results carry
  the model's labels as category ids (label 3 is category 3, not the 3rd sorted category, 18).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

from PIL import Image  # noqa: E402

from mrcnn_jax import Predictor, cli  # noqa: E402
from references import align_ties  # noqa: E402
from tv_reference import build_torchvision_maskrcnn  # noqa: E402

MIN_SIZE, MAX_SIZE = 128, 192
CATEGORIES = {1: 'person', 3: 'car', 18: 'dog'}     # COCO ids, not contiguous
IMAGES = {7: (96, 128), 12: (100, 150)}             # image id -> (h, w); one canvas bucket


def _smooth_image(rng, h, w):
    """Blobs at a few scales: closer to photo statistics than white noise."""
    img = np.zeros((h, w, 3))
    for cells in (3, 12, 40):
        small = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        img += np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), np.float64)
    return (img / 3).astype(np.uint8)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """A COCO instances json with non-contiguous category ids, and its image folder."""
    root = tmp_path_factory.mktemp('coco')
    (root / 'images').mkdir()
    rng = np.random.default_rng(0)
    images, annotations, pixels = [], [], {}
    for image_id, (h, w) in IMAGES.items():
        name = f'{image_id:012d}.png'
        pixels[image_id] = _smooth_image(rng, h, w)
        Image.fromarray(pixels[image_id]).save(root / 'images' / name)
        images.append({'id': image_id, 'file_name': name, 'height': h, 'width': w})
        for cat in CATEGORIES:
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            bw, bh = rng.uniform(15, w / 2), rng.uniform(15, h / 2)
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id, 'category_id': cat,
                                'bbox': [x, y, bw, bh], 'area': bw * bh, 'iscrowd': 0,
                                'segmentation': [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    coco = {'images': images, 'annotations': annotations,
            'categories': [{'id': i, 'name': n, 'supercategory': n} for i, n in CATEGORIES.items()]}
    (root / 'instances.json').write_text(json.dumps(coco))
    return root / 'instances.json', root / 'images', pixels


@pytest.fixture(scope='module')
def tv_pth(dataset, tmp_path_factory):
    """torchvision Mask R-CNN R18-FPN, 91 classes, where only categories 1, 3, 18 can win."""
    _, _, pixels = dataset
    model = build_torchvision_maskrcnn(seed=0, depth=18, num_classes=91, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                       calibration_images=list(pixels.values()))
    with torch.no_grad():
        bias = model.roi_heads.box_predictor.cls_score.bias
        others = torch.ones(91, dtype=torch.bool)
        others[[0, *CATEGORIES]] = False
        bias[others] = -30.0
    path = tmp_path_factory.mktemp('tv') / 'maskrcnn_r18.pth'
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def converted(tv_pth, tmp_path_factory):
    """`mrcnn-jax convert` run in-process: (model directory, what it printed)."""
    out = tmp_path_factory.mktemp('converted') / 'r18'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(['convert', '--from', 'torchvision', str(tv_pth), str(out),
                       '--min-size', str(MIN_SIZE), '--max-size', str(MAX_SIZE)])
    assert rc == 0
    return out, printed.getvalue()


def test_convert_writes_a_model_dir_that_predicts_as_the_pth(tv_pth, converted, dataset):
    out, printed = converted
    lines = printed.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        'converted torchvision Mask R-CNN R18-FPN (91 classes with the background; labels: coco_category_id) -> '), printed
    assert pathlib.Path(lines[0].split(' -> ', 1)[1]).resolve() == out.resolve()

    assert {'config.json', 'metadata.json', 'variables'} <= {f.name for f in out.iterdir()}
    assert (out / 'variables').is_dir() and any((out / 'variables').iterdir())
    meta = json.loads((out / 'metadata.json').read_text())
    assert meta['label_ids'] == list(range(91))
    assert meta['class_names'][1] == 'person' and meta['class_names'][18] == 'dog'
    assert meta['source'] == f'torchvision:{tv_pth.name}'
    config = json.loads((out / 'config.json').read_text())
    assert config['model']['num_classes'] == 91 and config['model']['mask_on']
    assert config['model']['backbone']['depth'] == 18
    assert (config['data']['test_min_size'], config['data']['test_max_size']) == (MIN_SIZE, MAX_SIZE)
    assert config['model']['roi']['score_thresh'] == 0.05 and config['model']['roi']['nms_thresh'] == 0.5

    a = Predictor.from_torchvision(str(tv_pth), min_size=MIN_SIZE, max_size=MAX_SIZE)
    b = Predictor.from_checkpoint(out)
    assert b.config.to_dict() == a.config.to_dict()
    assert list(b.label_ids) == list(a.label_ids) and b.class_names == a.class_names
    _, _, pixels = dataset
    for image in pixels.values():
        ra, rb = a(image), b(image)
        assert len(ra['scores']) >= 5, 'degenerate comparison: few detections'
        assert set(ra) == set(rb)
        for k in ra:
            np.testing.assert_array_equal(rb[k], ra[k], err_msg=k)


def test_eval_writes_the_models_labels_as_category_ids(converted, dataset, tmp_path, capsys):
    """A 91-class torchvision model's class index is the COCO category id: eval must write label
    L as category L. The contiguous remap (label L -> the L-th sorted category of the dataset)
    would write 3 as 18 (and have no category for 18)."""
    out_dir, _ = converted
    ann, images, pixels = dataset
    out = tmp_path / 'eval'
    rc = cli.main(['eval', '--checkpoint', str(out_dir), '--annotations', str(ann), '--images', str(images),
                   '--out', str(out), '--batch-size', '1'])
    assert rc == 0
    assert f'wrote {out / "results.json"}' in capsys.readouterr().out
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['num_images'] == len(IMAGES) and metrics['skipped'] == 0
    results = json.loads((out / 'results.json').read_text())
    written = {r['category_id'] for r in results}
    assert written <= set(CATEGORIES), f'category ids absent from the annotations: {written - set(CATEGORIES)}'
    assert {3, 18} <= written, 'the model should detect the categories a contiguous remap would change'

    # The model's own class indices: a Predictor without label_ids returns them unmapped.
    p = Predictor.from_checkpoint(out_dir)
    raw = Predictor(p.config, p.variables, paste=False)
    for image_id, image in pixels.items():
        mine = sorted((r for r in results if r['image_id'] == image_id), key=lambda r: -r['score'])
        pred = raw(image)
        assert len(mine) == len(pred['scores']) > 0
        scores = np.asarray([r['score'] for r in mine], np.float32)
        xyxy = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (r['bbox'] for r in mine)], np.float32)
        perm = align_ties(scores, pred['scores'], xyxy, pred['boxes'], tie=1e-5)
        np.testing.assert_array_equal([r['category_id'] for r in mine], pred['labels'][perm])
        np.testing.assert_allclose(scores, pred['scores'][perm], atol=1e-5, rtol=0)
        np.testing.assert_allclose(xyxy, pred['boxes'][perm], atol=1e-3, rtol=0)
