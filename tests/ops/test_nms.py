"""mrcnn_jax.ops.nms against torchvision.ops.nms / batched_nms (exact: same kept set and order)."""

import functools

import numpy as np
import pytest

import jax

from mrcnn_jax.ops.nms import float32_threshold, nms

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


def _random_boxes(rng, n, extent=None):
    """Many overlapping boxes: n boxes of 4..64 px in a square whose side grows like sqrt(n)."""
    extent = extent or 40.0 + 6.0 * np.sqrt(n)
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(4, 64, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _distinct_scores(rng, n):
    """Scores without ties (so that batched_nms' final unstable sort is unambiguous)."""
    return (rng.permutation(n) / n + rng.uniform(0, 0.1 / n, n)).astype(np.float32)


def _reference(boxes, scores, valid, thr, idxs=None):
    """torchvision on the valid boxes only, mapped back to input indices."""
    sel = np.nonzero(valid)[0]
    b, s = torch.from_numpy(boxes[sel]), torch.from_numpy(scores[sel])
    if idxs is None:
        keep = torchvision.ops.nms(b, s, thr)
    else:
        keep = torchvision.ops.batched_nms(b, s, torch.from_numpy(idxs[sel]), thr)
    return sel[keep.numpy()]


@functools.lru_cache(maxsize=None)
def _jitted(thr, max_output, batched, tile_size=512):
    if batched:
        return jax.jit(lambda b, s, v, i: nms(b, s, v, thr, max_output, idxs=i, tile_size=tile_size))
    return jax.jit(lambda b, s, v: nms(b, s, v, thr, max_output, tile_size=tile_size))


def _kept(indices, keep_valid):
    indices, keep_valid = np.asarray(indices), np.asarray(keep_valid)
    assert indices.dtype == np.int32 and keep_valid.dtype == np.bool_
    # Valid rows come first; padding rows are index 0.
    count = int(keep_valid.sum())
    assert keep_valid[:count].all() and not keep_valid[count:].any()
    assert (indices[count:] == 0).all()
    return indices[:count]


@pytest.mark.parametrize('n', [10, 300, 2000])
@pytest.mark.parametrize('thr', [0.3, 0.5, 0.7])
def test_matches_torchvision_nms(n, thr):
    rng = np.random.default_rng(n + int(thr * 10))
    boxes = _random_boxes(rng, n)
    scores = _distinct_scores(rng, n)
    valid = rng.random(n) > 0.15
    got = _kept(*_jitted(thr, n, False)(boxes, scores, valid))
    ref = _reference(boxes, scores, valid, thr)
    assert 0 < len(ref) < valid.sum() or n == 10
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize('n', [300, 2000])  # 300: torchvision's coordinate trick; 2000: its per-class loop
@pytest.mark.parametrize('thr', [0.3, 0.5, 0.7])
def test_matches_torchvision_batched_nms(n, thr):
    rng = np.random.default_rng(7 * n + int(thr * 10))
    boxes = _random_boxes(rng, n)
    scores = _distinct_scores(rng, n)
    valid = rng.random(n) > 0.15
    idxs = rng.integers(0, 5, n).astype(np.int64)
    got = _kept(*_jitted(thr, n, True)(boxes, scores, valid, idxs.astype(np.int32)))
    ref = _reference(boxes, scores, valid, thr, idxs)
    np.testing.assert_array_equal(got, ref)
    # Class-aware: more is kept than by class-agnostic NMS.
    assert len(ref) > len(_reference(boxes, scores, valid, thr))


def test_small_tiles_and_score_ties():
    """Tiling must not change the result; ties keep the lower input index first (stable sort),
    which is also what torchvision's CPU sort does."""
    rng = np.random.default_rng(3)
    n = 700
    boxes = _random_boxes(rng, n)
    scores = rng.integers(0, 20, n).astype(np.float32) / 20  # many ties
    valid = rng.random(n) > 0.1
    ref = _reference(boxes, scores, valid, 0.5)
    for tile in (64, 100):
        got = _kept(*_jitted(0.5, n, False, tile)(boxes, scores, valid))
        np.testing.assert_array_equal(got, ref)
    # Two identical boxes with the same score: the lower index survives.
    b = np.array([[0, 0, 10, 10]] * 3, np.float32)
    got = _kept(*nms(b, np.ones(3, np.float32), np.ones(3, bool), 0.5, 3))
    np.testing.assert_array_equal(got, [0])


def test_max_output_truncation():
    rng = np.random.default_rng(4)
    n = 1000
    boxes = _random_boxes(rng, n)
    scores = _distinct_scores(rng, n)
    valid = rng.random(n) > 0.2
    ref = _reference(boxes, scores, valid, 0.7)
    assert len(ref) > 300
    for max_output in (1, 300):
        indices, keep_valid = _jitted(0.7, max_output, False, 128)(boxes, scores, valid)
        assert indices.shape == (max_output,)
        np.testing.assert_array_equal(_kept(indices, keep_valid), ref[:max_output])
    # More output slots than boxes: padded.
    got = _kept(*nms(boxes[:20], scores[:20], valid[:20], 0.7, 50))
    np.testing.assert_array_equal(got, _reference(boxes[:20], scores[:20], valid[:20], 0.7))


def test_all_invalid_and_empty():
    rng = np.random.default_rng(5)
    boxes = _random_boxes(rng, 50)
    indices, keep_valid = nms(boxes, _distinct_scores(rng, 50), np.zeros(50, bool), 0.5, 20)
    assert not np.asarray(keep_valid).any() and (np.asarray(indices) == 0).all()
    indices, keep_valid = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, bool), 0.5, 4)
    assert indices.shape == (4,) and not np.asarray(keep_valid).any()


