"""Mask pasting (ops/paste.py): the host paste against torchvision's paste_masks_in_image, its
thresholded and chunked paths, and the device paste against the host paste."""

import jax
import numpy as np
import pytest

from mrcnn_jax.ops import resample
from mrcnn_jax.ops.paste import expand_boxes_to_pixels, iter_pasted_masks, paste_masks, paste_masks_to_canvas


def _torch_and_roi_heads():
    """torch and torchvision's roi_heads, or a skip (the device tests below need neither)."""
    return pytest.importorskip('torch'), pytest.importorskip('torchvision.models.detection.roi_heads')


def _random_boxes(rng, n, image_hw, max_size=None):
    """[n, 4] float32 xyxy: fractional, tiny (< 1 px) to larger than the image, many crossing the
    image border or at negative coordinates."""
    h, w = image_hw
    max_size = max_size or 1.5 * max(h, w)
    centre = rng.uniform(-0.3, 1.3, (n, 2)) * np.array([w, h])
    size = np.exp(rng.uniform(np.log(0.05), np.log(max_size), (n, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    boxes[: n // 8, :2] = np.round(boxes[: n // 8, :2])  # integer corners; may invert tiny boxes
    boxes[-2:, 2:] = boxes[-2:, :2] - np.float32(1.5)  # inverted (x2 < x1): torchvision pastes nothing
    return boxes


def _overlaps_image(boxes, mask_size, padding, image_hw):
    x1, y1, x2, y2 = expand_boxes_to_pixels(boxes, mask_size, padding).T
    return (x2 >= 0) & (y2 >= 0) & (x1 < image_hw[1]) & (y1 < image_hw[0])


def _torchvision_paste(masks, boxes, image_hw, padding):
    torch, roi_heads = _torch_and_roi_heads()
    out = roi_heads.paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                                         tuple(int(v) for v in image_hw), padding)
    return out[:, 0].numpy()


# ----------------------------------------------------------------------------------------------
# Host paste against torchvision


def test_expand_boxes_truncates_like_torchvision():
    torch, roi_heads = _torch_and_roi_heads()
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 2000, (60, 90))
    want = roi_heads.expand_boxes(torch.from_numpy(boxes), 30 / 28).to(torch.int64).numpy()
    np.testing.assert_array_equal(expand_boxes_to_pixels(boxes, 28, 1), want)
    assert (boxes[:, 0] < 0).any()  # the negative-coordinate case (truncation, not floor) is hit


@pytest.mark.parametrize('padding', [1, 0, 2])
def test_paste_masks_matches_torchvision(padding):
    rng = np.random.default_rng(padding)
    worst = 0.0
    for image_hw in [(1, 1), (3, 7), (37, 53), (64, 48), (120, 90), (97, 203)]:
        masks = rng.random((60, 28, 28), dtype=np.float32)
        masks[:5] = 1.0  # saturated masks show the zero-padded border
        boxes = _random_boxes(rng, 60, image_hw)
        inside = _overlaps_image(boxes, 28, padding, image_hw)
        assert inside.sum() > 20
        ours = paste_masks(masks, boxes, image_hw, padding=padding, chunk_size=7)
        assert ours.shape == (60, *image_hw) and ours.dtype == np.float32
        # torchvision raises or pastes nothing for a box wholly outside the image; ours is zero.
        assert not ours[~inside].any()
        want = _torchvision_paste(masks[inside], boxes[inside], image_hw, padding)
        np.testing.assert_allclose(ours[inside], want, rtol=0, atol=1e-6)
        worst = max(worst, float(np.abs(ours[inside] - want).max()))
    assert worst < 1e-6


def test_paste_masks_mask_rcnn_sizes():
    # Detections of realistic sizes in an 800 x 1333 image, fully inside.
    rng = np.random.default_rng(3)
    image_hw = (480, 640)
    masks = rng.random((30, 28, 28), dtype=np.float32)
    xy = rng.uniform(0, 400, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 240, (30, 2))], axis=1).astype(np.float32)
    want = _torchvision_paste(masks, boxes, image_hw, 1)
    np.testing.assert_allclose(paste_masks(masks, boxes, image_hw), want, rtol=0, atol=1e-6)


def test_threshold_and_chunks_agree_with_float_paste():
    rng = np.random.default_rng(4)
    image_hw = (70, 90)
    masks = rng.random((23, 28, 28), dtype=np.float32)
    boxes = _random_boxes(rng, 23, image_hw)
    full = paste_masks(masks, boxes, image_hw, chunk_size=100)
    np.testing.assert_array_equal(paste_masks(masks, boxes, image_hw, chunk_size=1), full)
    binary = paste_masks(masks, boxes, image_hw, threshold=0.5, chunk_size=5)
    assert binary.dtype == np.bool_
    np.testing.assert_array_equal(binary, full > 0.5)
    chunks = list(iter_pasted_masks(masks, boxes, image_hw, threshold=0.5, chunk_size=10, layout='nwh'))
    assert [c.shape for c in chunks] == [(10, 90, 70), (10, 90, 70), (3, 90, 70)]
    np.testing.assert_array_equal(np.concatenate(chunks).transpose(0, 2, 1), full > 0.5)


def test_empty_and_outside():
    empty = paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (5, 6))
    assert empty.shape == (0, 5, 6) and empty.dtype == np.float32
    outside = np.array([[-50, -50, -20, -20], [100, 0, 140, 10], [0, 30, 10, 90]], np.float32)
    assert not paste_masks(np.ones((3, 28, 28), np.float32), outside, (20, 40)).any()
    with pytest.raises(ValueError):
        paste_masks(np.ones((2, 28, 28), np.float32), outside, (20, 40))


# ----------------------------------------------------------------------------------------------
# Device paste against the host paste


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
    prob = np.asarray(jax.jit(lambda m, b: paste_masks_to_canvas(m, b, canvas))(masks, boxes))
    binary = np.asarray(jax.jit(lambda m, b: paste_masks_to_canvas(m, b, canvas, threshold=0.5))(
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
    rng = np.random.default_rng(2)
    boxes = rng.uniform(-30, 500, (200, 4)).astype(np.float32)
    device = jax.jit(lambda b: expand_boxes_to_pixels(b, 28, xp=jax.numpy))(boxes)
    np.testing.assert_array_equal(np.asarray(device), expand_boxes_to_pixels(boxes, 28))
