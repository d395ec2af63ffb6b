"""The public Predictor: input conversion and validation, lists, batching, compile-once-per-bucket,
images beyond every bucket, and results in original pixels, against torchvision where it has an
answer.

One converted torchvision Mask R-CNN (ResNet-18 FPN, 91 classes, 96 / 128 sizing, 200 / 100 RPN
proposals, 30 detections: the mask head on 100 detections would dominate the run time) serves
every test. Its Predictor has a single landscape bucket (96, 128), so portrait
images exceed every bucket; three programs are compiled in all (bucket at batch 1 and 2, the
portrait canvas at batch 1).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

import jax  # noqa: E402

from mrcnn_jax import Predictor, preprocess  # noqa: E402
from tv_reference import build_torchvision_maskrcnn, image_to_tensor  # noqa: E402

MIN_SIZE, MAX_SIZE = 96, 128
DETECTIONS = 30
BUCKETS = [(96, 128)]


def smooth_image(seed: int, h: int, w: int) -> np.ndarray:
    """A uint8 RGB image of blobs at several scales (photo-like statistics, unlike white noise)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 3, h, w)
    for cells in ((3, 4), (8, 10), (24, 30)):
        noise = torch.rand(1, 3, *cells, generator=gen)
        img += torch.nn.functional.interpolate(noise, size=(h, w), mode='bilinear', align_corners=False)
    return (img[0].permute(1, 2, 0).numpy() / 3 * 255).round().clip(0, 255).astype(np.uint8)


IMAGES = {
    'landscape': smooth_image(1, 90, 121),     # -> 95 x 128, bucket (96, 128)
    'landscape_small': smooth_image(2, 70, 100),   # -> 89 x 128, same bucket
    'portrait': smooth_image(3, 120, 83),      # -> 128 x 88, padded 128 x 96: beyond every bucket
    'exact': smooth_image(4, 96, 128),         # already at its resized size (scale 1)
}


# A jitted function lowers a program for each new input signature; the backend then compiles it
# (or, with a persistent compilation cache, may fetch it): both events count as a compilation.
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_to_mlir_module_duration', '/jax/core/compile/backend_compile_duration')