def test_vmap_over_batch():
    rng = np.random.default_rng(6)
    b, n, max_output = 3, 400, 250
    boxes = np.stack([_random_boxes(rng, n) for _ in range(b)])
    scores = np.stack([_distinct_scores(rng, n) for _ in range(b)])
    valid = rng.random((b, n)) > 0.3
    valid[2] = False  # one image without any valid box
    fn = jax.jit(jax.vmap(lambda bx, s, v: nms(bx, s, v, 0.5, max_output, tile_size=128)))
    indices, keep_valid = fn(boxes, scores, valid)
    assert indices.shape == (b, max_output) and keep_valid.shape == (b, max_output)
    for i in range(b):
        ref = _reference(boxes[i], scores[i], valid[i], 0.5)[:max_output]
        np.testing.assert_array_equal(_kept(indices[i], keep_valid[i]), ref)


def test_degenerate_zero_area_boxes():
    """0/0 IoU is nan in torchvision, and nan > thr is False: such pairs never suppress."""
    rng = np.random.default_rng(8)
    boxes = _random_boxes(rng, 60)
    boxes[:10, 2] = boxes[:10, 0]  # zero width
    boxes[10:20] = boxes[0]  # identical degenerate copies (0/0)
    boxes[20:25, 2:] = boxes[20:25, :2]  # points
    boxes[25:30] = boxes[20]
    scores = _distinct_scores(rng, 60)
    valid = np.ones(60, bool)
    ref = _reference(boxes, scores, valid, 0.5)
    assert set(range(10, 20)) <= set(ref.tolist())  # identical degenerate boxes all kept
    np.testing.assert_array_equal(_kept(*nms(boxes, scores, valid, 0.5, 60)), ref)


