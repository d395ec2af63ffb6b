"""mrcnn_jax.ops.roi_align against torchvision.ops.roi_align / MultiScaleRoIAlign (NCHW there)."""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mrcnn_jax.ops.roi_align import box_levels, multilevel_roi_align, roi_align

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

METHODS = ('gather', 'einsum')
FPN_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
_STATIC = ('output_size', 'sampling_ratio', 'aligned', 'max_sampling_ratio', 'method', 'rois_per_step')
# One compilation per configuration (eager op-by-op dispatch is slower to warm up on 2 cores).
roi_align_jit = jax.jit(roi_align, static_argnames=_STATIC + ('spatial_scale',))
multilevel_roi_align_jit = jax.jit(multilevel_roi_align, static_argnames=_STATIC + ('scales',))


def _tv_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision on NHWC numpy features [B, H, W, C] and boxes [B, R, 4] -> [B, R, oh, ow, C]."""
    b, r = boxes.shape[:2]
    rois = np.concatenate([np.repeat(np.arange(b), r)[:, None], boxes.reshape(-1, 4)], axis=1)
    out = torchvision.ops.roi_align(
        torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2))),
        torch.from_numpy(rois.astype(features.dtype)), output_size, spatial_scale, sampling_ratio, aligned)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    return out.numpy().reshape(b, r, features.shape[3], oh, ow).transpose(0, 1, 3, 4, 2)


def _mixed_boxes(rng, b, img_h, img_w, n_random=24):
    """[b, R, 4] boxes in image pixels: random ones plus the awkward cases."""
    special = np.array([
        [0, 0, img_w, img_h],  # the whole image
        [img_w - 9, img_h - 7, img_w, img_h],  # bottom-right corner, touching the border
        [0, 0, 5, 3],  # top-left corner
        [-20, 10, 30, img_h + 15],  # partly outside (left, bottom)
        [img_w - 10, -12, img_w + 40, 20],  # partly outside (right, top)
        [img_w + 20, img_h + 20, img_w + 60, img_h + 90],  # fully outside
        [-80, -60, -30, -10],  # fully outside, negative
        [13.3, 17.1, 13.6, 17.2],  # tiny (sub-pixel)
        [22.0, 9.0, 22.0, 9.0],  # zero size
        [-img_w, -img_h, 2 * img_w, 2 * img_h],  # huge
        [31.0, 25.0, 19.0, 11.0],  # inverted (x2 < x1, y2 < y1)
        [img_w - 0.5, img_h - 0.5, img_w + 0.5, img_h + 0.5],  # straddling the far corner
    ])
    out = []
    for _ in range(b):
        xy = rng.uniform(-0.1, 1.0, (n_random, 2)) * [img_w, img_h]
        wh = rng.exponential(0.3, (n_random, 2)) * [img_w, img_h] + 0.5
        out.append(np.concatenate([special, np.concatenate([xy, xy + wh], 1)]))
    return np.stack(out)


def _needed_grid(boxes, scale, out, aligned):
    """Largest adaptive grid torchvision uses for these boxes (to size max_sampling_ratio)."""
    size = np.concatenate([boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]]) * scale
    if not aligned:
        size = np.maximum(size, 1.0)
    return int(np.ceil(size.max() / out))


def _rel_err(got, ref):
    return np.abs(np.asarray(got, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize('aligned, sampling_ratio, output_size, scale', [
    (False, 2, 7, 1 / 4), (True, 2, 14, 1 / 16), (False, 0, 14, 1 / 16), (True, 0, 7, 1 / 4)])
def test_single_level_matches_torchvision(aligned, sampling_ratio, output_size, scale):
    rng = np.random.default_rng(int(aligned) + 2 * sampling_ratio + output_size)
    h, w = 19, 26
    features = rng.standard_normal((2, h, w, 5))
    boxes = _mixed_boxes(rng, 2, h / scale, w / scale)
    max_sr = max(_needed_grid(boxes, scale, output_size, aligned), 1)
    with jax.enable_x64(True):
        ref = _tv_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned)
        assert np.abs(ref).max() > 0.5
        for method in METHODS:
            got = roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), output_size, scale, sampling_ratio,
                                aligned, max_sampling_ratio=max_sr, method=method)
            assert got.dtype == jnp.float64 and got.shape == (2, boxes.shape[1], output_size, output_size, 5)
            np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-10, err_msg=method)
    f32, b32 = features.astype(np.float32), boxes.astype(np.float32)
    ref32 = _tv_roi_align(f32, b32, output_size, scale, sampling_ratio, aligned)
    method = METHODS[int(aligned)]  # float32: one method per case, each method in two cases
    got = roi_align_jit(f32, b32, output_size, scale, sampling_ratio, aligned, max_sampling_ratio=max_sr,
                        method=method)
    assert got.dtype == jnp.float32
    assert _rel_err(got, ref32) < 1e-4, method


@pytest.mark.parametrize('aligned, sampling_ratio, method', [(False, 2, 'einsum'), (True, 0, 'gather')])
def test_valid_hw_equals_torchvision_on_cropped_map(aligned, sampling_ratio, method):
    """valid_hw: the image was padded to a smaller size than our static canvas."""
    rng = np.random.default_rng(11)
    h, w, scale = 19, 26, 1 / 8
    valid_hw = np.array([[13, 20], [19, 17]])
    features = rng.standard_normal((2, h, w, 3))
    boxes = _mixed_boxes(rng, 2, 15 / scale, 20 / scale)
    with jax.enable_x64(True):
        got = np.asarray(roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), 7, scale, sampling_ratio, aligned,
                                       valid_hw=jnp.asarray(valid_hw), max_sampling_ratio=32, method=method))
    for i, (vh, vw) in enumerate(valid_hw):
        ref = _tv_roi_align(features[i:i + 1, :vh, :vw], boxes[i:i + 1], 7, scale, sampling_ratio, aligned)
        np.testing.assert_allclose(got[i:i + 1], ref, rtol=0, atol=1e-10)
    # And it is not a no-op: the full map gives different numbers.
    full = _tv_roi_align(features, boxes, 7, scale, sampling_ratio, aligned)
    assert np.abs(got - full).max() > 1e-3


@pytest.mark.parametrize('aligned, sampling_ratio, use_valid_hw, method', [
    (True, 0, True, 'gather'), (False, 3, False, 'gather'), (True, 3, False, 'einsum')])
def test_samples_exactly_on_feature_rows(aligned, sampling_ratio, use_valid_hw, method):
    """Integer boxes put many samples exactly on integer rows/columns (in real arithmetic; XLA's
    float rounding of them varies between fusions), including the last valid row."""
    rng = np.random.default_rng(14)
    h, w = 13, 16
    features = rng.standard_normal((2, h, w, 3))
    xy = rng.integers(-3, 12, (2, 150, 2))
    wh = rng.integers(1, 22, (2, 150, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float64)
    valid_hw = np.array([[11, 16], [13, 9]]) if use_valid_hw else np.array([[h, w]] * 2)
    with jax.enable_x64(True):
        got = np.asarray(roi_align_jit(jnp.asarray(features), jnp.asarray(boxes), 7, 1.0, sampling_ratio, aligned,
                                       valid_hw=jnp.asarray(valid_hw), max_sampling_ratio=4, method=method))
    for i, (vh, vw) in enumerate(valid_hw):
        ref = _tv_roi_align(features[i:i + 1, :vh, :vw], boxes[i:i + 1], 7, 1.0, sampling_ratio, aligned)
        np.testing.assert_allclose(got[i:i + 1], ref, rtol=0, atol=1e-10)


def test_adaptive_grid_is_capped_at_max_sampling_ratio():
    """Boxes needing more than max_sampling_ratio samples per bin get a uniform grid of that size:
    identical to torchvision with sampling_ratio=max_sampling_ratio for boxes over the bound in
    both axes, and to torchvision's adaptive grid for boxes within it."""
    rng = np.random.default_rng(12)
    features = rng.standard_normal((1, 30, 40, 4)).astype(np.float32)
    big = np.array([[[0, 0, 160, 150], [-40, -30, 170, 130], [5, 7, 155, 119]]], np.float32)  # > 4 * 7 px
    small = np.array([[[0, 0, 28, 21], [10, 20, 30, 35]]], np.float32)  # <= 4 * 7 px
    got_big = roi_align_jit(features, big, 7, 1.0, 0, False, max_sampling_ratio=4)
    assert _rel_err(got_big, _tv_roi_align(features, big, 7, 1.0, 4, False)) < 1e-5
    assert _rel_err(got_big, _tv_roi_align(features, big, 7, 1.0, 0, False)) > 1e-3
    got_small = roi_align_jit(features, small, 7, 1.0, 0, False, max_sampling_ratio=4)
    assert _rel_err(got_small, _tv_roi_align(features, small, 7, 1.0, 0, False)) < 1e-5


