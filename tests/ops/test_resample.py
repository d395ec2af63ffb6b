"""Device resize and mask paste (ops/resample.py) against their host twins, which are tested
bit for bit against torch's kernels (tests/test_preprocess.py, tests/ops/test_masks.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcnn_jax import preprocess
from mrcnn_jax.ops import resample
from mrcnn_jax.ops.masks import paste_masks

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _raw_batch(images):
    hw = tuple(max(resample.raw_canvas(*im.shape[:2])[k] for im in images) for k in (0, 1))
    raw = np.zeros((len(images),) + hw + (3,), np.uint8)
    for j, im in enumerate(images):
        raw[j, :im.shape[0], :im.shape[1]] = im
    return raw


@pytest.mark.parametrize('order,scale', [('RGB', 1 / 255), ('BGR', 1.0)])
def test_resize_equals_the_host_resize(order, scale):
    rng = np.random.default_rng(0)
    # Upscale, downscale, one axis each way, and a 1-pixel-wide image, in one batch of mixed sizes.
    shapes = [((45, 67), (96, 143)), ((150, 90), (64, 38)), ((33, 100), (70, 60)), ((40, 1), (96, 2))]
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw, _ in shapes]
    canvas = (96, 160)
    sizes = np.asarray([hw + out for hw, out in shapes], np.int32)
    fn = jax.jit(lambda a, s: resample.normalize_resize_to_canvas(
        a, s, canvas, pixel_scale=scale, mean=MEAN, std=STD, channel_order=order))
    out = np.asarray(fn(_raw_batch(images), sizes))
    assert out.shape == (len(images),) + canvas + (3,)
    for j, (im, (_, (rh, rw))) in enumerate(zip(images, shapes)):
        ref = preprocess.resize_bilinear(preprocess.normalize(im, scale, MEAN, STD, order), (rh, rw))
        # float32 rounding: inputs up to ~2.6 (normalized) or 255 / 0.22 (scale 1).
        tol = 4e-6 * np.abs(ref).max()
        np.testing.assert_allclose(out[j, :rh, :rw], ref, atol=tol, rtol=0, err_msg=str(j))
        assert not out[j, rh:].any() and not out[j, :, rw:].any()      # zero padding


def test_paste_equals_the_host_paste():
    rng = np.random.default_rng(1)
    n, h, w = 40, 83, 121
    masks = rng.random((2, n, 28, 28), dtype=np.float32)
    centre = rng.uniform(-20, 140, (2, n, 2))
    half = rng.uniform(0.2, 60, (2, n, 2))
    boxes = np.concatenate([centre - half, centre + half], -1).astype(np.float32)
    boxes[0, :3] = boxes[0, :3][:, [2, 3, 0, 1]]                          # inverted: pastes nothing
    boxes[1, :2] = [[200, 200, 260, 240], [-90, -50, -10, -5]]            # entirely outside
    boxes[1, 2] = [10.3, 20.7, 10.9, 21.2]                                 # under a pixel
    canvas = resample.raw_canvas(h, w)
    prob = np.asarray(jax.jit(lambda m, b: resample.paste_masks_to_canvas(m, b, canvas))(masks, boxes))
    binary = np.asarray(jax.jit(lambda m, b: resample.paste_masks_to_canvas(m, b, canvas, threshold=0.5))(
        masks, boxes))
    assert prob.shape == (2, n) + canvas and binary.dtype == bool
    for b in range(2):
        ref = paste_masks(masks[b], boxes[b], (h, w))
        np.testing.assert_allclose(prob[b, :, :h, :w], ref, atol=2e-7, rtol=0)
        # Thresholds agree except where the probability is within rounding of 0.5.
        differ = binary[b, :, :h, :w] != (ref > 0.5)
        assert not differ[np.abs(ref - 0.5) > 1e-6].any()
    assert not prob[0, :3].any() and not prob[1, :2].any()
    assert prob[1, 2].any()                                               # 1 x 1 pixel box still pastes


def test_expand_boxes_matches_the_host():
    from mrcnn_jax.ops.masks import expand_boxes_to_pixels
    rng = np.random.default_rng(2)
    boxes = rng.uniform(-30, 500, (200, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(resample.expand_boxes_to_pixels(boxes, 28)),
                                  expand_boxes_to_pixels(boxes, 28))


def test_raw_canvas_rounds_up():
    assert resample.raw_canvas(427, 640) == (448, 640)
    assert resample.raw_canvas(1, 65) == (64, 128)
