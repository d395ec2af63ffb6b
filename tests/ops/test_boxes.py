"""mrcnn_jax.ops.boxes against torchvision's BoxCoder, box_iou, clip_boxes_to_image and
remove_small_boxes."""

import math

import numpy as np
import pytest

import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
from torchvision.models.detection._utils import BoxCoder  # noqa: E402
from torchvision.ops import boxes as tv_boxes  # noqa: E402


def _random_boxes(rng, n, extent=200.0, min_side=1.0, max_side=120.0):
    xy = rng.uniform(-20, extent, (n, 2))
    wh = rng.uniform(min_side, max_side, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_matches_torchvision(weights):
    rng = np.random.default_rng(0)
    ref = _random_boxes(rng, 500)
    gt = _random_boxes(rng, 500)
    coder = BoxCoder(weights)
    theirs = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(ref)).numpy()
    ours = np.asarray(box_ops.encode_boxes(jnp.asarray(gt), jnp.asarray(ref), weights))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_matches_torchvision_including_clamp(weights):
    rng = np.random.default_rng(1)
    ref = _random_boxes(rng, 600)
    deltas = rng.normal(0, 1.0, (600, 4)).astype(np.float32) * np.asarray(weights, np.float32)
    # A third of the rows have huge size deltas, which must be clamped at log(1000/16).
    deltas[::3, 2:] = rng.uniform(5, 50, (200, 2)).astype(np.float32) * np.asarray(weights[2:], np.float32)
    coder = BoxCoder(weights)   # default bbox_xform_clip = log(1000/16)
    theirs = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(ref)).numpy()
    ours = np.asarray(box_ops.decode_boxes(jnp.asarray(deltas), jnp.asarray(ref), weights))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)
    # The clamped rows: width is exactly 1000/16 times the reference width.
    w_ref = ref[::3, 2] - ref[::3, 0]
    np.testing.assert_allclose(ours[::3, 2] - ours[::3, 0], w_ref * 1000 / 16, rtol=1e-5)
    assert box_ops.BBOX_XFORM_CLIP == pytest.approx(math.log(1000.0 / 16))


def test_decode_inverts_encode_and_broadcasts():
    rng = np.random.default_rng(2)
    ref = _random_boxes(rng, 24).reshape(2, 12, 4)
    gt = _random_boxes(rng, 24).reshape(2, 12, 4)
    w = (10.0, 10.0, 5.0, 5.0)
    d = box_ops.encode_boxes(jnp.asarray(gt), jnp.asarray(ref), w)
    assert d.shape == (2, 12, 4)
    back = np.asarray(box_ops.decode_boxes(d, jnp.asarray(ref), w))
    np.testing.assert_allclose(back, gt, rtol=1e-5, atol=1e-3)
    # bfloat16 deltas are decoded in float32.
    out = box_ops.decode_boxes(d.astype(jnp.bfloat16), jnp.asarray(ref), w)
    assert out.dtype == jnp.float32


def test_pairwise_iou_matches_box_iou():
    rng = np.random.default_rng(3)
    a = _random_boxes(rng, 70, extent=100)
    b = _random_boxes(rng, 90, extent=100)
    b[:5] = a[:5]                      # identical boxes: IoU 1
    b[5] = [1000, 1000, 1010, 1010]    # disjoint: IoU 0
    theirs = tv_boxes.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ours = np.asarray(box_ops.pairwise_iou(jnp.asarray(a), jnp.asarray(b)))
    assert ours.shape == (70, 90)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.diag(ours[:5, :5]), 1.0, rtol=1e-6)
    assert (ours[:, 5] == 0).all()
    assert ours.max() <= 1.0 and ours.min() >= 0.0
    # Batched form.
    batched = np.asarray(box_ops.pairwise_iou(jnp.asarray(np.stack([a, a])), jnp.asarray(np.stack([b, b]))))
    np.testing.assert_array_equal(batched[1], ours)


def test_clip_matches_clip_boxes_to_image():
    rng = np.random.default_rng(4)
    boxes = rng.uniform(-80, 400, (300, 4)).astype(np.float32)
    for hw in [(200, 300), (333, 127)]:
        theirs = tv_boxes.clip_boxes_to_image(torch.from_numpy(boxes), hw).numpy()
        ours = np.asarray(box_ops.clip_boxes(jnp.asarray(boxes), jnp.asarray(hw, jnp.float32)))
        np.testing.assert_array_equal(ours, theirs)
    # Per-image sizes broadcast over a batch: [B, N, 4] with [B, 1, 2].
    hws = np.asarray([[200, 300], [333, 127]], np.float32)
    batched = np.asarray(box_ops.clip_boxes(jnp.asarray(np.stack([boxes, boxes])), jnp.asarray(hws[:, None])))
    for i, hw in enumerate([(200, 300), (333, 127)]):
        np.testing.assert_array_equal(batched[i], tv_boxes.clip_boxes_to_image(torch.from_numpy(boxes), hw).numpy())


@pytest.mark.parametrize('min_size', [1e-3, 1e-2, 4.0])
def test_nonsmall_boxes_matches_remove_small_boxes(min_size):
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 100, (400, 2))
    wh = rng.choice([0.0, 1e-3, 5e-3, 1e-2, 0.5, 3.999, 4.0, 4.5, 10.0], (400, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    keep = tv_boxes.remove_small_boxes(torch.from_numpy(boxes), min_size).numpy()
    ours = np.asarray(box_ops.nonsmall_boxes(jnp.asarray(boxes), min_size))
    assert 0 < ours.sum() < len(ours)
    np.testing.assert_array_equal(np.nonzero(ours)[0], keep)


def test_box_area_and_scale():
    b = jnp.asarray([[1.0, 2.0, 4.0, 8.0], [0.0, 0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(np.asarray(box_ops.box_area(b)), [18.0, 0.0])
    s = np.asarray(box_ops.scale_boxes(b, jnp.asarray([2.0, 3.0])))   # (scale_h, scale_w)
    np.testing.assert_array_equal(s, [[3.0, 4.0, 12.0, 16.0], [0.0, 0.0, 0.0, 10.0]])
