"""mrcnn_jax.preprocess against torchvision's GeneralizedRCNNTransform / F.interpolate and
Detectron2's ResizeShortestEdge (the shared reference in tests/references.py), plus canvas buckets."""

import math

import numpy as np
import pytest

from mrcnn_jax import preprocess
from references import detectron2_resize_shape, detectron2_source_function

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def torch_threads():
    """torch's bilinear kernel depends on its thread count: with one thread it takes the
    channels-last kernel for 3-channel images of any size (other FMA rounding). We reproduce the
    multi-threaded choice, so compare against that."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(n, 2))
    yield
    torch.set_num_threads(n)


def _torch_resize(image_hwc, scale):
    """What torchvision's _resize_image_and_masks does with scale_factor = scale."""
    x = torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)))[None]
    y = torch.nn.functional.interpolate(x, size=None, scale_factor=scale, mode='bilinear',
                                        recompute_scale_factor=True, align_corners=False)
    return y[0].permute(1, 2, 0).numpy()


# (h, w, min_size, max_size): up- and down-scaling, capped by max_size, odd sizes, squares.
CASES = [(425, 640, 800, 1333), (640, 427, 800, 1333), (500, 381, 800, 1333), (480, 640, 320, 512),
         (333, 500, 320, 512), (101, 37, 64, 200), (37, 101, 64, 80), (97, 97, 128, 128),
         (60, 1000, 50, 300), (129, 255, 128, 128), (7, 13, 32, 64), (300, 200, 150, 1000),
         (1000, 999, 800, 1333), (211, 173, 96, 160)]


@pytest.mark.parametrize('h, w, min_size, max_size', CASES)
def test_resize_bilinear_matches_interpolate(h, w, min_size, max_size):
    rng = np.random.default_rng(h * 1000 + w)
    image = rng.normal(0, 1.2, (h, w, 3)).astype(np.float32)
    scale = min(min_size / min(h, w), max_size / max(h, w))
    theirs = _torch_resize(image, scale)
    out_hw = preprocess.resized_size(h, w, min_size, max_size)
    assert out_hw == theirs.shape[:2]
    ours = preprocess.resize_bilinear(image, out_hw)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=2e-7, rtol=0)
    # In fact bit for bit, FMA rounding included (an ulp at 4.0 is 4.8e-7, beyond the tolerance).
    assert (ours == theirs).mean() > 0.9999


def test_resize_bilinear_many_sizes():
    """Output sizes 1..160 from a 23 x 41 image (up and down; rows, columns and both), on both
    sides of torch's kernel switch at oh + ow = 128."""
    rng = np.random.default_rng(0)
    image = rng.uniform(-2.2, 2.7, (23, 41, 3)).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    for n in range(1, 161, 3):
        for out_hw in ((n, 41), (23, n), (n, (n * 7) % 160 + 1)):
            theirs = torch.nn.functional.interpolate(x, size=out_hw, mode='bilinear', align_corners=False)
            theirs = theirs[0].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(preprocess.resize_bilinear(image, out_hw), theirs, err_msg=str(out_hw))


def test_normalize_and_resize_match_generalized_rcnn_transform():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (211, 173, 3), dtype=np.uint8)
    tr = GeneralizedRCNNTransform(96, 160, list(MEAN), list(STD)).eval()
    with torch.no_grad():
        il, _ = tr([torch.from_numpy(image).permute(2, 0, 1).float().div(255)])
    rh, rw = il.image_sizes[0]
    x = preprocess.normalize(image, 1 / 255, MEAN, STD)
    np.testing.assert_allclose(x, ((image / np.float32(255)) - np.float32(MEAN)) / np.float32(STD), atol=1e-6)
    ours = preprocess.resize_bilinear(x, preprocess.resized_size(211, 173, 96, 160))
    theirs = il.tensors[0].permute(1, 2, 0).numpy()
    assert ours.shape[:2] == (rh, rw)
    np.testing.assert_array_equal(ours, theirs[:rh, :rw])
    assert (theirs[rh:] == 0).all() and (theirs[:, rw:] == 0).all()
    canvas = preprocess.place_on_canvas(ours, (256, 192))
    assert canvas.shape == (256, 192, 3)
    np.testing.assert_array_equal(canvas[:rh, :rw], ours)
    assert (canvas[rh:] == 0).all() and (canvas[:, rw:] == 0).all()


def test_normalize_bgr_and_scale():
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 10
    out = preprocess.normalize(image, 1.0, (1.0, 2.0, 3.0), (2.0, 2.0, 2.0), 'BGR')
    np.testing.assert_allclose(out, (image[:, :, ::-1].astype(np.float32) - [1, 2, 3]) / 2)


def test_resized_size_matches_torchvision_image_sizes():
    rng = np.random.default_rng(2)
    cases = [(425, 640, 800, 1333), (640, 427, 800, 1333), (500, 381, 800, 1333), (480, 640, 800, 1333),
             (1, 1, 800, 1333), (3, 1000, 800, 1333), (1000, 3, 320, 512), (799, 1333, 800, 1333),
             (599, 899, 600, 1000)]
    cases += [(int(rng.integers(8, 700)), int(rng.integers(8, 700)), int(m), int(m * r))
              for m, r in zip(rng.integers(32, 400, 40), rng.uniform(1.0, 2.5, 40))]
    for h, w, mn, mx in cases:
        tr = GeneralizedRCNNTransform(mn, mx, list(MEAN), list(STD)).eval()
        with torch.no_grad():
            il, _ = tr([torch.zeros(3, h, w)])
        assert preprocess.resized_size(h, w, mn, mx) == tuple(il.image_sizes[0]), (h, w, mn, mx)


