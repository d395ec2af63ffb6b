"""Parity with Detectron2's model zoo on real photos, stage by stage.

Detectron2's own model (its vendored source, `detectron2.modeling.build_model` of a model-zoo yaml)
gets seeded random weights calibrated into a trained network's regime on the test photos
(`mrcnn_jax/testing/detectron2_reference.py`: FrozenBN statistics from the activations, RPN
logits with a spread, a few dozen detections per photo with distinct scores spread over
(0.05, 0.2-0.9), mask logits of std 3, heatmap logits of std 5), is saved as a model-zoo .pkl and runs as users run it:
`DefaultPredictor` with MODEL.WEIGHTS = that .pkl, on a BGR uint8 photo. Our side is what a user
gets from the same .pkl and yaml: `Predictor.from_detectron2(pkl, config_file=yaml)`, on the RGB
photo. Forward hooks keep Detectron2's stages; ours come from one compiled program
(features -> proposals -> detections) fed with our own preprocessing, compared in order:
  * preprocessing (PIL resize, BGR, mean / std): the normalized image, 1e-4 absolute (exact);
  * backbone + FPN: p2..p6 inside Detectron2's padded tensor, relative error < 1e-4;
  * RPN: the proposal count, and the top 100 proposals, same ones in the same order (sigmoid of
    Detectron2's objectness logits within 1e-5, boxes within 1e-2 px, see PROPOSAL_BOX_ATOL);
  * detections in the resized frame: count, classes, order (rows whose scores tie within 1e-4
    may swap), scores 1e-4, boxes 1e-2 px; the raw 28x28 mask probabilities 1e-3 (MASK_PROB_ATOL);
    Keypoint R-CNN: the raw 56 x 56 heatmaps 1e-4 relative, keypoints (the static-shape
    `heatmaps_to_keypoints` against Detectron2's per-RoI bicubic resize + argmax) within 0.5 px and
    Detectron2's keypoint score (`pred_keypoints[..., 2]`, the pool softmax) within 1e-3;
  * the public output in original pixels (our Predictor's host postprocess of those detections:
    box rescale and clip, COCO category ids, pasted masks, rescaled keypoints) against what
    DefaultPredictor returns: boxes 1e-2 px, scores 1e-4, labels = the COCO ids of Detectron2's
    classes (from its own metadata), masks IoU > 0.99 at 0.5, keypoints 0.5 px and scores 1e-3
    (Detectron2's frame: its pred_keypoints, before COCOEvaluator's -0.5); for R50,
    `Predictor.__call__` itself (device and host paths) too.
Configs (3x): Mask R-CNN R50 / R101 / X101-32x8d FPN, Faster R-CNN R50 FPN, Mask R-CNN R50-C4
(res4 features, res5 per RoI, 14 x 14 masks), Cascade Mask R-CNN R50-FPN and Keypoint R-CNN
R50-FPN (one class, 17 keypoints; 9 people on one photo), at reduced test sizes (one canvas
bucket per config, larger than Detectron2's 32-padding on at least one side, so that the padding
masks are exercised), and R50 Mask R-CNN once at the zoo's 800 / 1333.
`test_saturated_objectness`: Detectron2 ranks proposals by raw logit, also where float32 sigmoids
tie at 1.0.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import pytest
import yaml

torch = pytest.importorskip('torch')

from mrcnn_jax.testing import detectron2_reference as d2r  # noqa: E402

try:
    d2r.import_detectron2()
except ImportError as e:   # pragma: no cover - CI has ../shared (tests/ci_skips.py)
    pytest.skip(f'Detectron2 source not available: {e}', allow_module_level=True)

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from mrcnn_jax import Predictor  # noqa: E402
from mrcnn_jax.convert import detectron2 as d2c  # noqa: E402
from mrcnn_jax.models.mask_rcnn import build_model  # noqa: E402
from references import align_ties  # noqa: E402

PHOTOS = {
    'landscape_odd_height': '000000000034.jpg',   # 425 x 640 (h x w)
    'portrait': '000000000072.jpg',               # 640 x 427
    'odd_sized': '000000000049.jpg',              # 500 x 381
    'crowd': '000000000395.jpg',                  # 580 x 640, 9 people
}
# Raw 28x28 mask probabilities: RoIAlign'd on the detection boxes, which agree within ~1e-3 px
# (float32 through 50-101 layers and the box decode); Detectron2's own float32 probabilities are up
# to 1.6e-4 off its float64 ones (R101; `d2r.float64_predictor`), and moving its boxes by 1e-3 px
# moves them by up to 4e-4. So 1e-4 (the torchvision test's value) would sit below the reference's
# own rounding; measured max |ours - Detectron2|: 1.1e-4 R50, 1.7e-4 R101, 1.3e-4 X101.
MASK_PROB_ATOL = 1e-3
# Top-100 RPN proposals: the same ones in the same order, boxes within the detections' 1e-2 px.
# Not 1e-3 (the torchvision test's): Detectron2's own float32 proposals differ from its float64
# ones by up to 1.2e-3 px in R101 (5.8e-4 X101, 4.3e-4 R50), large proposals of a few hundred
# pixels decoded from float32 features, so a 1e-3 bound would sit below the reference's own error.
PROPOSAL_BOX_ATOL = 1e-2
# Keypoint R-CNN, as the torchvision keypoint test: the raw heatmaps 1e-4 relative to their
# largest logit, keypoints (the argmax of each RoI's bicubic resize) within 0.5 px, Detectron2's
# keypoint score (the pool softmax) within 1e-3.
HEATMAP_RTOL = 1e-4
KEYPOINT_PX = 0.5
KEYPOINT_SCORE_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Case:
    config: str
    min_size: int
    max_size: int
    photos: tuple[str, ...]
    bucket: tuple[int, int]           # our one canvas: holds every photo's padded size, or more
    seed: int = 0
    fold_bn: bool = False             # BN statistics folded into weight / bias, as in zoo files
    opts: tuple = ()                  # (key, value) overrides of the yaml, on both sides
    calibration: tuple = ()           # (name, value) arguments of d2r.build_calibrated_detectron2
    min_classes: int = 5              # detections' classes: fewer is a degenerate comparison
    roi_chunk: int = 0                # > 0: our stage program's model.roi.mask_roi_chunk (speed only)


CASES = {
    # Three photos (h x w) on one 512 x 512 canvas: 320 x 482, 480 x 320, 420 x 320.
    'R50': Case('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml', 320, 512,
                ('landscape_odd_height', 'portrait', 'odd_sized'), (512, 512)),
    # 500 x 381 (h x w) -> 504 x 384 (PIL upsamples), on a 512 x 384 canvas.
    'R101': Case('COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml', 384, 640, ('odd_sized',), (512, 384),
                 seed=1),
    # 640 x 427 (h x w) -> 480 x 320, on a 480 x 352 canvas; FAIR's ResNeXt conventions: PIXEL_STD
    # (57.375, 57.12, 58.395), STRIDE_IN_1X1 False, 32 groups of width 8.
    'X101': Case('COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml', 320, 512, ('portrait',),
                 (480, 352), seed=2, fold_bn=True),
    # 425 x 640 (h x w) -> 480 x 723, no mask head.
    'FasterR50': Case('COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml', 480, 800, ('landscape_odd_height',),
                      (480, 736), seed=3),
    # C4: res5 runs on every proposal, ~0.64 GMAC each in R50 whatever the image size: 200
    # proposals instead of 1000 (on both sides) keep it to seconds on 2 CPU cores. 640 x 427 ->
    # 480 x 320 (no 32-padding in C4) on a 512 x 352 canvas.
    'C4R50': Case('COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml', 320, 512, ('portrait',), (512, 352),
                  seed=5, opts=(('MODEL.RPN.POST_NMS_TOPK_TEST', 200),)),
    # Cascade: three box stages, scores averaged, class-agnostic boxes of the last stage. The
    # mean of three independent random classifiers' probabilities is flatter than one's: logits of
    # std 4 per stage give scores spread as far as the other configs' (std 2, one stage).
    'CascadeR50': Case('Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml', 320, 512, ('landscape_odd_height',),
                       (352, 512), seed=6, calibration=(('cls_logit_std', 4.0),)),
    # Keypoint R-CNN: one class (person), no masks, 17 keypoints. 9 people, 580 x 640 (h x w) ->
    # 320 x 353, padded to 320 x 384, on a 352 x 384 canvas. Heatmap logits of std 5: keypoint
    # scores (Detectron2's pool softmax) of ~0.03 typical, up to ~1 (std 3: ~0.007).
    # The keypoint head (8 convs of 512 channels on 14 x 14) costs ~3.7 GMAC per RoI, 25x the
    # rest of the model on this photo: chunks of 8 RoIs, those without a detection skipped, keep
    # it to the ~40 detections (once in `detect`, once for the raw heatmaps).
    # The zoo's head is 8 x 512 (370 GFLOP per 100 RoIs): 8 x 64 keeps its depth at 1/64 the cost.
    'KeypointR50': Case('COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml', 320, 512, ('crowd',), (352, 384),
                        seed=7, opts=(('MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS', (64,) * 8),),
                        calibration=(('keypoint_logit_std', 5.0),), min_classes=1, roi_chunk=8),
}
FULL = Case('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml', 800, 1333, ('landscape_odd_height',),
            (800, 1216), seed=4, fold_bn=True)


def _nested(flat: dict) -> dict:
    """{'A.B.C': v} -> {'A': {'B': {'C': v}}} (a yaml's layout)."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split('.')
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _load(shared_data, name) -> np.ndarray:
    """RGB uint8 (our Predictor's input); Detectron2 gets `[..., ::-1]`."""
    return np.asarray(Image.open(shared_data / 'coco128_seg' / 'images' / name).convert('RGB'))


@pytest.fixture(scope='module')
def photos(shared_data):
    return {k: _load(shared_data, v) for k, v in PHOTOS.items()}


def _stages(m, images, info):
    feats = m.features(images, info)
    boxes, scores, valid, _ = m.proposals(feats, info)
    det = m.detect(feats, info)
    if m.keypoint_head is not None:    # the detections' raw heatmaps too
        det = {**det, 'heatmaps': m.roi_heads.keypoint_predictions(feats, det['boxes'], m.padding(info),
                                                                   active=det['valid'])}
    return feats, boxes, scores, valid, det


class Pair:
    """One config on both sides: Detectron2's DefaultPredictor of a calibrated .pkl and our
    Predictor of the same file, with our stage program compiled once for the config's canvas."""

    def __init__(self, case: Case, photos: dict, tmp_path):
        t0 = time.perf_counter()
        self.case = case
        self.cfg = d2r.zoo_config(case.config, min_size=case.min_size, max_size=case.max_size, **dict(case.opts))
        config_file = d2r.zoo_config_path(case.config)
        if case.opts:   # the user's side: a yaml on top of the zoo's (a _BASE_ chain)
            config_file = tmp_path / 'config.yaml'
            config_file.write_text(yaml.safe_dump({'_BASE_': str(d2r.zoo_config_path(case.config)),
                                                   **_nested(dict(case.opts))}))
        images_bgr = [np.ascontiguousarray(photos[k][:, :, ::-1]) for k in case.photos]
        self.model = d2r.build_calibrated_detectron2(self.cfg, case.seed, images_bgr, fold_bn=case.fold_bn,
                                                     **dict(case.calibration))
        self.pkl = d2r.save_zoo_pkl(self.model, tmp_path / 'model_final_calibrated.pkl')
        self.reference = d2r.default_predictor(self.cfg, self.pkl)
        self.predictor = Predictor.from_detectron2(str(self.pkl), config_file=str(config_file),
                                                   min_size=case.min_size, max_size=case.max_size,
                                                   buckets=[case.bucket])
        model = self.predictor.model
        if case.roi_chunk:
            cfg = copy.deepcopy(self.predictor.config.model)
            cfg.roi.mask_roi_chunk = case.roi_chunk
            model = build_model(cfg)
        self._fn = jax.jit(lambda v, im, inf: model.apply(v, im, inf, method=_stages))
        from detectron2.data import MetadataCatalog
        meta = MetadataCatalog.get(self.cfg.DATASETS.TRAIN[0])
        # The keypoint splits' metadata gets its map when their json (one category: person, id 1)
        # is loaded
        to_contiguous = getattr(meta, 'thing_dataset_id_to_contiguous_id', None) or {1: 0}
        assert len(to_contiguous) == len(meta.thing_classes)
        self.coco_ids = np.asarray([i for i, _ in sorted(to_contiguous.items(), key=lambda kv: kv[1])])
        self._references: dict[str, dict] = {}
        self.pkl.unlink()           # both sides have read it (X101's is 430 MB)
        self.setup_s = time.perf_counter() - t0

    def reference_stages(self, name: str, image_rgb: np.ndarray) -> dict:
        """DefaultPredictor's stages on a photo (run once per photo)."""
        if name not in self._references:
            self._references[name] = d2r.run_stages(self.reference, np.ascontiguousarray(image_rgb[:, :, ::-1]))
        return self._references[name]

    def stages(self, variables, image_rgb):
        x, info, bucket = self.predictor.preprocess(image_rgb)
        assert tuple(bucket) == self.case.bucket, (bucket, self.case.bucket)
        canvas = np.zeros((1,) + tuple(bucket) + (3,), np.float32)
        canvas[0, :x.shape[0], :x.shape[1]] = x
        out = jax.tree_util.tree_map(np.asarray, self._fn(variables, canvas, info[None]))
        return x, info, out


@pytest.fixture(scope='module', params=list(CASES))
def pair(request, photos, tmp_path_factory):
    return Pair(CASES[request.param], photos, tmp_path_factory.mktemp(request.param))


def _mask_iou(a, b):
    a, b = a >= 0.5, b >= 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _sigmoid(x):
    x = np.asarray(x, np.float32)
    return (1 / (1 + np.exp(-x))).astype(np.float32)


def _compare_final(out, final, coco_ids, where):
    """Public outputs (original pixels) against DefaultPredictor's; returns figures."""
    assert len(out['scores']) == len(final['scores']), \
        f'{where}: {len(out["scores"])} detections vs Detectron2 {len(final["scores"])}'
    perm = align_ties(out['scores'], final['scores'], out['boxes'], final['boxes'], tie=1e-4)
    ref = {k: v[perm] for k, v in final.items()}
    np.testing.assert_array_equal(out['labels'], coco_ids[ref['classes']], err_msg=where)
    np.testing.assert_allclose(out['scores'], ref['scores'], atol=1e-4, rtol=0, err_msg=where)
    np.testing.assert_allclose(out['boxes'], ref['boxes'], atol=1e-2, rtol=0, err_msg=where)
    fig = {'final_box_err': float(np.abs(out['boxes'] - ref['boxes']).max(initial=0)),
           'final_score_err': float(np.abs(out['scores'] - ref['scores']).max(initial=0))}
    if 'masks' in ref:
        assert out['masks'].shape == ref['masks'].shape, (out['masks'].shape, ref['masks'].shape)
        ious = [_mask_iou(a, b) for a, b in zip(out['masks'], ref['masks'])]
        fig['worst_mask_iou'] = float(min(ious, default=1.0))
        assert fig['worst_mask_iou'] > 0.99, f'{where}: worst mask IoU {fig["worst_mask_iou"]:.4f}'
    if 'keypoints' in ref:
        kp = _compare_keypoints(out['keypoints'], out['keypoints_scores'], ref['keypoints'], ref['keypoint_scores'],
                                where)
        fig.update({f'final_{key}': v for key, v in kp.items()})
    return fig


def _compare_heatmaps(ours, theirs):
    """The detections' raw 56 x 56 heatmap logits [k, K, 56, 56], relative to the largest."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    fig = {'heatmap_std': float(theirs.std()),
           'heatmap_rel_err': float(np.abs(ours - theirs).max() / np.abs(theirs).max())}
    assert fig['heatmap_std'] > 1.0, 'degenerate comparison: heatmap logits without spread'
    assert fig['heatmap_rel_err'] < HEATMAP_RTOL, f'heatmaps: relative error {fig["heatmap_rel_err"]:.2e}'
    return fig


def _compare_keypoints(ours, scores, theirs, ref_scores, where):
    """Keypoints [k, K, 3] (x, y, 1) and their scores [k, K] against Detectron2's pred_keypoints
    [k, K, 2] (x, y) and scores (pool softmax, pred_keypoints[..., 2])."""
    np.testing.assert_array_equal(ours[..., 2], 1.0, err_msg=where)
    err = np.abs(ours[..., :2] - theirs).max(-1)
    fig = {'keypoint_err': float(err.max(initial=0)),
           'keypoints_moved': int((err > 0.01).sum()),     # argmax on another pixel: near-ties
           'keypoint_score_err': float(np.abs(scores - ref_scores).max(initial=0)),
           'keypoint_score_rel_err': float((np.abs(scores - ref_scores) / ref_scores).max(initial=0))}
    assert fig['keypoint_err'] < KEYPOINT_PX, f'{where}: keypoints differ by {fig["keypoint_err"]:.3f} px'
    assert fig['keypoint_score_err'] < KEYPOINT_SCORE_ATOL, \
        f'{where}: keypoint scores differ by {fig["keypoint_score_err"]:.2e}'
    return fig


def compare(pair: Pair, image_rgb: np.ndarray, variables=None, ref=None, proposal_tie_window: int = 8) -> dict:
    """All stages of one photo; returns the measured figures (printed by the tests).
    variables: ours (default: the predictor's); ref: Detectron2's stages (default: run_stages of
    the pair's DefaultPredictor); proposal_tie_window: how far apart two proposals whose
    probabilities tie may be in the two orders."""
    if ref is None:
        ref = d2r.run_stages(pair.reference, np.ascontiguousarray(image_rgb[:, :, ::-1]))
    x, info, (feats, boxes, scores, valid, det) = pair.stages(pair.predictor.variables if variables is None
                                                              else variables, image_rgb)
    fig = {}

    # Preprocessing: Detectron2's resized (PIL), normalized image, inside its padded tensor.
    rh, rw = ref['image_size']
    assert (int(info[2]), int(info[3])) == (rh, rw), f'resized size {info[2:4]} vs Detectron2 {(rh, rw)}'
    fig['input_err'] = float(np.abs(x - ref['input'][:rh, :rw]).max())
    assert fig['input_err'] < 1e-4, f'preprocessed image differs by {fig["input_err"]:.2e}'
    ph, pw = ref['input'].shape[:2]
    assert pair.case.bucket[0] >= ph and pair.case.bucket[1] >= pw

    # Backbone + FPN (p2..p6; res4 for C4), inside Detectron2's padded tensor.
    fig['feature_rel_err'] = {}
    assert len(feats) == len(ref['features'])
    for level, ours in zip(ref['features'], feats):
        theirs = ref['features'][level]
        mine = ours[0, :theirs.shape[0], :theirs.shape[1]]
        rel = float(np.abs(mine - theirs).max() / np.abs(theirs).max())
        fig['feature_rel_err'][level] = rel
        assert rel < 1e-4, f'feature {level}: relative error {rel:.2e}'

    # RPN proposals: Detectron2 orders them by objectness logit, ours by its sigmoid.
    n_ref = len(ref['proposals'])
    assert int(valid[0].sum()) == n_ref, f'{int(valid[0].sum())} proposals vs Detectron2 {n_ref}'
    ref_scores = _sigmoid(ref['proposal_logits'])
    n = min(100, n_ref)
    while n < n_ref and ref_scores[n - 1] - ref_scores[n] <= 1e-6:
        n += 1    # no cut inside a group of tied probabilities: its order is free, its members not
    fig['proposals_compared'] = n
    perm = align_ties(scores[0, :n], ref_scores[:n], boxes[0, :n], ref['proposals'][:n],
                      window=proposal_tie_window)
    fig['proposal_score_err'] = float(np.abs(scores[0, :n] - ref_scores[perm]).max())
    fig['proposal_box_err'] = float(np.abs(boxes[0, :n] - ref['proposals'][perm]).max())
    np.testing.assert_allclose(scores[0, :n], ref_scores[perm], atol=1e-5, rtol=0)
    np.testing.assert_allclose(boxes[0, :n], ref['proposals'][perm], atol=PROPOSAL_BOX_ATOL, rtol=0)

    # Detections in the resized frame (our labels are Detectron2's classes + 1).
    raw = ref['raw']
    k = int(det['valid'][0].sum())
    fig['detections'] = k
    assert k == len(raw['scores']), f'{k} detections vs Detectron2 {len(raw["scores"])}'
    assert k >= 20, 'degenerate comparison: too few detections'
    assert raw['scores'].max() - raw['scores'].min() > 0.15, 'degenerate comparison: scores do not spread'
    assert len(set(raw['classes'].tolist())) >= pair.case.min_classes, 'degenerate comparison: one class everywhere'
    perm = align_ties(det['scores'][0, :k], raw['scores'], det['boxes'][0, :k], raw['boxes'], tie=1e-4)
    np.testing.assert_array_equal(det['labels'][0, :k], raw['classes'][perm] + 1)
    fig['det_score_err'] = float(np.abs(det['scores'][0, :k] - raw['scores'][perm]).max())
    fig['det_box_err'] = float(np.abs(det['boxes'][0, :k] - raw['boxes'][perm]).max())
    np.testing.assert_allclose(det['scores'][0, :k], raw['scores'][perm], atol=1e-4, rtol=0)
    np.testing.assert_allclose(det['boxes'][0, :k], raw['boxes'][perm], atol=1e-2, rtol=0)
    if 'mask_probs' in raw:
        probs, ref_probs = det['masks'][0, :k], raw['mask_probs'][perm]
        m = pair.predictor.config.model.roi.mask_resolution      # 28 (14 for C4)
        assert probs.shape == ref_probs.shape == (k, m, m)
        fig['mask_prob_err'] = float(np.abs(probs - ref_probs).max())
        fig['mask_unsaturated'] = float(((ref_probs > 0.05) & (ref_probs < 0.95)).mean())
        assert fig['mask_prob_err'] < MASK_PROB_ATOL, f'raw mask probabilities differ by {fig["mask_prob_err"]:.2e}'
    if 'heatmaps' in raw:
        fig.update(_compare_heatmaps(det['heatmaps'][0, :k], raw['heatmaps'][perm]))
        fig.update(_compare_keypoints(det['keypoints'][0, :k], det['keypoints_scores'][0, :k],
                                      raw['keypoints'][perm], raw['keypoint_scores'][perm], 'resized frame'))

    # The public output: our Predictor's host postprocess of these detections (what its host path
    # returns for this canvas) against DefaultPredictor's instances.
    out = pair.predictor.postprocess({key: v[0] for key, v in det.items() if key != 'heatmaps'}, info, paste=True)
    fig.update(_compare_final(out, ref['final'], pair.coco_ids, 'postprocess'))
    fig['final_detections'] = len(out['scores'])
    fig['score_range'] = (float(raw['scores'].min()), float(raw['scores'].max()))
    return fig


def _report(name, fig):
    print(f'\n{name}: ' + ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in fig.items()))


def test_checkpoint_round_trip(pair):
    """DefaultPredictor read the .pkl into exactly the calibrated model (no name heuristics,
    nothing missing or left over)."""
    ours, theirs = pair.model.state_dict(), pair.reference.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    print(f'\n{pair.case.config}: setup {pair.setup_s:.1f} s')


def test_parity(pair, photos):
    for name in pair.case.photos:
        fig = compare(pair, photos[name], ref=pair.reference_stages(name, photos[name]))
        _report(f'{pair.case.config} {pair.case.min_size}/{pair.case.max_size} {name}', fig)


@pytest.mark.parametrize('pair', ['R50'], indirect=True)
def test_predictor_call(pair, photos):
    """`Predictor.__call__` itself, on-device resize and paste (the default) and the host path,
    against DefaultPredictor (R50 and one photo only: its programs compile once more)."""
    for name in pair.case.photos[:1]:
        ref = pair.reference_stages(name, photos[name])
        for on_device in (True, False):
            pair.predictor.on_device = on_device
            try:
                fig = _compare_final(pair.predictor(photos[name]), ref['final'], pair.coco_ids,
                                     f'{name} on_device={on_device}')
            finally:
                pair.predictor.on_device = True
            _report(f'{pair.case.config} Predictor.__call__ {name} on_device={on_device}', fig)


@pytest.mark.parametrize('pair', ['R50'], indirect=True)
def test_saturated_objectness(pair, photos):
    """Detectron2 ranks RPN proposals, and runs their NMS, by the raw objectness logit; we report
    its sigmoid, which is 1.0 or a few float32 steps below it for every logit above ~16. With the R50
    model's objectness bias raised by 8 (top logits ~22, 40 of the 1000 proposals at probability
    1.0 on this photo, and tie groups of dozens just below) the proposals must still be
    Detectron2's, kept by the same NMS, and the detections the same. Only their order within a
    tie of probabilities is free (window 100): our per-level NMS must visit tied candidates in
    logit order, as Detectron2's does, to keep the same boxes."""
    model = copy.deepcopy(pair.model)
    with torch.no_grad():
        model.proposal_generator.rpn_head.objectness_logits.bias += 8.0
    image = photos['landscape_odd_height']
    ref = d2r.run_stages(d2r.in_memory_predictor(model, pair.cfg), np.ascontiguousarray(image[:, :, ::-1]))
    assert (_sigmoid(ref['proposal_logits']) == 1.0).sum() >= 10, 'the case needs saturated probabilities'
    original = pair.predictor.variables
    # Through the predictor's setter: placed as its own variables are, so the compiled stage
    # program is reused.
    pair.predictor.variables = d2c.convert_state_dict(d2c.load_checkpoint(d2r.state_dict_numpy(model)),
                                                      pair.predictor.config.model)
    try:
        fig = compare(pair, image, ref=ref, proposal_tie_window=100)
    finally:
        pair.predictor.variables = original
    _report(f'{pair.case.config} objectness bias +8', fig)


@pytest.mark.slow
def test_parity_full_size(photos, tmp_path):
    """R50 Mask R-CNN at the zoo's 800 / 1333 (425 x 640 -> 800 x 1205, canvas 800 x 1216), BN
    statistics folded as in the zoo's files."""
    pair = Pair(FULL, photos, tmp_path)
    fig = compare(pair, photos['landscape_odd_height'])
    _report(f'{FULL.config} 800/1333 (setup {pair.setup_s:.1f} s)', fig)