def test_chunking_dtype_and_jit():
    rng = np.random.default_rng(13)
    features = rng.standard_normal((2, 16, 20, 8)).astype(np.float32)
    boxes = _mixed_boxes(rng, 2, 64, 80, n_random=9).astype(np.float32)  # 2 x 21 boxes
    ref = _tv_roi_align(features, boxes, 7, 0.25, 2, True)
    for rps in (None, 5):  # the default (8 on CPU) runs in every other test
        assert _rel_err(roi_align_jit(features, boxes, 7, 0.25, 2, True, rois_per_step=rps), ref) < 1e-5, rps
    # bfloat16 features (weights in float32, output bfloat16) and a non-square output.
    got = roi_align_jit(jnp.asarray(features, jnp.bfloat16), boxes, (5, 3), 0.25, 2, True)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 21, 5, 3, 8)
    ref = _tv_roi_align(features, boxes, (5, 3), 0.25, 2, True)
    assert _rel_err(got.astype(jnp.float32), ref) < 2e-2


def _fpn_case(rng, b=2, c=4, n_random=30):
    img_h, img_w = 256, 320
    features = [rng.standard_normal((b, img_h // 2 ** k, img_w // 2 ** k, c)) for k in range(2, 6)]
    boxes = []
    for _ in range(b):
        side = np.exp(rng.uniform(np.log(8), np.log(700), n_random))  # sqrt(area): levels 2..5
        aspect = np.exp(rng.uniform(-1, 1, n_random))
        ctr = rng.uniform(-20, 1.0, (n_random, 2)) * [img_w, img_h]
        wh = np.stack([side * aspect, side / aspect], 1)
        boxes.append(np.concatenate([ctr - wh / 2, ctr + wh / 2], 1))
    return (img_h, img_w), features, np.stack(boxes)


def _tv_multiscale(features, boxes, image_hw, sampling_ratio, requires_grad=False):
    """MultiScaleRoIAlign (it infers the scales from feature vs image size) -> ([B*R, C, 7, 7], inputs)."""
    pooler = torchvision.ops.MultiScaleRoIAlign(['0', '1', '2', '3'], 7, sampling_ratio)
    x = {str(i): torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2))).requires_grad_(requires_grad)
         for i, f in enumerate(features)}
    out = pooler(x, [torch.from_numpy(bx) for bx in boxes], [image_hw] * boxes.shape[0])
    return out, x