def test_detectron2_resize_reference_is_detectron2s_own():
    """The transcribed reference computes what the vendored Detectron2 source computes (compiled
    from its text: the module itself does not import without fvcore)."""
    theirs = detectron2_source_function('detectron2/data/transforms/augmentation_impl.py',
                                        'ResizeShortestEdge.get_output_shape')
    if theirs is None:
        pytest.skip('Detectron2 source not found at ../shared/vendor/detectron2')
    rng = np.random.default_rng(4)
    cases = [(int(h), int(w), int(m), int(m * r)) for h, w, m, r in zip(
        rng.integers(1, 3000, 500), rng.integers(1, 3000, 500), rng.integers(16, 1400, 500),
        rng.uniform(1.0, 2.5, 500))]
    for case in cases + [(480, 640, 800, 1333), (640, 480, 800, 1333), (500, 500, 640, 1000)]:
        assert detectron2_resize_shape(*case) == theirs(*case), case


def test_resized_size_detectron2_rule():
    rng = np.random.default_rng(3)
    cases = [(425, 640, 800, 1333), (640, 427, 800, 1333), (500, 381, 800, 1333), (480, 640, 800, 1333),
             (3, 1000, 800, 1333), (500, 500, 640, 1000)]
    cases += [(int(rng.integers(8, 2000)), int(rng.integers(8, 2000)), int(m), int(m * r))
              for m, r in zip(rng.integers(32, 1000, 300), rng.uniform(1.0, 2.5, 300))]
    differ = 0
    for h, w, mn, mx in cases:
        ours = preprocess.resized_size(h, w, mn, mx, 'round')
        assert ours == detectron2_resize_shape(h, w, mn, mx), (h, w, mn, mx)
        differ += ours != preprocess.resized_size(h, w, mn, mx, 'floor')
    assert differ > 10, 'the cases should tell rounding from flooring'
    with pytest.raises(ValueError, match='resize rule'):
        preprocess.resized_size(10, 10, 8, 8, 'pil')


def test_default_buckets():
    b = preprocess.default_buckets(800, 1333)
    assert b == [(800, 1088), (1088, 800), (800, 1216), (1216, 800), (800, 1344), (1344, 800)]
    assert preprocess.default_buckets(128, 128) == [(128, 128)]
    assert preprocess.default_buckets(320, 512) == [(320, 448), (448, 320), (320, 480), (480, 320),
                                                    (320, 512), (512, 320)]
    for bucket in b:
        assert bucket[0] % 32 == 0 and bucket[1] % 32 == 0


def test_every_image_fits_a_default_bucket():
    rng = np.random.default_rng(4)
    buckets = preprocess.default_buckets(800, 1333)
    for h, w in list(zip(rng.integers(1, 3000, 300), rng.integers(1, 3000, 300))) + [(480, 640), (640, 480)]:
        rh, rw = preprocess.resized_size(int(h), int(w), 800, 1333)
        padded = (math.ceil(rh / 32) * 32, math.ceil(rw / 32) * 32)
        bucket = preprocess.choose_bucket(padded, buckets)
        assert bucket is not None and bucket[0] >= padded[0] and bucket[1] >= padded[1]
        smaller = [c for c in buckets if c[0] * c[1] < bucket[0] * bucket[1]]
        assert not any(c[0] >= padded[0] and c[1] >= padded[1] for c in smaller)
    # A 4:3 photo lands on the 4:3 canvas, a 3:2 one on the 3:2 canvas, a wider one on the wide one.
    assert preprocess.choose_bucket((800, 1088), buckets) == (800, 1088)
    assert preprocess.choose_bucket((800, 1120), buckets) == (800, 1216)
    assert preprocess.choose_bucket((800, 1216), buckets) == (800, 1216)
    assert preprocess.choose_bucket((800, 1248), buckets) == (800, 1344)
    assert preprocess.choose_bucket((1088, 800), buckets) == (1088, 800)


def test_choose_bucket():
    buckets = [(256, 256), (128, 384), (384, 128)]
    assert preprocess.choose_bucket((96, 96), buckets) == (128, 384)       # smallest area, then (h, w)
    assert preprocess.choose_bucket((160, 96), buckets) == (384, 128)      # 49152 < 65536 px
    assert preprocess.choose_bucket((160, 160), buckets) == (256, 256)
    assert preprocess.choose_bucket((96, 300), buckets) == (128, 384)
    assert preprocess.choose_bucket((300, 96), buckets) == (384, 128)
    assert preprocess.choose_bucket((416, 96), buckets) is None
    assert preprocess.choose_bucket((64, 64), []) is None


@pytest.mark.parametrize('shape', [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_as_rgb_uint8_accepts(shape):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    out = preprocess.as_rgb_uint8(image)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    if len(shape) == 2:
        assert (out == image[:, :, None]).all()
    elif shape[2] == 1:
        assert (out == image).all()
    else:
        np.testing.assert_array_equal(out, image[:, :, :3])


@pytest.mark.parametrize('image, words', [
    (np.zeros((5, 7, 2), np.uint8), ['(5, 7, 2)']),
    (np.zeros((1, 5, 7, 3), np.uint8), ['(1, 5, 7, 3)']),
    (np.zeros((5,), np.uint8), ['(5,)']),
    (np.zeros((5, 7, 3), np.float32), ['float32', '(5, 7, 3)']),
    (np.zeros((5, 7, 3), np.uint16), ['uint16']),
])
def test_as_rgb_uint8_rejects(image, words):
    with pytest.raises(ValueError) as e:
        preprocess.as_rgb_uint8(image)
    for word in words:
        assert word in str(e.value)