@contextlib.contextmanager
def count_compiles(fun_name: str = 'apply'):
    """Counts lowering / compile events of jitted functions whose name contains `fun_name`."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event in COMPILE_EVENTS and fun_name in str(kwargs.get('fun_name', '')):
            count[0] += 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope='module')
def tv_model():
    return build_torchvision_maskrcnn(seed=0, depth=18, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                      rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                                      box_detections_per_img=DETECTIONS,
                                      calibration_images=[IMAGES['landscape'], IMAGES['portrait']])


@pytest.fixture(scope='module')
def predictor(tv_model):
    """Predictor of the converted model, warmed up on the bucket (its compilations counted)."""
    p = Predictor.from_torchvision(tv_model.state_dict(), min_size=MIN_SIZE, max_size=MAX_SIZE,
                                   detections_per_img=DETECTIONS)
    cfg = p.config
    cfg.model.rpn.pre_nms_topk_test = 200
    cfg.model.rpn.post_nms_topk_test = 100
    p = Predictor(cfg, p.variables, label_ids=p.label_ids, class_names=p.class_names, buckets=BUCKETS)
    with count_compiles() as n:
        first = p(IMAGES['landscape'])
    p.warmup_compiles = n[0]
    p.first = first
    return p


@pytest.fixture(scope='module')
def results(predictor):
    """One-image results, computed once."""
    return {k: predictor(v) for k, v in IMAGES.items()}


def _tv_final(tv_model, image):
    with torch.no_grad():
        out = tv_model([image_to_tensor(image)])[0]
    return {k: v.numpy() for k, v in out.items()}


def _match(ours, ref, score_tol, box_tol):
    """Index into `ref` for each of our detections: the same row, except that detections whose
    scores agree within score_tol may swap places (their order is decided by float rounding).
    Partners must have the same label and boxes within box_tol."""
    n = len(ref['scores'])
    assert len(ours['scores']) == n, (len(ours['scores']), n)
    used = np.zeros(n, bool)
    perm = []
    for i in range(n):
        cands = [j for j in range(max(0, i - 5), min(n, i + 6)) if not used[j]
                 and abs(ref['scores'][j] - ours['scores'][i]) <= score_tol
                 and ref['labels'][j] == ours['labels'][i]
                 and np.abs(ref['boxes'][j] - ours['boxes'][i]).max() <= box_tol]
        assert cands, f'detection {i} (label {ours["labels"][i]}, score {ours["scores"][i]:.6f}) has no partner'
        j = min(cands, key=lambda j: abs(ref['scores'][j] - ours['scores'][i]))
        used[j] = True
        perm.append(j)
    return np.asarray(perm)


def _assert_same(a, b, err=''):
    assert set(a) == set(b), err
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f'{err} {k}')


def _assert_close(a, b, err=''):
    """Same detections up to float rounding (another compiled program)."""
    perm = _match(a, b, score_tol=1e-5, box_tol=1e-3)
    np.testing.assert_allclose(a['scores'], b['scores'][perm], atol=1e-5, rtol=0, err_msg=err)
    np.testing.assert_allclose(a['boxes'], b['boxes'][perm], atol=1e-3, rtol=0, err_msg=err)
    np.testing.assert_allclose(a['mask_probs'], b['mask_probs'][perm], atol=1e-4, rtol=0, err_msg=err)


def _assert_matches_torchvision(ours, ref):
    """The parity test's tolerances: boxes 1e-2 px, scores 1e-4, pasted masks IoU > 0.99."""
    assert len(ref['scores']) >= 10, 'degenerate comparison: too few detections'
    assert len(set(ref['labels'].tolist())) >= 3, 'degenerate comparison: one class everywhere'
    perm = _match(ours, ref, score_tol=1e-4, box_tol=1e-2)
    masks = ref['masks'][perm, 0]
    assert ours['masks'].shape == masks.shape
    a, b = ours['masks'] >= 0.5, masks >= 0.5
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    assert (inter >= 0.99 * union).all()


def test_output_format(predictor, results):
    out = results['landscape']
    assert set(out) == {'boxes', 'scores', 'labels', 'masks', 'mask_probs'}
    n = len(out['scores'])
    assert n > 0
    h, w = IMAGES['landscape'].shape[:2]
    assert out['boxes'].shape == (n, 4) and out['boxes'].dtype == np.float32
    assert out['scores'].dtype == np.float32 and (np.diff(out['scores']) <= 0).all()
    assert out['labels'].dtype.kind == 'i' and ((out['labels'] >= 1) & (out['labels'] <= 90)).all()
    assert out['masks'].shape == (n, h, w) and out['masks'].dtype == np.float32
    assert (out['masks'] >= 0).all() and (out['masks'] <= 1).all()
    assert (out['boxes'] >= 0).all() and (out['boxes'][:, 2] <= w).all() and (out['boxes'][:, 3] <= h).all()
    _assert_same(out, predictor.first)


def test_matches_torchvision(tv_model, results):
    _assert_matches_torchvision(results['landscape'], _tv_final(tv_model, IMAGES['landscape']))


def test_image_beyond_every_bucket(predictor, tv_model, results, caplog):
    """A portrait image when only a landscape bucket exists: resized by the same rule, run on a
    canvas of its own padded size, and still torchvision's result."""
    image = IMAGES['portrait']
    x, info, canvas = predictor.preprocess(image)
    tr = tv_model.transform
    with torch.no_grad():
        il, _ = tr([image_to_tensor(image)])
    assert (int(info[2]), int(info[3])) == tuple(il.image_sizes[0]) == (128, 88)
    assert canvas == (128, 96) == tuple(il.tensors.shape[-2:])
    with caplog.at_level(logging.WARNING, logger='mrcnn_jax.predictor'):
        out = predictor(image)
    assert any('exceeds every bucket' in r.getMessage() for r in caplog.records)
    _assert_same(out, results['portrait'])
    _assert_matches_torchvision(out, _tv_final(tv_model, image))