@pytest.mark.parametrize('sampling_ratio', [2, 0])
def test_multilevel_matches_multiscale_roi_align(sampling_ratio):
    rng = np.random.default_rng(20 + sampling_ratio)
    image_hw, features, boxes = _fpn_case(rng)
    b, r = boxes.shape[:2]
    with jax.enable_x64(True):
        levels = np.asarray(box_levels(jnp.asarray(boxes), 2, 5))
        assert set(np.unique(levels)) == {0, 1, 2, 3}
        out, _ = _tv_multiscale(features, boxes, image_hw, sampling_ratio)
        ref = out.numpy().reshape(b, r, -1, 7, 7).transpose(0, 1, 3, 4, 2)
        for method in METHODS[:2 if sampling_ratio > 0 else 1]:
            got = multilevel_roi_align_jit([jnp.asarray(f) for f in features], jnp.asarray(boxes), 7, sampling_ratio,
                                           False, scales=FPN_SCALES, max_sampling_ratio=16, method=method)
            assert got.shape == (b, r, 7, 7, 4) and got.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-10, err_msg=method)


def test_multilevel_valid_hw():
    rng = np.random.default_rng(23)
    _, features, boxes = _fpn_case(rng, n_random=20)
    valid = [np.array([[60 // 2 ** k, 70 // 2 ** k], [64 // 2 ** k, 50 // 2 ** k]]) for k in range(4)]
    with jax.enable_x64(True):
        levels = np.asarray(box_levels(jnp.asarray(boxes), 2, 5))
        got = np.asarray(multilevel_roi_align_jit(
            [jnp.asarray(f) for f in features], jnp.asarray(boxes), 7, 2, True, scales=FPN_SCALES,
            valid_hw=[jnp.asarray(v) for v in valid], method='gather'))
    for i in range(boxes.shape[0]):
        for l in range(4):
            sel = levels[i] == l
            vh, vw = valid[l][i]
            ref = _tv_roi_align(features[l][i:i + 1, :vh, :vw], boxes[i:i + 1, sel], 7, FPN_SCALES[l], 2, True)
            np.testing.assert_allclose(got[i:i + 1, sel], ref, rtol=0, atol=1e-10)


def _level_test_boxes(seed):
    """3000 boxes of sides 2..2000 px, then four exactly on the level boundaries (sqrt(area) =
    112, 224, 448) and a degenerate one."""
    rng = np.random.default_rng(seed)
    side = np.exp(rng.uniform(np.log(2), np.log(2000), 3000))
    aspect = np.exp(rng.uniform(-1.5, 1.5, 3000))
    wh = np.stack([side * aspect, side / aspect], 1)
    xy = rng.uniform(-100, 900, (3000, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    boxes = np.concatenate([boxes, [[0, 0, 112, 112], [0, 0, 224, 224], [10, 10, 458, 458], [5, 5, 5, 9]]])
    return boxes.astype(np.float32)


def test_box_levels_match_level_mapper():
    from torchvision.ops.poolers import initLevelMapper

    boxes = _level_test_boxes(24)
    ref = initLevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy()
    got = np.asarray(jax.jit(box_levels, static_argnums=(1, 2))(boxes, 2, 5))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got[-4:], [1, 2, 3, 0])


def test_box_levels_detectron2_formula():
    """Detectron2's assign_boxes_to_levels (modeling/poolers.py) puts its eps inside the log:
    floor(k0 + log2(sqrt(area) / s0 + 1e-8)), clamped to [k_min, k_max]; written out in torch."""
    from mrcnn_jax.models.conventions import DETECTRON2

    boxes = _level_test_boxes(25)
    t = torch.from_numpy(boxes)
    sizes = torch.sqrt((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]))
    ref = torch.clamp(torch.floor(4 + torch.log2(sizes / 224 + 1e-8)), min=2, max=5).to(torch.int64) - 2
    got = np.asarray(jax.jit(lambda b: box_levels(b, 2, 5, eps=DETECTRON2.level_eps,
                                                  eps_in_log=DETECTRON2.level_eps_in_log))(boxes))
    np.testing.assert_array_equal(got, ref.numpy())
    np.testing.assert_array_equal(got[-4:], [1, 2, 3, 0])


def test_gradients_match_torchvision():
    # aligned=False / fixed sampling is covered by the multi-level gradient test below.
    aligned, sampling_ratio = True, 0
    rng = np.random.default_rng(30)
    h, w, scale = 15, 18, 1 / 4
    features = rng.standard_normal((2, h, w, 3))
    boxes = _mixed_boxes(rng, 2, h / scale, w / scale, n_random=10)
    cot = rng.standard_normal((2, boxes.shape[1], 7, 7, 3))
    ft = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2))).requires_grad_(True)
    rois = np.concatenate([np.repeat(np.arange(2), boxes.shape[1])[:, None], boxes.reshape(-1, 4)], 1)
    out = torchvision.ops.roi_align(ft, torch.from_numpy(rois), 7, scale, sampling_ratio, aligned)
    (out * torch.from_numpy(np.ascontiguousarray(cot.reshape(-1, 7, 7, 3).transpose(0, 3, 1, 2)))).sum().backward()
    ref = ft.grad.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ref).max() > 0.1
    with jax.enable_x64(True):
        for method in METHODS:
            def loss(f):
                return jnp.sum(roi_align_jit(f, jnp.asarray(boxes), 7, scale, sampling_ratio, aligned,
                                             max_sampling_ratio=24, method=method) * cot)
            got = jax.grad(loss)(jnp.asarray(features))
            np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-10, err_msg=method)