@pytest.mark.parametrize('thr, rounds_up', [(0.3, True), (0.6, True), (0.7, False), (0.5, False)])
def test_float32_threshold_edge(thr, rounds_up):
    """torchvision compares the float32 IoU with a double threshold.

    Boxes [0,0,10,1] and [0,0,k,1] have float32 IoU fl(k / 10) = float32(thr) (k = 10 * thr,
    inter = k, union = 10 + k - k = 10 exactly). When float32(thr) > thr (0.3, 0.6) torchvision
    suppresses the second box although a float32 comparison `iou > float32(thr)` would keep it.
    """
    assert (float(np.float32(thr)) > thr) == rounds_up
    k = round(10 * thr)
    boxes = np.array([[0, 0, 10, 1], [0, 0, k, 1], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    valid = np.ones(3, bool)
    ref = _reference(boxes, scores, valid, thr)
    np.testing.assert_array_equal(ref, [0, 2] if rounds_up else [0, 1, 2])
    np.testing.assert_array_equal(_kept(*nms(boxes, scores, valid, thr, 3)), ref)
    np.testing.assert_array_equal(_kept(*_jitted(thr, 3, False)(boxes, scores, valid)), ref)


def test_float32_threshold_helper():
    rng = np.random.default_rng(9)
    for thr in (0.1, 0.3, 0.5, 0.6, 0.7, 0.95, 1.0 / 3.0):
        t = float32_threshold(thr)
        assert t.dtype == np.float32 and float(t) <= thr
        f32 = np.float32(thr)
        near = np.concatenate([
            np.nextafter(f32, np.float32(np.inf)) * np.ones(1, np.float32), f32 * np.ones(1, np.float32),
            np.nextafter(f32, np.float32(-np.inf)) * np.ones(1, np.float32),
            rng.uniform(thr - 1e-6, thr + 1e-6, 100).astype(np.float32)])
        np.testing.assert_array_equal(near > t, near.astype(np.float64) > thr)


def _rounding_sensitive_pairs(count):
    """Box pairs whose float32 IoU changes if any product in it were fused into an FMA (XLA
    contracts mul+add inside a fusion): area_a = w_a * h_a or area_b fused into area_a + area_b,
    or inter = w * h fused into (area_a + area_b) - inter. Pairs sensitive to all three."""
    rng = np.random.default_rng(10)
    n = 2000
    a = rng.uniform(0, 50, (n, 2)).astype(np.float32)
    a = np.concatenate([a, a + rng.uniform(5, 40, (n, 2)).astype(np.float32)], 1)
    b = (a + rng.uniform(-10, 10, (n, 4)).astype(np.float32)).astype(np.float32)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    wb, hb = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    area_a, area_b = wa * ha, wb * hb
    w = np.maximum(np.float32(0), np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]))
    h = np.maximum(np.float32(0), np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]))
    inter = w * h
    iou = inter / (area_a + area_b - inter)  # numpy: no contraction, as torchvision's kernel
    f64 = np.float64  # products of float32s are exact in float64: emulate fma(x, y, z)
    fused_a = inter / ((f64(wa) * ha + area_b).astype(np.float32) - inter)
    fused_b = inter / ((f64(wb) * hb + area_a).astype(np.float32) - inter)
    fused_i = inter / (f64(area_a + area_b) - f64(w) * h).astype(np.float32)
    sel = np.nonzero((fused_a != iou) & (fused_b != iou) & (fused_i != iou))[0][:count]
    assert len(sel) == count
    return a[sel], b[sel], iou[sel]


def test_iou_rounding_is_torchvisions():
    """Thresholds equal to the pair's IoU (kept: not strictly greater) and one float32 below it
    (suppressed): any ulp of difference in our IoU flips one of the two decisions."""
    a, b, iou = _rounding_sensitive_pairs(2)
    scores = np.array([0.9, 0.8], np.float32)
    valid = np.ones(2, bool)
    for box_a, box_b, f in zip(a, b, iou):
        boxes = np.stack([box_a, box_b])
        for thr in (float(f), float(np.nextafter(f, np.float32(0)))):
            ref = _reference(boxes, scores, valid, thr)
            np.testing.assert_array_equal(ref, [0, 1] if thr == float(f) else [0])
            np.testing.assert_array_equal(_kept(*_jitted(thr, 2, False)(boxes, scores, valid)), ref)
