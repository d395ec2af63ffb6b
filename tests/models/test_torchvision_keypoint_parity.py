"""Parity with torchvision's Keypoint R-CNN (`keypointrcnn_resnet50_fpn`'s architecture) on a real
photo of people, from a state_dict that `Predictor.from_torchvision` recognises by its keys.

torchvision's own `KeypointRCNN` (FrozenBN eps 0; ResNet-18 FPN to keep the suite fast: the R50
body is proven by the Mask R-CNN parity tests, and `test_keypointrcnn_resnet50_fpn_is_recognised`
converts the R50 model's own state_dict) with seeded random weights calibrated into a
trained network's regime (mrcnn_jax/testing/torchvision_reference.py: BN statistics, RPN, a
2-class classifier whose scores spread, heatmap logits of std 3), saved as a .pth and converted.
Compared on each photo: detections (count, order, boxes < 1e-2 px, scores < 1e-4), the raw 56 x 56
heatmaps of the detections, and the keypoints (the static-shape `heatmaps_to_keypoints` against
torchvision's per-RoI bicubic resize + argmax): coordinates within 0.5 px (in the resized frame
and in original pixels), keypoint scores within 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from mrcnn_jax import Predictor  # noqa: E402
from references import align_ties  # noqa: E402
from tv_reference import build_torchvision_maskrcnn, run_stages  # noqa: E402

PHOTOS = {'crowd': '000000000395.jpg'}   # 640 x 580, 9 people
KEYPOINT_PX = 0.5
KEYPOINT_SCORE_ATOL = 1e-3


@pytest.fixture(scope='module')
def photos(shared_data):
    return {k: np.asarray(Image.open(shared_data / 'coco128_seg' / 'images' / v).convert('RGB'))
            for k, v in PHOTOS.items()}


@pytest.fixture(scope='module')
def tv_model(photos):
    # torchvision's keypoint head is 8 convs x 512 channels: 370 GFLOP for 100 detections at 14 x 14,
    # ~10 s per image on 2 CPU cores. 8 x 64 keeps its depth (the converter reads the sizes).
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    torch.manual_seed(0)
    heads = dict(keypoint_head=KeypointRCNNHeads(256, [64] * 8), keypoint_predictor=KeypointRCNNPredictor(64, 17))
    return build_torchvision_maskrcnn(seed=0, depth=18, num_classes=2, mask=False, keypoints=17, min_size=320,
                                      max_size=512, cls_logit_std=1.0, calibration_images=list(photos.values()),
                                      **heads)


@pytest.fixture(scope='module')
def predictor(tv_model, tmp_path_factory):
    path = tmp_path_factory.mktemp('tv_kp') / 'keypointrcnn_random.pth'
    torch.save(tv_model.state_dict(), path)
    return Predictor.from_torchvision(str(path), min_size=320, max_size=512, buckets=[(512, 512)])


def _heatmaps(m, images, info):
    feats = m.features(images, info)
    det = m.detect(feats, info)
    return det, m.keypoint_predictions(feats, det['boxes'], info)


@pytest.mark.parametrize('kind', list(PHOTOS))
def test_keypoint_parity(kind, photos, tv_model, predictor):
    image = photos[kind]
    assert predictor.config.model.keypoint_on and predictor.config.model.num_keypoints == 17
    tv_maps = []
    hook = tv_model.roi_heads.keypoint_predictor.register_forward_hook(lambda m, a, out: tv_maps.append(out))
    try:
        ref = run_stages(tv_model, image)
    finally:
        hook.remove()
    raw = ref['raw']
    x, info, bucket = predictor.preprocess(image)
    canvas = np.zeros((1,) + tuple(bucket) + (3,), np.float32)
    canvas[0, :x.shape[0], :x.shape[1]] = x
    fn = jax.jit(lambda v, im, inf: predictor.model.apply(v, im, inf, method=_heatmaps))
    det, maps = jax.tree_util.tree_map(np.asarray, fn(predictor.variables, canvas, info[None]))

    k = int(det['valid'][0].sum())
    assert k == len(raw['scores']) and k >= 20, (k, len(raw['scores']))
    # not saturated, no ties: the 100 best of thousands of person scores (2 classes) are high
    assert raw['scores'].max() < 0.999 and np.diff(raw['scores']).max() < 0, 'degenerate: saturated or tied scores'
    perm = align_ties(det['scores'][0, :k], raw['scores'], det['boxes'][0, :k], raw['boxes'], tie=1e-4)
    np.testing.assert_allclose(det['scores'][0, :k], raw['scores'][perm], atol=1e-4, rtol=0)
    np.testing.assert_allclose(det['boxes'][0, :k], raw['boxes'][perm], atol=1e-2, rtol=0)

    # Raw heatmaps (torchvision's keypoint_predictor output) of the same detections.
    theirs = tv_maps[0].numpy()[perm]
    assert theirs.std() > 1.0, 'degenerate: heatmap logits without spread'
    rel = np.abs(maps[0, :k] - theirs).max() / np.abs(theirs).max()
    assert rel < 1e-4, f'heatmaps: relative error {rel:.2e}'

    # Keypoints in the resized frame (the model's output) ...
    kp_err = np.abs(det['keypoints'][0, :k, :, :2] - raw['keypoints'][perm, :, :2]).max()
    assert kp_err < KEYPOINT_PX, f'keypoints differ by {kp_err:.3f} px'
    np.testing.assert_array_equal(det['keypoints'][0, :k, :, 2], 1.0)
    score_err = np.abs(det['keypoints_scores'][0, :k] - raw['keypoints_scores'][perm]).max()
    assert score_err < KEYPOINT_SCORE_ATOL, f'keypoint scores differ by {score_err:.2e}'
    # ... and in original pixels: the Predictor's postprocessing of these outputs (its host and
    # device paths share the keypoint rescaling, `Predictor._postprocess`; running `predictor(image)`
    # would compile the same model once more).
    final = ref['final']
    out = predictor.postprocess({key: v[0] for key, v in det.items()}, info)
    p = align_ties(out['scores'], final['scores'], out['boxes'], final['boxes'], tie=1e-4)
    assert out['keypoints'].shape == (k, 17, 3) and out['keypoints_scores'].shape == (k, 17)
    err = np.abs(out['keypoints'] - final['keypoints'][p]).max()
    assert err < KEYPOINT_PX, f'keypoints differ by {err:.3f} px'
    np.testing.assert_allclose(out['keypoints_scores'], final['keypoints_scores'][p],
                               atol=KEYPOINT_SCORE_ATOL, rtol=0)


def test_keypointrcnn_resnet50_fpn_is_recognised():
    """torchvision's own keypointrcnn_resnet50_fpn state_dict: architecture read off the keys, every
    key mapped onto our variables with the right shape (convert_state_dict checks shapes)."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn

    from mrcnn_jax.convert.torchvision import convert_state_dict, model_config_from_state_dict
    sd = {k: v.numpy() for k, v in keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict().items()
          if not k.endswith('num_batches_tracked')}
    cfg = model_config_from_state_dict(sd)
    assert (cfg.backbone.depth, cfg.num_classes, cfg.mask_on, cfg.keypoint_on) == (50, 2, False, True)
    assert (cfg.num_keypoints, cfg.roi.keypoint_head_convs, cfg.roi.keypoint_head_channels) == (17, 8, 512)
    variables = convert_state_dict(sd, cfg)
    np.testing.assert_array_equal(variables['params']['roi_heads']['keypoint_head']['score_lowres_kernel'],
                                  sd['roi_heads.keypoint_predictor.kps_score_lowres.weight'].transpose(2, 3, 0, 1))
