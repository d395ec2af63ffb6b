"""The synthetic shapes dataset: deterministic, exact masks, learnable sizes, cached generation."""

import json
import os
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_jax.data import synthetic

from .helpers import small_config


def _read(out_dir, split='train'):
    ann = json.load(open(os.path.join(out_dir, f'annotations_{split}.json')))
    images = {im['id']: np.asarray(Image.open(os.path.join(out_dir, split, im['file_name'])))
              for im in ann['images']}
    return ann, images


def test_generate_is_deterministic_per_seed_and_split(tmp_path):
    for name in ('a', 'b'):
        synthetic.generate(str(tmp_path / name), 6, 96, seed=3, split_name='train')
    synthetic.generate(str(tmp_path / 'c'), 6, 96, seed=4, split_name='train')
    synthetic.generate(str(tmp_path / 'd'), 6, 96, seed=3, split_name='val')
    (a_ann, a_img), (b_ann, b_img) = _read(tmp_path / 'a'), _read(tmp_path / 'b')
    assert a_ann == b_ann and all((a_img[i] == b_img[i]).all() for i in a_img)
    assert _read(tmp_path / 'c')[0]['annotations'] != a_ann['annotations']
    assert _read(tmp_path / 'd', 'val')[0]['annotations'] != a_ann['annotations']


def test_masks_are_exact_visible_parts(tmp_path):
    synthetic.generate(str(tmp_path), 30, 128, seed=0, split_name='train')
    ann, images = _read(tmp_path)
    assert [c['name'] for c in ann['categories']] == ['circle', 'square', 'triangle', 'star']
    per_image = {}
    for a in ann['annotations']:
        per_image.setdefault(a['image_id'], []).append(a)
        rle = dict(a['segmentation'], counts=a['segmentation']['counts'].encode())
        mask = mask_utils.decode(rle).astype(bool)
        assert mask.sum() == a['area'] >= 0.002 * 128 * 128
        np.testing.assert_allclose(mask_utils.toBbox(rle), a['bbox'])
        pixels = images[a['image_id']][mask].astype(float)
        assert pixels.std(0).max() < 10                # one flat colour + grain (sigma 4)
        ring = np.zeros_like(mask)                      # the pixels just outside differ
        x, y, w, h = (int(v) for v in a['bbox'])
        ring[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
        outside = images[a['image_id']][ring & ~mask].astype(float)
        if len(outside) > 50:
            assert np.abs(outside.mean(0) - pixels.mean(0)).max() > 8
    counts = [len(v) for v in per_image.values()]
    assert min(counts) >= 2 and max(counts) <= 6 and len(per_image) == 30
    assert {a['category_id'] for a in ann['annotations']} == {1, 2, 3, 4}
    masks = [mask_utils.decode(dict(a['segmentation'], counts=a['segmentation']['counts'].encode()))
             for a in per_image[1]]
    assert max(np.sum(masks, 0).ravel()) == 1          # visible parts never overlap


def test_a_few_hundred_images_in_seconds(tmp_path):
    start = time.perf_counter()
    synthetic.generate(str(tmp_path), 100, 256, seed=0, split_name='train')
    assert time.perf_counter() - start < 20            # ~1.5 s on one core, generous when shared


def test_ensure_synthetic_generates_once_and_regenerates_on_change(tmp_path):
    c = small_config()
    c.data.synthetic_dir = str(tmp_path)
    c.data.synthetic_num_train, c.data.synthetic_num_val, c.data.synthetic_image_size = 4, 2, 64
    paths = synthetic.ensure_synthetic(c)
    train_json = paths['train'][0]
    assert len(json.load(open(train_json))['images']) == 4
    assert len(os.listdir(paths['val'][1])) == 2
    stamp = os.stat(train_json).st_mtime_ns
    assert synthetic.ensure_synthetic(c) == paths and os.stat(train_json).st_mtime_ns == stamp
    c.data.synthetic_num_train = 3
    synthetic.ensure_synthetic(c)
    assert len(json.load(open(train_json))['images']) == 3
    assert len(os.listdir(paths['train'][1])) == 3