def test_another_size_in_the_bucket_does_not_recompile(predictor):
    a, b = IMAGES['landscape'], IMAGES['landscape_small']
    _, info_a, bucket_a = predictor.preprocess(a)
    _, info_b, bucket_b = predictor.preprocess(b)
    assert bucket_a == bucket_b == BUCKETS[0]
    assert tuple(info_a[2:4]) != tuple(info_b[2:4]), 'the two images must resize to different sizes'
    assert predictor.warmup_compiles >= 1, 'the compilation counter saw the first compilation'
    size = predictor._predict._cache_size()
    with count_compiles() as n:
        out_b = predictor(b)
        out_a = predictor(a)
    assert n[0] == 0
    assert predictor._predict._cache_size() == size
    assert len(out_b['scores']) > 0 and len(out_a['scores']) > 0


def test_grayscale_images(predictor):
    gray = IMAGES['landscape'].mean(axis=2).round().astype(np.uint8)
    rgb = predictor(np.repeat(gray[:, :, None], 3, axis=2))
    assert len(rgb['scores']) > 0
    _assert_same(predictor(gray), rgb, err='HxW')
    _assert_same(predictor(gray[:, :, None]), rgb, err='HxWx1')


def test_rgba_equals_rgb(predictor, results):
    image = IMAGES['landscape']
    alpha = np.random.default_rng(0).integers(0, 256, image.shape[:2] + (1,), dtype=np.uint8)
    _assert_same(predictor(np.concatenate([image, alpha], axis=2)), results['landscape'])


@pytest.mark.parametrize('image, words', [
    (np.zeros((40, 50, 2), np.uint8), ['(40, 50, 2)']),
    (np.zeros((1, 40, 50, 3), np.uint8), ['(1, 40, 50, 3)']),
    (np.zeros((40, 50, 5), np.uint8), ['(40, 50, 5)']),
    (np.zeros((40, 50, 3), np.float32), ['float32', '(40, 50, 3)']),
    (np.zeros((40, 50, 3), np.uint16), ['uint16']),
    (np.zeros((0, 50, 3), np.uint8), ['(0, 50, 3)']),
])
def test_bad_images_raise(predictor, image, words):
    for call in (lambda: predictor(image), lambda: predictor([IMAGES['landscape'], image])):
        with pytest.raises(ValueError) as e:
            call()
        for word in words:
            assert word in str(e.value)


def test_list_gives_list_in_order(predictor, results):
    names = ['portrait', 'landscape', 'exact', 'landscape_small']   # two canvases, interleaved
    outs = predictor([IMAGES[k] for k in names])
    assert isinstance(outs, list) and len(outs) == len(names)
    for name, out in zip(names, outs):
        _assert_same(out, results[name], err=name)
    outs = predictor(tuple(IMAGES[k] for k in names[:2]))
    assert isinstance(outs, list) and len(outs) == 2
    assert predictor([]) == []


def test_batch_size_two_equals_one(predictor, results):
    p2 = Predictor(predictor.config, predictor.variables, label_ids=predictor.label_ids,
                   class_names=predictor.class_names, buckets=BUCKETS, batch_size=2)
    names = ['landscape', 'exact', 'landscape_small']      # 2 + 1 (the second batch padded)
    outs = p2([IMAGES[k] for k in names])
    for name, out in zip(names, outs):
        # Another compiled program (batch 2): XLA may round differently, so near, not equal.
        _assert_close(out, results[name], err=name)