def test_multilevel_gradients_match_torchvision():
    rng = np.random.default_rng(31)
    image_hw, features, boxes = _fpn_case(rng, n_random=16)
    b, r = boxes.shape[:2]
    out, x = _tv_multiscale(features, boxes, image_hw, 2, requires_grad=True)
    cot = rng.standard_normal((b, r, 7, 7, 4))
    (out * torch.from_numpy(np.ascontiguousarray(cot.reshape(b * r, 7, 7, 4).transpose(0, 3, 1, 2)))).sum().backward()
    refs = [x[str(l)].grad.numpy().transpose(0, 2, 3, 1) for l in range(4)]
    with jax.enable_x64(True):
        for method in METHODS:
            def loss(fs):
                return jnp.sum(multilevel_roi_align_jit(fs, jnp.asarray(boxes), 7, 2, False, scales=FPN_SCALES,
                                                        method=method) * cot)
            grads = jax.grad(loss)([jnp.asarray(f) for f in features])
            for l in range(4):
                np.testing.assert_allclose(np.asarray(grads[l]), refs[l], rtol=0, atol=1e-10, err_msg=method)


def _real_photo(shared_data):
    from PIL import Image

    root = shared_data / 'coco128_seg'
    ann = json.loads((root / 'annotations.json').read_text())
    per_image = {}
    for a in ann['annotations']:
        per_image.setdefault(a['image_id'], []).append(a['bbox'])
    info = next(im for im in ann['images'] if len(per_image.get(im['id'], [])) >= 5)
    img = np.asarray(Image.open(root / 'images' / info['file_name']).convert('RGB'), np.float32)
    xywh = np.asarray(per_image[info['id']], np.float32)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    return img, boxes


