"""Per-example ops against torchvision, Detectron2's resize rule (tests/references.py) and a numpy reference."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mrcnn_jax.data import example, transforms
from references import detectron2_resize_shape

from .helpers import reference_mask_target

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _options(**kw) -> transforms.PreprocessOptions:
    base = dict(train=False, min_sizes=(64,), max_size=100, resize_rule='floor',
                antialias=False, flip_prob=0.0, channel_order='RGB', pixel_scale=1 / 255,
                pixel_mean=MEAN, pixel_std=STD, max_instances=6, mask_size=14, with_masks=True,
                num_keypoints=0, keypoint_flip_map=(), class_table=tuple(range(10)))
    base.update(kw)
    return transforms.PreprocessOptions(**base)


def _blob_masks(rng, n, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.zeros((n, h, w), np.uint8)
    for k in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(3, h / 2), rng.uniform(3, w / 2)
        masks[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks[k, rng.integers(0, h):, rng.integers(0, w):] ^= 1   # make it asymmetric
    return masks


def _parsed(rng, h=37, w=53, n=4, num_keypoints=0):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    masks = _blob_masks(rng, n, h, w)
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(2, w / 2, n), y1 + rng.uniform(2, h / 2, n)], 1)
    parsed = {
        'image': tf.constant(image), 'image_id': tf.constant(5, tf.int64),
        'boxes': tf.constant(boxes, tf.float32),
        'category_ids': tf.constant(rng.integers(1, 10, n), tf.int64),
        'is_crowd': tf.constant([False] * n), 'areas': tf.constant(masks.sum((1, 2)), tf.float32),
        'masks_png': tf.constant([example.encode_mask_png(m) for m in masks], tf.string),
    }
    if num_keypoints:
        kps = np.concatenate([rng.uniform(0, w, (n, num_keypoints, 1)),
                              rng.uniform(0, h, (n, num_keypoints, 1)),
                              rng.integers(0, 3, (n, num_keypoints, 1))], -1)
        parsed['keypoints'] = tf.constant(kps, tf.float32)
    return parsed, image, masks, boxes


def test_resized_size_matches_torchvision_and_detectron2():
    rng = np.random.default_rng(0)
    cases = [(480, 640, 800, 1333), (427, 640, 800, 1333), (333, 500, 800, 1333),
             (375, 500, 800, 1333), (640, 480, 640, 1000), (1000, 200, 800, 1333),
             (200, 1000, 800, 1333), (100, 100, 64, 100)]
    cases += [(int(rng.integers(50, 1200)), int(rng.integers(50, 1200)),
               int(rng.choice([480, 640, 672, 704, 736, 768, 800])), 1333) for _ in range(40)]
    big = (4000, 4000)
    for h, w, short, max_size in cases:
        # torchvision: GeneralizedRCNNTransform.resize → F.interpolate(scale_factor=...)
        scale = min(float(short) / min(h, w), float(max_size) / max(h, w))
        out = torch.nn.functional.interpolate(torch.zeros(1, 1, h, w), scale_factor=scale,
                                              mode='bilinear', recompute_scale_factor=True,
                                              align_corners=False)
        ours = transforms.resized_size(h, w, short, max_size, big, 'floor')
        assert (int(ours[0]), int(ours[1])) == tuple(out.shape[-2:]), (h, w, short)
        ours = transforms.resized_size(h, w, short, max_size, big, 'round')
        assert (int(ours[0]), int(ours[1])) == detectron2_resize_shape(h, w, short, max_size)


def test_resized_size_fits_a_small_canvas():
    for rule in ('floor', 'round'):
        h, w = transforms.resized_size(480, 640, 800, 1333, (512, 512), rule)
        assert int(w) == 512 and int(h) == 384
        h, w = transforms.resized_size(640, 480, 800, 1333, (832, 1344), rule)
        assert int(h) <= 832 and int(w) <= 1344 and abs(int(h) / int(w) - 640 / 480) < 0.01


def test_preprocess_matches_torchvision_transform():
    rng = np.random.default_rng(1)
    parsed, image, _, boxes = _parsed(rng, h=45, w=61)
    options = _options(min_sizes=(72,), max_size=120)
    out = transforms.preprocess(parsed, tf.constant([128, 128]), tf.constant([0, 0], tf.int64),
                                options)
    tv = GeneralizedRCNNTransform(min_size=72, max_size=120, image_mean=list(MEAN),
                                  image_std=list(STD)).eval()
    timage = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    batch, targets = tv([timage], [{'boxes': torch.from_numpy(boxes).float(),
                                    'labels': torch.ones(len(boxes), dtype=torch.int64)}])
    h, w = batch.image_sizes[0]
    info = out['image_info'].numpy()
    assert (int(info[2]), int(info[3])) == (h, w)
    ref = batch.tensors[0, :, :h, :w].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out['images'].numpy()[:h, :w], ref, atol=2e-5)
    assert not out['images'].numpy()[h:].any() and not out['images'].numpy()[:, w:].any()
    np.testing.assert_allclose(info[4:], [h / 45, w / 61], rtol=1e-6)
    # torchvision keeps all boxes; ours keeps the 6 largest, here all 4, in order
    np.testing.assert_allclose(out['gt_boxes'].numpy()[:4], targets[0]['boxes'].numpy(),
                               rtol=1e-5, atol=1e-4)
    assert out['gt_valid'].numpy().tolist() == [True] * 4 + [False] * 2


@pytest.mark.parametrize('m', [7, 28])
def test_mask_targets_match_reference(m):
    rng = np.random.default_rng(m)
    h, w, n = 37, 53, 12
    masks = _blob_masks(rng, n, h, w)
    x1, y1 = rng.uniform(-0.0, w - 3, n), rng.uniform(0, h - 3, n)
    boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(1, 40, n), w),
                      np.minimum(y1 + rng.uniform(1, 30, n), h)], 1).astype(np.float32)
    boxes[0] = [0, 0, w, h]                                 # whole image: border samples
    ours = transforms.mask_targets(tf.constant(masks), tf.constant(boxes), m).numpy()
    ref = np.stack([reference_mask_target(masks[k], boxes[k], m) for k in range(n)])
    assert ours.shape == (n, m, m) and ours.dtype == np.uint8
    assert (ours != ref).mean() < 0.002                     # float32 vs float64 ties at 0.5
    empty = transforms.mask_targets(tf.zeros([0, h, w], tf.uint8), tf.zeros([0, 4]), m)
    assert empty.shape == (0, m, m)


def test_negative_image_gives_empty_padded_targets():
    parsed, *_ = _parsed(np.random.default_rng(4), n=0, num_keypoints=2)
    opts = _options(num_keypoints=2, keypoint_flip_map=(1, 0), train=True, flip_prob=1.0)
    out = transforms.preprocess(parsed, tf.constant([128, 128]), tf.constant([1, 2], tf.int64),
                                opts)
    assert out['gt_masks'].shape == (6, 14, 14) and not out['gt_masks'].numpy().any()
    assert not out['gt_valid'].numpy().any() and out['gt_keypoints'].shape == (6, 2, 3)
    assert out['images'].numpy().any()


def test_select_instances_keeps_largest_in_order():
    keep, dropped = transforms.select_instances(tf.constant([5., 1., 9., 3., 7.]), 3)
    assert keep.numpy().tolist() == [0, 2, 4] and int(dropped) == 2
    keep, dropped = transforms.select_instances(tf.constant([5., 1.]), 3)
    assert keep.numpy().tolist() == [0, 1] and int(dropped) == 0


def test_flip_is_consistent_for_image_boxes_masks_keypoints():
    rng = np.random.default_rng(3)
    names_flip = (0, 2, 1)                                  # e.g. nose, left_eye, right_eye
    parsed, *_ = _parsed(rng, n=5, num_keypoints=3)
    kw = dict(train=True, num_keypoints=3, keypoint_flip_map=names_flip, max_instances=8)
    seed = tf.constant([4, 2], tf.int64)
    canvas = tf.constant([128, 128])
    plain = transforms.preprocess(parsed, canvas, seed, _options(flip_prob=0.0, **kw))
    flip = transforms.preprocess(parsed, canvas, seed, _options(flip_prob=1.0, **kw))
    h, w = (int(v) for v in plain['image_info'].numpy()[2:4])
    np.testing.assert_allclose(flip['images'].numpy()[:h, :w],
                               plain['images'].numpy()[:h, :w][:, ::-1], atol=1e-4)
    b, bf = plain['gt_boxes'].numpy()[:5], flip['gt_boxes'].numpy()[:5]
    np.testing.assert_allclose(bf, np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1),
                               atol=1e-4)
    np.testing.assert_array_equal(flip['gt_masks'].numpy(), plain['gt_masks'].numpy()[:, :, ::-1])
    assert plain['gt_masks'].numpy()[:5].any()
    k, kf = plain['gt_keypoints'].numpy()[:5], flip['gt_keypoints'].numpy()[:5]
    mirrored = k[:, list(names_flip)]
    visible = mirrored[..., 2] > 0
    np.testing.assert_allclose(kf[..., 0][visible], (w - mirrored[..., 0])[visible], atol=1e-3)
    np.testing.assert_allclose(kf[..., 1:][visible], mirrored[..., 1:][visible], atol=1e-3)
    assert (kf[~visible] == 0).all()
    np.testing.assert_array_equal(flip['gt_classes'].numpy(), plain['gt_classes'].numpy())


def test_detectron2_keypoint_offset_is_added_before_flip_and_resize():
    """conventions.keypoint_offset (Detectron2: 0.5, its loader's pixel index -> continuous
    coordinate) moves labelled keypoints by offset x scale, flipped as Detectron2 flips them
    (x + 0.5 -> W - x - 0.5); unlabelled ones stay (0, 0, 0)."""
    rng = np.random.default_rng(5)
    parsed, *_ = _parsed(rng, n=4, num_keypoints=3)
    canvas, seed = tf.constant([128, 128]), tf.constant([1, 2], tf.int64)
    for flip in (0.0, 1.0):
        kw = dict(train=True, num_keypoints=3, keypoint_flip_map=(0, 2, 1), flip_prob=flip)
        base = transforms.preprocess(parsed, canvas, seed, _options(**kw))
        shifted = transforms.preprocess(parsed, canvas, seed, _options(keypoint_offset=0.5, **kw))
        sh, sw = (float(v) for v in base['image_info'].numpy()[4:6])
        k0, k1 = base['gt_keypoints'].numpy()[:4], shifted['gt_keypoints'].numpy()[:4]
        vis = k0[..., 2] > 0
        assert vis.sum() >= 4 and (~vis).sum() >= 1
        np.testing.assert_allclose(k1[..., 0][vis] - k0[..., 0][vis], (-0.5 if flip else 0.5) * sw, atol=1e-4)
        np.testing.assert_allclose(k1[..., 1][vis] - k0[..., 1][vis], 0.5 * sh, atol=1e-4)
        assert (k1[~vis] == 0).all()


def test_bgr_and_pixel_scale():
    opts = _options(channel_order='BGR', pixel_scale=1.0, pixel_mean=(103.53, 116.28, 123.675),
                    pixel_std=(1.0, 1.0, 1.0))
    rgb = tf.constant([[[10.0, 20.0, 30.0]]])
    np.testing.assert_allclose(transforms.normalize(rgb, opts).numpy()[0, 0],
                               [30 - 103.53, 20 - 116.28, 10 - 123.675], rtol=1e-6)


def test_padding_element_shapes():
    opts = dataclasses.replace(_options(), num_keypoints=2, keypoint_flip_map=(1, 0))
    el = transforms.padding_element(tf.constant([64, 96]), opts)
    assert el['images'].shape == (64, 96, 3) and int(el['image_id']) == -1
    assert el['gt_masks'].shape == (6, 14, 14) and el['gt_keypoints'].shape == (6, 2, 3)
    np.testing.assert_array_equal(el['image_info'].numpy(), [64, 96, 64, 96, 1, 1])