def test_boxes_in_original_pixels(predictor, results):
    """A 2x pixel-replicated copy of an image that is already at its resized size gives exactly
    2x the boxes: its 2x bilinear downscale averages equal pixels, so the model input is
    identical, and boxes scale by original / resized = 2 exactly. (For other sizes the relation
    is only approximate: bilinear resizing of the copy and of the original differ.)"""
    small = IMAGES['exact']
    big = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)
    xs, info_s, _ = predictor.preprocess(small)
    xb, info_b, _ = predictor.preprocess(big)
    assert tuple(info_s[2:4]) == tuple(info_b[2:4]) == (96, 128)
    np.testing.assert_array_equal(xs, xb)
    a, b = results['exact'], predictor(big)
    assert len(a['scores']) > 0
    np.testing.assert_array_equal(b['boxes'], 2 * a['boxes'])
    np.testing.assert_array_equal(b['scores'], a['scores'])
    np.testing.assert_array_equal(b['labels'], a['labels'])
    np.testing.assert_array_equal(b['mask_probs'], a['mask_probs'])
    # Masks are pasted into each original image as torchvision pastes them (its 1-pixel padding
    # and integer boxes make the two resolutions differ by more than an upsampling).
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    for out, image in ((a, small), (b, big)):
        assert out['masks'].shape == (len(a['scores']),) + image.shape[:2]
        ref = paste_masks_in_image(torch.from_numpy(out['mask_probs'][:, None]), torch.from_numpy(out['boxes']),
                                   image.shape[:2])[:, 0].numpy()
        np.testing.assert_allclose(out['masks'], ref, atol=1e-6, rtol=0)


def test_buckets_default_and_config(predictor):
    p = Predictor(predictor.config, predictor.variables)
    assert p.buckets == preprocess.default_buckets(MIN_SIZE, MAX_SIZE) == [(96, 128), (128, 96)]
    assert p.preprocess(IMAGES['portrait'])[2] == (128, 96)


