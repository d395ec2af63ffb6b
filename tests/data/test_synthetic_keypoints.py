"""The synthetic stick-figure keypoint dataset: deterministic, COCO keypoint format, visibility
flags that match the pixels, figures that face the camera (so the left/right flip map is right),
selected through the config and fed through the pipeline."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_jax.data import metadata, pipeline, synthetic
from mrcnn_jax.data import synthetic_keypoints as sk

from .helpers import small_config


def _read(out_dir, split='train'):
    ann = json.load(open(os.path.join(out_dir, f'annotations_{split}.json')))
    images = {im['id']: np.asarray(Image.open(os.path.join(out_dir, split, im['file_name'])))
              for im in ann['images']}
    return ann, images


def _mask(a):
    return mask_utils.decode(dict(a['segmentation'], counts=a['segmentation']['counts'].encode())).astype(bool)


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp('figures')
    sk.generate(str(out), 24, 128, seed=0, split_name='train')
    return str(out)


def test_generate_is_deterministic_per_seed_and_split(generated, tmp_path):
    sk.generate(str(tmp_path / 'b'), 24, 128, seed=0, split_name='train')
    sk.generate(str(tmp_path / 'c'), 4, 128, seed=1, split_name='train')
    sk.generate(str(tmp_path / 'd'), 4, 128, seed=0, split_name='val')
    (a_ann, a_img), (b_ann, b_img) = _read(generated), _read(tmp_path / 'b')
    assert a_ann == b_ann and all((a_img[i] == b_img[i]).all() for i in a_img)
    first = a_ann['annotations'][0]['keypoints']
    assert _read(tmp_path / 'c')[0]['annotations'][0]['keypoints'] != first
    assert _read(tmp_path / 'd', 'val')[0]['annotations'][0]['keypoints'] != first


def test_coco_keypoint_format_and_flags_that_match_the_pixels(generated):
    ann, images = _read(generated)
    (cat,) = ann['categories']
    assert cat['name'] == 'person' and cat['keypoints'] == list(sk.KEYPOINT_NAMES)
    assert cat['skeleton'] == [[a + 1, b + 1] for a, b in sk.SKELETON]          # 1-based, as COCO
    per_image = {}
    flags = []
    for a in ann['annotations']:
        per_image.setdefault(a['image_id'], []).append(a)
        mask = _mask(a)
        assert mask.sum() == a['area'] > 0
        np.testing.assert_allclose(mask_utils.toBbox(dict(a['segmentation'], counts=a['segmentation']['counts'].encode())), a['bbox'])
        kps = np.asarray(a['keypoints'], np.float64).reshape(13, 3)
        v = kps[:, 2]
        assert set(v.tolist()) <= {0, 1, 2} and a['num_keypoints'] == int((v > 0).sum())
        assert (kps[v == 0] == 0).all()                                          # COCO: (0, 0, 0)
        labelled = kps[v > 0, :2]
        assert ((labelled >= -0.5) & (labelled < 127.5)).all()
        rows, cols = np.round(kps[:, 1]).astype(int), np.round(kps[:, 0]).astype(int)
        visible = v == 2
        assert mask[rows[visible], cols[visible]].all()                          # v=2: on the figure
        for k in np.nonzero(v == 1)[0]:                                          # v=1: under another one
            others = [_mask(b) for b in ann['annotations'] if b['image_id'] == a['image_id'] and b is not a]
            assert not mask[rows[k], cols[k]] and any(m[rows[k], cols[k]] for m in others)
        # the figures face the camera: their left side is on the image's right
        if v[1] and v[2]:
            assert kps[1, 0] > kps[2, 0]
        if v[7] and v[8]:
            assert kps[7, 0] > kps[8, 0]
        flags.extend(v.tolist())
    counts = [len(v) for v in per_image.values()]
    assert len(per_image) == 24 and min(counts) >= 1 and max(counts) <= 3 and max(counts) > 1
    assert flags.count(2) > 0.8 * len(flags) and flags.count(1) > 0       # some hidden joints
    masks = [_mask(a) for a in per_image[1]]
    assert max(np.sum(masks, 0).ravel()) == 1                             # visible parts are disjoint
    # figures are drawn in the body's colours, not the muted background's
    pixels = images[1][masks[0]].astype(float)
    assert pixels.std(0).max() < 60


def test_config_selects_the_task_and_the_pipeline_flips_left_and_right(tmp_path):
    c = small_config('synthetic', canvas=(128, 128), synthetic_task='keypoints', keypoints=True,
                     num_keypoints=13, synthetic_dir=str(tmp_path), synthetic_num_train=4,
                     synthetic_num_val=2, synthetic_image_size=128, max_instances=6,
                     flip_prob=0.0)
    c.model.num_classes = 2
    c.model.mask_on = False
    c.model.keypoint_on, c.model.num_keypoints = True, 13
    paths = synthetic.ensure_synthetic(c)
    assert json.load(open(paths['train'][0]))['categories'][0]['keypoints'] == list(sk.KEYPOINT_NAMES)
    assert json.load(open(os.path.join(tmp_path, 'synthetic.json')))['task'] == 'keypoints'
    ds = pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=0, batch_size=4)
    assert ds.metadata['keypoint_flip_map'] == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11]
    assert ds.metadata['keypoint_skeleton'] == [list(p) for p in sk.SKELETON]
    plain = next(ds)
    c.data.flip_prob = 1.0
    flipped = next(pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=0,
                                          batch_size=4))
    assert plain['gt_keypoints'].shape == (4, 6, 13, 3) and 'gt_masks' not in plain
    np.testing.assert_array_equal(plain['image_id'], flipped['image_id'])
    for batch in (plain, flipped):   # after the flip and the swap, left is still on the right
        kps, valid = batch['gt_keypoints'], batch['gt_valid']
        both = valid & (kps[..., 1, 2] > 0) & (kps[..., 2, 2] > 0)
        assert both.any() and (kps[..., 1, 0][both] > kps[..., 2, 0][both]).all()
    # `mrcnn-jax data show` draws the skeleton: the line between the shoulders in the class colour
    from mrcnn_jax.data import drawing
    from mrcnn_jax.models.conventions import Conventions
    image = np.asarray(drawing.draw_element(plain, 0, ds.metadata,
                                            Conventions.from_config(c.model.conventions)))
    n = int(np.nonzero(plain['gt_valid'][0] & (plain['gt_keypoints'][0, :, 1, 2] > 0)
                       & (plain['gt_keypoints'][0, :, 2, 2] > 0))[0][0])
    x, y = (plain['gt_keypoints'][0, n, 1, :2] + plain['gt_keypoints'][0, n, 2, :2]) / 2
    near = image[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2].reshape(-1, 3)
    assert (near == drawing._colour(1)).all(1).any()
    w = plain['image_info'][:, 3][:, None]
    seen = plain['gt_valid'] & (plain['gt_keypoints'][..., 5, 2] > 0) & (flipped['gt_keypoints'][..., 6, 2] > 0)
    np.testing.assert_allclose(flipped['gt_keypoints'][..., 6, 0][seen],
                               (w - plain['gt_keypoints'][..., 5, 0])[seen], atol=1e-3)


def test_unknown_task_and_shapes_without_keypoints_are_clear_errors(tmp_path):
    c = small_config(synthetic_task='people', synthetic_dir=str(tmp_path))
    with pytest.raises(ValueError, match="synthetic_task must be one of .*'people'"):
        synthetic.ensure_synthetic(c)
    assert metadata.keypoint_flip_map(sk.KEYPOINT_NAMES)[1:3] == [2, 1]