@pytest.mark.parametrize('aligned, sampling_ratio, scale, method', [(False, 2, 1.0, 'gather'),
                                                                     (True, 0, 0.5, 'einsum')])
def test_real_photo(shared_data, aligned, sampling_ratio, scale, method):
    """The 'feature map' is a real COCO photo (RGB, 0..255) and the boxes its annotated instances."""
    img, boxes = _real_photo(shared_data)
    features, boxes = img[None], boxes[None]
    ref = _tv_roi_align(features, boxes, 14, scale, sampling_ratio, aligned)
    max_sr = _needed_grid(boxes, scale, 14, aligned)
    got = roi_align_jit(features, boxes, 14, scale, sampling_ratio, aligned, max_sampling_ratio=max_sr,
                        method=method)
    assert _rel_err(got, ref) < 1e-4


def test_real_photo_pyramid(shared_data):
    """A 4-level pyramid of 2x2-average-pooled photos vs MultiScaleRoIAlign (float32)."""
    img, boxes = _real_photo(shared_data)
    h, w = img.shape[0] // 32 * 32, img.shape[1] // 32 * 32
    img = img[:h, :w]
    pyramid = []
    for k in range(2, 6):
        s = 2 ** k
        pyramid.append(img.reshape(h // s, s, w // s, s, 3).mean((1, 3))[None].astype(np.float32))
    boxes = np.concatenate([boxes, [[0, 0, w, h], [w / 2, h / 2, w - 1, h - 1]]]).astype(np.float32)[None]
    out, _ = _tv_multiscale(pyramid, boxes, (h, w), 2)
    ref = out.numpy().reshape(1, boxes.shape[1], 3, 7, 7).transpose(0, 1, 3, 4, 2)
    got = multilevel_roi_align_jit(pyramid, boxes, 7, 2, False, scales=FPN_SCALES)
    assert _rel_err(got, ref) < 1e-4