def test_host_and_device_paths_agree(predictor, results):
    """Resize and paste in jnp on the device (the default) against host numpy (bit for bit
    torch's CPU kernels): the same detections within float32 rounding, masks pasted alike; masks
    too large for `max_device_paste_bytes` are pasted on the host from the device's outputs."""
    assert predictor.on_device
    kw = dict(label_ids=predictor.label_ids, class_names=predictor.class_names, buckets=BUCKETS)
    host = Predictor(predictor.config, predictor.variables, on_device=False, **kw)
    fallback = Predictor(predictor.config, predictor.variables, max_device_paste_bytes=0, **kw)
    no_paste = Predictor(predictor.config, predictor.variables, paste=False, **kw)
    for name in ('landscape', 'portrait', 'exact'):
        dev, ref = results[name], host(IMAGES[name])
        # The inputs differ by float32 rounding (~1e-6); through 18 layers of random weights that
        # moves scores by up to ~2e-5 and boxes by ~1e-4 px here.
        perm = _match(dev, ref, score_tol=5e-5, box_tol=2e-3)
        np.testing.assert_allclose(dev['scores'], ref['scores'][perm], atol=5e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(dev['boxes'], ref['boxes'][perm], atol=2e-3, rtol=0, err_msg=name)
        np.testing.assert_allclose(dev['mask_probs'], ref['mask_probs'][perm], atol=1e-3, rtol=0, err_msg=name)
        assert dev['masks'].shape == ref['masks'].shape == (len(ref['scores']),) + IMAGES[name].shape[:2]
        np.testing.assert_allclose(dev['masks'], ref['masks'][perm], atol=1e-3, rtol=0, err_msg=name)
        fb = fallback(IMAGES[name])
        _assert_same({k: v for k, v in fb.items() if k != 'masks'}, {k: v for k, v in dev.items() if k != 'masks'})
        np.testing.assert_allclose(fb['masks'], dev['masks'], atol=1e-6, rtol=0, err_msg=name)
        assert 'masks' not in no_paste(IMAGES[name])


def test_mask_threshold_gives_bool_masks_on_both_paths(predictor, results):
    """mask_threshold=0.5: bool masks equal to the float masks > 0.5 of the same path (up to
    probabilities within rounding of 0.5), thresholded on the device or on the host."""
    kw = dict(label_ids=predictor.label_ids, class_names=predictor.class_names, buckets=BUCKETS)
    float_masks = {True: results['landscape'],
                   False: Predictor(predictor.config, predictor.variables, on_device=False, **kw)(IMAGES['landscape'])}
    for on_device, ref in float_masks.items():
        p = Predictor(predictor.config, predictor.variables, on_device=on_device, mask_threshold=0.5, **kw)
        out = p(IMAGES['landscape'])
        assert out['masks'].dtype == np.bool_ and out['masks'].shape == ref['masks'].shape
        np.testing.assert_array_equal(out['mask_probs'], ref['mask_probs'])
        differ = out['masks'] != (ref['masks'] > 0.5)
        assert out['masks'].any() and not differ[np.abs(ref['masks'] - 0.5) > 1e-6].any()
    with pytest.raises(ValueError, match='mask_threshold'):
        Predictor(predictor.config, predictor.variables, mask_threshold=1.5)


_MESH_WORKER = r'''
import json, sys
import numpy as np
import jax
from mrcnn_jax import Predictor
from mrcnn_jax.training.train_step import make_mesh

path, images_file = sys.argv[1], sys.argv[2]
images = dict(np.load(images_file))
buckets = [(96, 128)]
many = Predictor.from_checkpoint(path, buckets=buckets, batch_size=4)     # all 4 devices
one = Predictor.from_checkpoint(path, buckets=buckets)                    # batch 1: one device
given = Predictor(many.config, many.variables, buckets=buckets, batch_size=3, mesh=make_mesh(jax.devices()[:2]))
two = Predictor(many.config, many.variables, buckets=buckets, batch_size=6)
keys = sorted(images)
got = dict(many.predict_iter((k, images[k]) for k in keys))
ref = dict(zip(keys, one([images[k] for k in keys])))
x = many._shard(np.zeros((many.batch_size, 96, 128, 3), np.float32))
report = {'devices': many.mesh.devices.size, 'batch_size': many.batch_size,
          'one': [one.mesh.devices.size, one.batch_size], 'given': [given.mesh.devices.size, given.batch_size],
          'six': [two.mesh.devices.size, two.batch_size],
          'input_shards': len(x.sharding.device_set),
          'variables_replicated': all(a.sharding.is_fully_replicated and len(a.sharding.device_set) == 4
                                      for a in jax.tree_util.tree_leaves(many.variables)),
          'detections': {k: int(len(ref[k]['scores'])) for k in keys}, 'max_diff': {}}
for k in keys:
    assert set(got[k]) == set(ref[k]), k
    for name in ref[k]:
        a, b = np.asarray(got[k][name], np.float64), np.asarray(ref[k][name], np.float64)
        assert a.shape == b.shape, (k, name, a.shape, b.shape)
        report['max_diff'][f'{k}/{name}'] = float(np.abs(a - b).max(initial=0))
print(json.dumps(report))
'''


def test_predictor_over_a_mesh_equals_one_device(predictor, tmp_path):
    """One inference path for every device count: a Predictor with batch 4 on a 4-device host
    (virtual CPU devices, in a subprocess) shards each batch over the devices and gives the
    results of a batch-1 Predictor, which stays on one device."""
    import json
    import subprocess
    import sys

    import os
    import pathlib

    from mrcnn_jax.model_dir import save_model_dir

    path = tmp_path / 'model'
    save_model_dir(path, predictor.config, jax.device_get(predictor.variables),
                   {'label_ids': [int(i) for i in predictor.label_ids], 'class_names': predictor.class_names})
    names = ('landscape', 'landscape_small', 'exact')
    np.savez(tmp_path / 'images.npz', **{k: IMAGES[k] for k in names})
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4',
               PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, '-c', _MESH_WORKER, str(path), str(tmp_path / 'images.npz')],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['devices'] == 4 and report['batch_size'] == 4
    # Batch 1 stays on one device; a given mesh rounds the batch up; batch 6 uses gcd(6, 4) = 2.
    assert report['one'] == [1, 1] and report['given'] == [2, 4] and report['six'] == [2, 6]
    assert report['input_shards'] == 4 and report['variables_replicated']
    assert min(report['detections'].values()) > 0
    # Same program per image, split over devices: equal up to float32 reassociation.
    worst = {k: v for k, v in report['max_diff'].items() if v > 1e-4}
    assert not worst, worst
