"""Bilinear taps against torch's upsample_bilinear2d, and the device image resize
(ops/resample.py) against its host twin, which is tested bit for bit against torch's kernel
(tests/test_preprocess.py). The mask pastes are tested in tests/ops/test_paste.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcnn_jax import preprocess
from mrcnn_jax.ops import resample

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize('in_size', [28, 30, 32])
def test_linear_taps_equal_torch_upsample(in_size):
    torch = pytest.importorskip('torch')
    # Interpolating the identity (basis images as channels) gives torch's weight matrix exactly.
    eye = torch.eye(in_size).reshape(1, in_size, in_size, 1)
    for out_size in list(range(1, 400)) + [511, 800, 1333, 2047]:
        want = torch.nn.functional.interpolate(eye, size=(out_size, 1), mode='bilinear', align_corners=False)
        want = want[0, :, :, 0].T.numpy()
        taps = resample.linear_taps(np.arange(out_size)[None], np.array([out_size]), in_size)
        i0, i1, w0, w1 = (a[0] for a in taps)
        got = np.zeros((out_size, in_size), np.float32)
        got[np.arange(out_size), i0] = w0
        got[np.arange(out_size), i1] += w1
        np.testing.assert_array_equal(got, want, err_msg=f'out_size={out_size}')


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


def test_raw_canvas_rounds_up():
    assert resample.raw_canvas(427, 640) == (448, 640)
    assert resample.raw_canvas(1, 65) == (64, 128)
