"""paste_masks against torchvision's paste_masks_in_image, and its thresholded / RLE paths."""

import numpy as np
import pytest

from mrcnn_jax.ops import masks as masks_lib
from mrcnn_jax.ops.masks import (encode_rle, expand_boxes_to_pixels, iter_pasted_masks, paste_masks,
                                 paste_masks_to_rle)

torch = pytest.importorskip('torch')
F = torch.nn.functional
roi_heads = pytest.importorskip('torchvision.models.detection.roi_heads')
# pycocotools 2.0.x with numpy 2 warns on every decode.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')


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
    out = roi_heads.paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                                         tuple(int(v) for v in image_hw), padding)
    return out[:, 0].numpy()


@pytest.mark.parametrize('in_size', [28, 30, 32])
def test_linear_taps_equal_torch_upsample(in_size):
    # Interpolating the identity (basis images as channels) gives torch's weight matrix exactly.
    eye = torch.eye(in_size).reshape(1, in_size, in_size, 1)
    for out_size in list(range(1, 400)) + [511, 800, 1333, 2047]:
        want = F.interpolate(eye, size=(out_size, 1), mode='bilinear', align_corners=False)
        want = want[0, :, :, 0].T.numpy()
        taps = masks_lib.linear_taps(np.arange(out_size)[None], np.array([out_size]), in_size)
        i0, i1, w0, w1 = (a[0] for a in taps)
        got = np.zeros((out_size, in_size), np.float32)
        got[np.arange(out_size), i0] = w0
        got[np.arange(out_size), i1] += w1
        np.testing.assert_array_equal(got, want, err_msg=f'out_size={out_size}')


def test_expand_boxes_truncates_like_torchvision():
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


def test_rle_paths_equal_encoding_the_full_mask():
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(5)
    image_hw = (45, 66)
    masks = rng.random((19, 28, 28), dtype=np.float32)
    boxes = _random_boxes(rng, 19, image_hw)
    binary = paste_masks(masks, boxes, image_hw) > 0.5
    want = [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary]
    for rle in want:
        rle['counts'] = rle['counts'].decode('ascii')
    assert paste_masks_to_rle(masks, boxes, image_hw, chunk_size=4) == want
    assert encode_rle(binary, chunk_size=3) == want
    assert encode_rle(paste_masks(masks, boxes, image_hw)) == want  # float input: > 0.5
    assert all(isinstance(r['counts'], str) and r['size'] == list(image_hw) for r in want)
    np.testing.assert_array_equal(mask_util.decode(want).transpose(2, 0, 1), binary)


def test_empty_and_outside():
    empty = paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (5, 6))
    assert empty.shape == (0, 5, 6) and empty.dtype == np.float32
    assert paste_masks_to_rle(np.zeros((0, 28, 28)), np.zeros((0, 4)), (5, 6)) == []
    outside = np.array([[-50, -50, -20, -20], [100, 0, 140, 10], [0, 30, 10, 90]], np.float32)
    assert not paste_masks(np.ones((3, 28, 28), np.float32), outside, (20, 40)).any()
    with pytest.raises(ValueError):
        paste_masks(np.ones((2, 28, 28), np.float32), outside, (20, 40))
