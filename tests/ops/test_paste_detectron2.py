"""Detectron2's mask paste (ops/paste.py, rule='pixel_centers') against Detectron2's own
`detectron2.layers.mask_ops` from the vendored source (../shared/vendor/detectron2): the host paste
bit for bit (probabilities and thresholded masks), the device paste to float32 rounding, and both
unlike torchvision's rule on the same inputs."""

import pathlib
import sys
import warnings

import pytest

torch = pytest.importorskip('torch')  # before anything that imports tensorflow (tests/conftest.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mrcnn_jax.ops import resample  # noqa: E402
from mrcnn_jax.ops.paste import (  # noqa: E402
    detectron2_windows, iter_pasted_masks, paste_masks, paste_masks_to_canvas)

DETECTRON2_SOURCE = pathlib.Path(__file__).resolve().parents[2] / '..' / 'shared' / 'vendor' / 'detectron2'


@pytest.fixture(scope='module')
def mask_ops():
    """detectron2.layers.mask_ops, imported from the vendored source; torch on one thread meanwhile
    (Detectron2 pastes box by box: tiny ops, which torch's thread pool slows down ~1000 times on a
    busy machine)."""
    if not (DETECTRON2_SOURCE / 'detectron2' / 'layers' / 'mask_ops.py').exists():
        pytest.skip(f'Detectron2 source not found at {DETECTRON2_SOURCE.resolve()}')
    root = str(DETECTRON2_SOURCE.resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script_if_tracing's deprecation
        from detectron2.layers import mask_ops
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield mask_ops
    torch.set_num_threads(threads)


def _probabilities(rng, shape):
    """Mask probabilities with spread: sigmoid of N(0, 2), few near 0 or 1."""
    return (1 / (1 + np.exp(-2 * rng.standard_normal(shape)))).astype(np.float32)


def _boxes(rng, n, image_hw):
    """[n, 4] float32 xyxy: sub-pixel to 1.5x the image, fractional, many across the border."""
    h, w = image_hw
    centre = rng.uniform(-0.2, 1.2, (n, 2)) * np.array([w, h])
    size = np.exp(rng.uniform(np.log(0.05), np.log(1.5 * max(h, w, 60)), (n, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    boxes[: n // 10] = np.round(boxes[: n // 10])  # integer corners
    boxes[: n // 10, 2:] = np.maximum(boxes[: n // 10, 2:], boxes[: n // 10, :2] + 1)
    boxes[-3:] = [[-0.4 * w - 30.3, 0.2 * h, 0.6 * w + 60.7, 1.3 * h + 90.2],    # over 84 px, across the border
                  [0.5 * w + 0.1, 0.5 * h + 0.2, 0.5 * w + 0.6, 0.5 * h + 0.45],  # sub-pixel, inside
                  [0.3 * w, 0.6 * h, 0.3 * w + 1.7, 0.6 * h + 2.2]]               # tiny
    return boxes


def _detectron2_cpu_can_paste(boxes, image_hw):
    """Detectron2's CPU paste raises (an inverted `torch.arange`) unless its window is ordered."""
    h, w = image_hw
    x_start = np.maximum(np.floor(boxes[:, 0]) - 1, 0)
    y_start = np.maximum(np.floor(boxes[:, 1]) - 1, 0)
    x_stop = np.minimum(np.ceil(boxes[:, 2]) + 1, w)
    y_stop = np.minimum(np.ceil(boxes[:, 3]) + 1, h)
    return (x_stop >= x_start) & (y_stop >= y_start)


def _detectron2_probabilities(mask_ops, masks, boxes, image_hw):
    """Detectron2's CPU paste before its threshold: `paste_masks_in_image`'s loop (one box at a
    time, skip_empty=True) writing `_do_paste_mask`'s probabilities into a zero image."""
    out = np.zeros((len(masks),) + tuple(image_hw), np.float32)
    for i in range(len(masks)):
        values, region = mask_ops._do_paste_mask(torch.from_numpy(masks[i:i + 1, None]),
                                                 torch.from_numpy(boxes[i:i + 1]), *image_hw, skip_empty=True)
        out[(i,) + region] = values[0].numpy()
    return out


def _detectron2_binary(mask_ops, masks, boxes, image_hw, threshold=0.5):
    return mask_ops.paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(boxes),
                                         tuple(image_hw), threshold).numpy()


IMAGE_SIZES = [(1, 1), (7, 5), (61, 83), (143, 217), (240, 353)]


@pytest.mark.parametrize('image_hw', IMAGE_SIZES)
def test_host_paste_is_detectron2s_bit_for_bit(mask_ops, image_hw):
    rng = np.random.default_rng(sum(image_hw))
    n = 120
    masks = _probabilities(rng, (n, 28, 28))
    boxes = _boxes(rng, n, image_hw)
    ok = _detectron2_cpu_can_paste(boxes, image_hw)
    probs = paste_masks(masks, boxes, image_hw, rule='pixel_centers', chunk_size=7)
    binary = paste_masks(masks, boxes, image_hw, threshold=0.5, rule='pixel_centers', chunk_size=7)
    assert probs.shape == binary.shape == (n,) + image_hw and binary.dtype == np.bool_
    assert not probs[~ok].any() and not binary[~ok].any()  # where Detectron2 raises: nothing
    masks, boxes, probs, binary = masks[ok], boxes[ok], probs[ok], binary[ok]
    want = _detectron2_probabilities(mask_ops, masks, boxes, image_hw)
    np.testing.assert_array_equal(probs, want)
    np.testing.assert_array_equal(binary, _detectron2_binary(mask_ops, masks, boxes, image_hw))
    # Another threshold: below 0.5 Detectron2's window can decide pixels (module docstring).
    np.testing.assert_array_equal(paste_masks(masks, boxes, image_hw, threshold=0.3, rule='pixel_centers'),
                                  _detectron2_binary(mask_ops, masks, boxes, image_hw, 0.3))
    # The cases are hit: sub-pixel, large (> 3M = 84 px, so the window cuts the fade), across the
    # image border, and masks with values strictly between 0 and 1 in the pasted output.
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (width < 1).any() and (height < 1).any() and (np.maximum(width, height) > 84).any()
    assert ((boxes[:, 0] < 0) | (boxes[:, 2] > image_hw[1])).any()
    if image_hw[0] > 10:
        assert ((want > 0.05) & (want < 0.95)).sum() > 1000 and (want >= 0.5).sum() > 1000
        # Torchvision's rule pastes the same predictions differently: the test tells them apart.
        tv = paste_masks(masks, boxes, image_hw)
        assert np.abs(tv - want).max() > 0.1 and (np.abs(tv - want) > 1e-3).mean() > 0.01
        assert ((tv > 0.5) != binary).sum() > 100


def test_host_paste_threshold_ties_are_detectron2s(mask_ops):
    """Probabilities at and within a few ulps of 0.5: torch's fused multiply-adds decide which
    pixels reach 0.5, and `>=` takes 0.5 itself; the thresholded paste still matches bit for bit."""
    rng = np.random.default_rng(7)
    image_hw = (97, 131)
    n = 40
    masks = (0.5 + rng.integers(-2, 3, (n, 28, 28)) * np.float32(2 ** -25)).astype(np.float32)
    masks[:8] = 0.5
    xy = rng.uniform(-2, 100, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 120, (n, 2))], axis=1).astype(np.float32)
    want = _detectron2_binary(mask_ops, masks, boxes, image_hw)
    for chunk_size in (1, 16):
        np.testing.assert_array_equal(
            paste_masks(masks, boxes, image_hw, threshold=0.5, rule='pixel_centers', chunk_size=chunk_size), want)
    probs = paste_masks(masks, boxes, image_hw, rule='pixel_centers')
    np.testing.assert_array_equal(probs, _detectron2_probabilities(mask_ops, masks, boxes, image_hw))
    near = np.abs(probs - 0.5) <= 1e-6
    assert (probs == 0.5).sum() > 1000 and (near & (probs < 0.5)).sum() > 1000 and (near & (probs > 0.5)).sum() > 100
    assert (paste_masks(masks, boxes, image_hw, threshold=0.5) != want).sum() > 1000  # torchvision: > 0.5


def test_window_only_cuts_probabilities_below_one_half(mask_ops):
    """Detectron2's CPU window (skip_empty) against its GPU path (every pixel sampled): they
    differ for boxes over 84 px, only at pixels below 0.5, so masks thresholded at 0.5 agree."""
    rng = np.random.default_rng(3)
    image_hw = (300, 400)
    masks = _probabilities(rng, (6, 28, 28))
    masks[:, :, [0, -1]] = 1.0  # saturated edges: the largest fade outside the box
    masks[:, [0, -1], :] = 1.0
    boxes = np.array([[50.3, 40.7, 350.2, 260.1], [100, 100, 190, 190], [20, 30, 60, 250],
                      [10.5, 10.5, 80.5, 80.5], [-40, -40, 500, 400], [120.2, 80.9, 300.4, 150.6]], np.float32)
    ours = paste_masks(masks, boxes, image_hw, rule='pixel_centers')
    full = mask_ops._do_paste_mask(torch.from_numpy(masks[:, None]), torch.from_numpy(boxes), *image_hw,
                                   skip_empty=False)[0].numpy()
    np.testing.assert_array_equal(ours, _detectron2_probabilities(mask_ops, masks, boxes, image_hw))
    cut = ours != full
    x_start, y_start, x_stop, y_stop = detectron2_windows(boxes, image_hw).T
    for i in range(len(boxes)):
        inside = np.zeros(image_hw, bool)
        inside[y_start[i]:y_stop[i], x_start[i]:x_stop[i]] = True
        assert not cut[i][inside].any()                      # inside the window: the same
    assert cut[0].any() and cut[1].any() and cut[5].any()    # over 84 px wide or tall: cut
    assert not cut[3].any() and not cut[4].any()             # 70 px; reaching the image border
    assert full[cut].max() < 0.5
    np.testing.assert_array_equal(ours >= 0.5, full >= 0.5)


def test_degenerate_boxes_paste_nothing(mask_ops):
    masks = np.full((5, 28, 28), 0.9, np.float32)
    boxes = np.array([[3, 2, 3, 8], [3.5, 2, 3.5, 8], [5, 2, 4.5, 8], [40, 2, 45, 8], [-20, -9, -3, -2.5]],
                     np.float32)  # zero width (twice), inverted, right of and above-left of the image
    image_hw = (10, 12)
    assert not paste_masks(masks, boxes, image_hw, rule='pixel_centers').any()
    assert not paste_masks(masks, boxes, image_hw, threshold=0.5, rule='pixel_centers').any()
    device = jax.jit(lambda m, b: paste_masks_to_canvas(m, b, (16, 16), rule='pixel_centers'))(masks, boxes)
    assert not np.asarray(device)[:, :10, :12].any()
    # Detectron2: NaN probabilities for the zero-width boxes, so a False mask as here.
    assert not _detectron2_binary(mask_ops, masks[:2], boxes[:2], image_hw).any()
    assert np.isnan(_detectron2_probabilities(mask_ops, masks[:1], boxes[:1], image_hw)).any()


def test_rule_and_threshold_arguments():
    masks = np.full((2, 28, 28), 0.5, np.float32)
    boxes = np.array([[1, 1, 5, 5], [2.5, 0.5, 9, 7]], np.float32)
    with pytest.raises(ValueError, match='rule'):
        paste_masks(masks, boxes, (10, 10), rule='caffe2')
    with pytest.raises(ValueError, match='threshold'):
        paste_masks(masks, boxes, (10, 10), threshold=0.0, rule='pixel_centers')
    with pytest.raises(ValueError, match='rule'):
        paste_masks_to_canvas(masks, boxes, (16, 16), rule='caffe2')
    # The default is torchvision's rule; 0.5 exactly is foreground by Detectron2's >= only.
    np.testing.assert_array_equal(paste_masks(masks, boxes, (10, 10), rule='padded_resize'),
                                  paste_masks(masks, boxes, (10, 10)))
    probs = paste_masks(masks, boxes, (10, 10), rule='pixel_centers')
    assert (probs == 0.5).any()
    np.testing.assert_array_equal(paste_masks(masks, boxes, (10, 10), threshold=0.5, rule='pixel_centers'),
                                  probs >= 0.5)
    chunks = list(iter_pasted_masks(masks, boxes, (10, 11), threshold=0.5, layout='nwh', rule='pixel_centers'))
    np.testing.assert_array_equal(chunks[0].transpose(0, 2, 1),
                                  paste_masks(masks, boxes, (10, 11), threshold=0.5, rule='pixel_centers'))


def test_device_paste_matches_detectron2(mask_ops):
    rng = np.random.default_rng(11)
    n, h, w = 40, 83, 121
    masks = _probabilities(rng, (2, n, 28, 28))
    boxes = np.stack([_boxes(rng, n, (h, w)) for _ in range(2)])
    boxes[1, :2] = [[200, 200, 260, 240], [10, 10, 10, 20]]      # outside the image; zero width
    canvas = resample.raw_canvas(h, w)
    prob = np.asarray(jax.jit(lambda m, b: paste_masks_to_canvas(m, b, canvas, rule='pixel_centers'))(masks, boxes))
    binary = np.asarray(jax.jit(lambda m, b: paste_masks_to_canvas(m, b, canvas, threshold=0.5,
                                                                   rule='pixel_centers'))(masks, boxes))
    tv = np.asarray(jax.jit(lambda m, b: paste_masks_to_canvas(m, b, canvas))(masks, boxes))
    assert prob.shape == (2, n) + canvas and binary.dtype == bool
    for b in range(2):
        host = paste_masks(masks[b], boxes[b], (h, w), rule='pixel_centers')
        # float32 rounding: XLA may or may not fuse the multiply-adds that torch's kernel fuses.
        np.testing.assert_allclose(prob[b, :, :h, :w], host, atol=1e-6, rtol=0)
        differ = binary[b, :, :h, :w] != (host >= 0.5)
        assert not differ[np.abs(host - 0.5) > 1e-6].any()
        ok = _detectron2_cpu_can_paste(boxes[b], (h, w)) & (boxes[b, :, 2] > boxes[b, :, 0])
        assert not host[~ok].any() and not prob[b, ~ok, :h, :w].any()
        np.testing.assert_array_equal(host[ok], _detectron2_probabilities(mask_ops, masks[b, ok], boxes[b, ok], (h, w)))
        # The device's torchvision rule is another paste.
        assert np.abs(tv[b, :, :h, :w] - prob[b, :, :h, :w]).max() > 0.1
    assert not prob[1, :2].any()
