"""Detectron2 reference models for parity tests and benchmarks: random, seeded, not degenerate.

Detectron2 is not on the package index: its unmodified Python source is vendored beside the
project (`../shared/vendor/detectron2`, or `$MRCNN_JAX_DETECTRON2`) and runs on the CPU without
its C++ extension. Only tests and benchmarks import this module; the product never imports
Detectron2. torch must be imported before tensorflow (see tests/conftest.py).

The reference runs as users run Detectron2:
  * `zoo_config(name)`: a model-zoo yaml (`configs/<name>`) on the CPU, optionally at other test sizes;
  * `build_calibrated_detectron2(cfg, seed, images)`: `detectron2.modeling.build_model` under a
    fixed seed (Detectron2's own initialisation), then calibrated into a trained network's regime
    on the given photos, in forward order:
      - every FrozenBatchNorm2d's running mean / variance are its input's per-channel statistics
        (perturbed), its affine weight / bias random around (1, 0), so each normalized output is
        O(1) (random statistics make activations grow to O(1e3) through 50-101 layers, and every
        later comparison a test of float32 cancellation); the last BN of each residual branch is
        scaled down (`residual_scale`) so that 23 blocks of res4 in R101 / X101 do not add up to
        O(10) activations;
      - each FPN output conv is scaled so that p2..p5 have unit std (c2_xavier_fill leaves them
        at very different scales per level);
      - the RPN head: its 3x3 conv to unit-scale output, objectness logits to a spread
        (`rpn_logit_std` 2 over all anchors; the top ones reach ~10-18 on photos) and anchor
        deltas to std `rpn_delta_std` (0.05); Detectron2's std-0.01 init gives logits ~0;
      - C4: res5's FrozenBN statistics from pooled res4 features of the top proposals (res5 runs in
        the RoI heads, on RoI features);
      - the box classifier (per stage for Cascade, each stage's input boxes being the previous
        stage's calibrated regression; the detection count is Cascade's own mean of the stages'
        probabilities): the mean fc2 feature (C4: res5's spatial mean) is projected out of random weights (random fc
        features share a large common component, which makes one class win everywhere) and the
        logits scaled to std `cls_logit_std` (2); the background logit is proportional to the
        RoI's common feature component (a constant bias gave 60, 0 and 60 detections on three
        photos whose activations differ by 30%), its mean found by bisection so that the
        calibration photos give `detections` (40) detections on average: a few dozen, scores
        spread over (0.05, ~0.3-0.9), far from the 100-detection cap whose boundary would
        otherwise cut between near-equal scores; then moved slightly to keep every score away
        from the 0.05 threshold (>= 3e-4 on the test photos); class-specific deltas of std
        `box_delta_std` (0.5, i.e. 0.05 / 0.1 after Detectron2's (10, 10, 5, 5) weights);
      - the mask predictor's logits to std `mask_logit_std` (3; the std-0.001 init gives
        probabilities of 0.5 everywhere, which makes the 0.5 threshold a coin toss);
      - Keypoint R-CNN's heatmap logits to std `keypoint_logit_std` (3). These two per-RoI
        branches are `detectron2_heads.py`'s.
    The head scales are set from Detectron2's own float32 error (its float32 run against a
    float64 copy of the same model): it must stay well below the parity tolerances, or a
    comparison with any other float32 implementation measures rounding. With class logits of
    std 3 and box deltas of std 1, R101's scores were 5.2e-5 off their float64 values (ours,
    9.4e-5: the 1e-4 tolerance failed on rounding alone) and its boxes 3.2e-3 px; at the
    defaults, 1.7e-5 and 1.5e-3 px (X101 1.6e-5, 1.9e-3 px; R50 <= 1.3e-5, 6.4e-4 px).
    `fold_bn=True` then folds the BN statistics into weight / bias with mean 0 and variance 1, the
    layout of real model-zoo checkpoints (trained from Caffe2's MSRA weights);
  * `save_zoo_pkl(model, path)`: the model-zoo pickle (`model_final_*.pkl` layout);
  * `default_predictor(cfg, pkl)`: `detectron2.engine.DefaultPredictor` loading that pickle;
  * `run_stages(predictor, image_bgr)`: DefaultPredictor's own call, with the intermediate stages
    captured by forward hooks.
All images here are HxWx3 uint8 **BGR**, as DefaultPredictor takes them (`rgb[..., ::-1]`).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def detectron2_root() -> pathlib.Path:
    """The vendored Detectron2 source: $MRCNN_JAX_DETECTRON2, else ../shared/vendor/detectron2."""
    env = os.environ.get('MRCNN_JAX_DETECTRON2')
    return pathlib.Path(env) if env else REPO_ROOT.parent / 'shared' / 'vendor' / 'detectron2'


def import_detectron2():
    """Puts the vendored source on sys.path and returns the `detectron2` package (torch first)."""
    import torch  # noqa: F401  (before detectron2 and before any tensorflow)
    root = detectron2_root()
    if not (root / 'detectron2' / '__init__.py').exists():
        raise ImportError(f'Detectron2 source not found at {root} (set MRCNN_JAX_DETECTRON2)')
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import detectron2
    return detectron2


def zoo_config_path(name: str) -> pathlib.Path:
    """configs/<name>, e.g. 'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml'."""
    path = detectron2_root() / 'configs' / name
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def zoo_config(name: str, min_size: int | None = None, max_size: int | None = None, **opts: Any):
    """A model-zoo config on the CPU; `min_size` / `max_size` override INPUT.MIN_SIZE_TEST /
    MAX_SIZE_TEST; other overrides as dotted keys, e.g. **{'MODEL.ROI_HEADS.SCORE_THRESH_TEST': 0.1}."""
    import_detectron2()
    from detectron2.config import get_cfg
    cfg = get_cfg()
    cfg.merge_from_file(str(zoo_config_path(name)))
    cfg.MODEL.DEVICE = 'cpu'
    cfg.MODEL.WEIGHTS = ''
    if min_size is not None:
        cfg.INPUT.MIN_SIZE_TEST = int(min_size)
    if max_size is not None:
        cfg.INPUT.MAX_SIZE_TEST = int(max_size)
    if opts:
        cfg.merge_from_list([x for kv in opts.items() for x in kv])
    cfg.freeze()
    return cfg


# -- inputs, as DefaultPredictor makes them ------------------------------------------------------

def _resize_aug(cfg):
    from detectron2.data import transforms as T
    return T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)


def model_input(cfg, image_bgr: np.ndarray) -> dict:
    """DefaultPredictor.__call__'s input dict for one BGR uint8 image (resize with PIL, CHW float)."""
    import torch
    img = np.asarray(image_bgr)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'expected an HxWx3 uint8 BGR image, got {img.dtype} {img.shape}')
    if cfg.INPUT.FORMAT == 'RGB':
        img = img[:, :, ::-1]
    h, w = img.shape[:2]
    resized = _resize_aug(cfg).get_transform(img).apply_image(img)
    return {'image': torch.as_tensor(resized.astype('float32').transpose(2, 0, 1)), 'height': h, 'width': w}


def _calibration_batch(model, inputs: Sequence[dict]):
    """The preprocessed photos center-cropped to a common size and stacked: a batch without
    padding, so that BN statistics see image content only. The common size is a multiple of
    the backbone's size_divisibility (32; FPN's top-down sums need it)."""
    import torch
    sizes = [x['image'].shape[-2:] for x in inputs]
    d = max(int(model.backbone.size_divisibility), 1)
    h, w = (max(min(s[k] for s in sizes) // d * d, d) for k in (0, 1))
    crops = []
    for x, (hh, ww) in zip(inputs, sizes):
        t, l = (hh - h) // 2, (ww - w) // 2
        crops.append(model.preprocess_image([x]).tensor[0, :, t:t + h, l:l + w])
    return torch.stack(crops)


# -- calibration ---------------------------------------------------------------------------------

def _bottom_up(model):
    """The ResNet: `backbone.bottom_up` under FPN, the backbone itself for C4."""
    return getattr(model.backbone, 'bottom_up', model.backbone)


def _calibrate_frozen_bn(module, x, gen, residual_scale: float) -> None:
    """Each FrozenBN's statistics in `module` (a ResNet, or C4's res5) from its input when
    `module(x)` runs (in forward order)."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d
    # The last norm of each residual branch (BottleneckBlock.conv3, BasicBlock.conv2).
    last_in_branch = {id((m.conv3 if hasattr(m, 'conv3') else m.conv2).norm)
                      for m in module.modules() if hasattr(m, 'shortcut')}

    def hook(m, args):
        x = args[0]
        c = x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3))
        m.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(c, generator=gen))
        m.running_var.copy_(var * (0.8 + 0.4 * torch.rand(c, generator=gen)) + 1e-3)
        m.weight.copy_(0.5 + torch.rand(c, generator=gen))
        m.bias.copy_(0.2 * torch.randn(c, generator=gen))
        if id(m) in last_in_branch:
            m.weight.mul_(residual_scale)
            m.bias.mul_(residual_scale)
    handles = [m.register_forward_pre_hook(hook) for m in module.modules()
               if isinstance(m, FrozenBatchNorm2d)]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()


def _calibrate_res5(model, cache, gen, residual_scale: float, rois_per_image: int = 64) -> None:
    """C4: res5's FrozenBN statistics from pooled res4 features of the calibration photos' top
    proposals (RoI features, the distribution res5 sees at inference)."""
    import torch
    heads = model.roi_heads
    pooled = []
    for images, feats in cache:
        proposals, _ = model.proposal_generator(images, feats)
        boxes = proposals[0].proposal_boxes[:rois_per_image]
        pooled.append(heads.pooler([feats[f] for f in heads.in_features], [boxes]))
    _calibrate_frozen_bn(heads.res5, torch.cat(pooled), gen, residual_scale)


def _calibrate_fpn(model, cache) -> None:
    """Scale each FPN output conv so that its level has unit std over the calibration photos, and
    the cached features with it (p_k = output_conv_k(...) is linear in that conv's weight and
    bias; p6 is a max-pool of p5, so it scales with p5; another top block is recomputed)."""
    import torch
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
    fpn = model.backbone
    if not isinstance(fpn, FPN):   # C4: res4 is BN-normalized already
        return
    scales = {}
    for n, conv in fpn.named_children():
        if not n.startswith('fpn_output'):
            continue
        level = 'p' + n[len('fpn_output'):]
        s = torch.cat([f[level].flatten() for _, f in cache]).std()
        conv.weight.div_(s)
        conv.bias.div_(s)
        scales[level] = s
    if fpn.top_block is not None and not isinstance(fpn.top_block, LastLevelMaxPool):
        cache[:] = [(images, fpn(images.tensor)) for images, _ in cache]
        return
    for _, feats in cache:
        for level in feats:
            key = level if level in scales else 'p' + fpn.top_block.in_feature[1:]
            feats[level] = feats[level] / scales[key]


def _forward_cache(model, inputs) -> list[tuple]:
    """(ImageList, features) of each calibration photo, alone, as DefaultPredictor runs it."""
    out = []
    for x in inputs:
        images = model.preprocess_image([x])
        out.append((images, model.backbone(images.tensor)))
    return out


def _calibrate_rpn(model, cache, logit_std: float, delta_std: float) -> None:
    import torch
    head = model.proposal_generator.rpn_head
    feats = [[f[k] for k in model.proposal_generator.in_features] for _, f in cache]
    t = [head.conv(x) for fs in feats for x in fs]
    # conv is Conv2d + ReLU with zero bias: scaling its weight scales its output.
    r = torch.cat([x.flatten() for x in t]).pow(2).mean().sqrt()
    head.conv.weight.div_(r)
    head.conv.bias.zero_()
    t = [x / r for x in t]
    logits = torch.cat([head.objectness_logits(x).flatten() for x in t])
    deltas = torch.cat([head.anchor_deltas(x).flatten() for x in t])
    head.objectness_logits.weight.mul_(logit_std / logits.std())
    head.objectness_logits.bias.zero_()
    head.anchor_deltas.weight.mul_(delta_std / deltas.std())
    head.anchor_deltas.bias.zero_()


def _box_features(model, feats, boxes, k: int = 0):
    """What box predictor `k` reads for boxes (a list of one Boxes): fc2 features (FPN), stage k's
    (Cascade), the spatial mean of res5 (C4)."""
    heads = model.roi_heads
    if hasattr(heads, 'res5'):
        return heads._shared_roi_transform([feats[f] for f in heads.in_features], boxes).mean(dim=[2, 3])
    pooled = heads.box_pooler([feats[f] for f in heads.box_in_features], boxes)
    return (heads.box_head[k] if hasattr(heads, 'num_cascade_stages') else heads.box_head)(pooled)


def _predictors(model) -> list:
    pred = model.roi_heads.box_predictor
    return list(pred) if hasattr(model.roi_heads, 'num_cascade_stages') else [pred]


def _calibrate_box_predictor(model, cache, gen, logit_std: float, detections: float,
                             delta_std: float = 1.0) -> float:
    """Per box stage (one, or Cascade's three, in order: each stage's input boxes are the previous
    stage's calibrated regression): classifier logits of std `logit_std` around the mean-free
    feature direction, deltas of std `delta_std`. Then the background weight found by bisection
    so that the calibration photos give `detections` detections on average (Detectron2's own
    inference: for Cascade the mean of the stages' probabilities and the last stage's boxes, on
    the cached features); returns (it, the detections)."""
    import torch
    from detectron2.structures import Boxes
    preds = _predictors(model)
    boxes = []                              # per image: the current stage's input boxes
    proposals = []
    for images, feats in cache:
        p, _ = model.proposal_generator(images, feats)
        proposals.append(p)
        boxes.append(p[0].proposal_boxes)
    stage_feats, stage_mu, stage_common = [], [], []
    for k, pred in enumerate(preds):
        fs = [_box_features(model, feats, [b], k) for (_, feats), b in zip(cache, boxes)]
        x = torch.cat(fs)
        mu = x.mean(0)
        mu = mu / mu.norm()
        layer = pred.cls_score                  # (K + 1) x D, background last
        w = torch.randn(layer.weight.shape, generator=gen)
        w = w - (w @ mu)[:, None] * mu[None, :]
        layer.weight.copy_(w * (logit_std / (x @ w.T).std()))
        layer.bias.zero_()
        # Deltas of a trained head's size: std `delta_std` before the box weights.
        reg = pred.bbox_pred
        reg.weight.mul_(delta_std / reg(x).std())
        reg.bias.zero_()
        stage_feats.append(fs)
        stage_mu.append(mu)
        # The background logit grows with the RoI's common (mean-direction) feature component,
        # as the foreground logits grow with the rest: photos whose activations are a little
        # weaker then still give detections (a constant bias gave 60, 0 and 60 on three photos).
        stage_common.append((x @ mu).mean())
        if k + 1 < len(preds):   # the next stage's boxes: Cascade's _create_proposals_from_boxes
            nxt = []
            for f, b, p in zip(fs, boxes, proposals):
                nb = Boxes(pred.predict_boxes((pred.cls_score(f), reg(f)), [_with_boxes(p[0], b)])[0])
                nb.clip(p[0].image_size)
                nxt.append(nb)
            boxes = nxt
    pred = preds[-1]
    # Final boxes (independent of the background logit), decoded once: class-specific for one
    # stage, the last stage's class-agnostic regression of its input boxes for Cascade.
    decoded = [(pred.predict_boxes((pred.cls_score(f), pred.bbox_pred(f)), [_with_boxes(p[0], b)])[0],
                p[0].image_size) for f, b, p in zip(stage_feats[-1], boxes, proposals)]

    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
    thresh = pred.test_score_thresh
    cap = pred.test_topk_per_image

    def probs(i):
        return sum(pr.cls_score(fs[i]).softmax(-1) for pr, fs in zip(preds, stage_feats)) / len(preds)

    def detections_of(i, score_thresh):
        boxes_i, size = decoded[i]
        return fast_rcnn_inference([boxes_i], [probs(i)], [size], score_thresh, pred.test_nms_thresh, cap)[0][0]

    def count(i):
        """The detection count of one photo; without the per-class NMS (slow on tens of thousands
        of candidates) where so many candidates pass the threshold (> 15x the 100-detection cap)
        that the cap binds: far from the target, only the direction counts."""
        if int((probs(i)[:, :-1] > thresh).sum()) > 15 * cap:
            return cap
        return len(detections_of(i, thresh))

    def set_beta(beta):
        for pr, mu, common in zip(preds, stage_mu, stage_common):
            pr.cls_score.weight[-1] = beta * mu / common

    def mean_count(beta):
        set_beta(beta)
        return np.mean([count(i) for i in range(len(cache))])
    lo, hi = -10.0, 50.0                         # count(lo) high, count(hi) ~ 0
    for _ in range(13):                          # to ~0.01
        mid = 0.5 * (lo + hi)
        if mean_count(mid) > detections:
            lo = mid
        else:
            hi = mid
    # Then, among nearby values (scores move by ~2% per 0.02), the one that keeps every score
    # farthest from the 0.05 threshold, so that a detection cannot come and go with float32
    # rounding; candidates are what survives NMS at half the threshold.
    def margin(beta):
        set_beta(beta)
        s = torch.cat([detections_of(i, 0.5 * thresh).scores for i in range(len(cache))])
        return float((s - thresh).abs().min()) if len(s) else 0.0
    beta = max((hi + 0.02 * k for k in range(-2, 3)), key=margin)
    set_beta(beta)
    return beta, [detections_of(i, thresh) for i in range(len(cache))]


def _with_boxes(instances, boxes):
    """A copy of proposal Instances whose proposal_boxes are `boxes` (for predict_boxes)."""
    from detectron2.structures import Instances
    out = Instances(instances.image_size)
    out.proposal_boxes = boxes
    return out


def fold_frozen_bn(model) -> None:
    """Fold every FrozenBN's statistics into its weight / bias (mean 0, var 1), as in the model
    zoo's checkpoints: y = x * w' / sqrt(1 + eps) + b' computes what the calibrated BN computed."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                inv = (m.running_var + m.eps).rsqrt()
                m.bias.sub_(m.running_mean * m.weight * inv)
                m.weight.mul_(inv * (1.0 + m.eps) ** 0.5)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)


def build_calibrated_detectron2(cfg, seed: int = 0, calibration_images: Sequence[np.ndarray] = (), *,
                                residual_scale: float = 0.5, rpn_logit_std: float = 2.0,
                                rpn_delta_std: float = 0.05, cls_logit_std: float = 2.0,
                                detections: float = 40, box_delta_std: float = 0.5, mask_logit_std: float = 3.0,
                                keypoint_logit_std: float = 3.0, fold_bn: bool = False):
    """An eval-mode Detectron2 model (`build_model(cfg)`) with seeded random weights calibrated on
    `calibration_images` (BGR uint8 photos, at cfg's test sizing) into a trained network's regime;
    see the module docstring."""
    import torch
    import_detectron2()
    from detectron2.modeling import build_model

    from mrcnn_jax.testing import detectron2_heads as heads
    if len(calibration_images) == 0:
        raise ValueError('calibration_images: give at least one photo (BGR uint8)')
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = build_model(cfg).eval()
    inputs = [model_input(cfg, im) for im in calibration_images]
    with torch.no_grad():
        batch = _calibration_batch(model, inputs)
        _calibrate_frozen_bn(_bottom_up(model), batch, gen, residual_scale)
        cache = _forward_cache(model, inputs)
        _calibrate_fpn(model, cache)
        _calibrate_rpn(model, cache, rpn_logit_std, rpn_delta_std)
        if hasattr(model.roi_heads, 'res5'):
            _calibrate_res5(model, cache, gen, residual_scale)
        _, dets = _calibrate_box_predictor(model, cache, gen, cls_logit_std, detections, box_delta_std)
        if cfg.MODEL.MASK_ON:
            heads.calibrate_mask_logits(model, cache, dets, mask_logit_std)
        if cfg.MODEL.KEYPOINT_ON:
            heads.calibrate_keypoint_logits(model, cache, dets, keypoint_logit_std)
        if fold_bn:
            fold_frozen_bn(model)
    return model


# -- checkpoints and the predictor ---------------------------------------------------------------

def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def save_zoo_pkl(model, path) -> pathlib.Path:
    """The model zoo's `model_final_*.pkl` layout: a pickle of {'model': {name: numpy array},
    '__author__', 'matching_heuristics': False}. With '__author__' present DetectionCheckpointer
    takes the names as they are (no Caffe2 name heuristics)."""
    path = pathlib.Path(path)
    data = {'model': state_dict_numpy(model), '__author__': 'mrcnn_jax.testing', 'matching_heuristics': False}
    with open(path, 'wb') as f:
        pickle.dump(data, f, protocol=2)
    return path


def default_predictor(cfg, pkl_path):
    """detectron2.engine.DefaultPredictor with MODEL.WEIGHTS = pkl_path: the reference, as users run it."""
    import_detectron2()
    from detectron2.engine import DefaultPredictor
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(pkl_path)
    cfg.freeze()
    return DefaultPredictor(cfg)


def in_memory_predictor(model, cfg):
    """A DefaultPredictor around an existing model (no checkpoint round trip): its own __call__."""
    import_detectron2()
    from detectron2.engine import DefaultPredictor
    p = DefaultPredictor.__new__(DefaultPredictor)
    p.cfg = cfg.clone()
    p.model = model.eval()
    p.aug = _resize_aug(cfg)
    p.input_format = cfg.INPUT.FORMAT
    return p


class _Float64Predictor:
    """DefaultPredictor's call on a float64 copy of a model (see `float64_predictor`)."""

    def __init__(self, model, cfg):
        import copy
        self.model = copy.deepcopy(model).double().eval()
        self._inner = in_memory_predictor(self.model, cfg)

    def __call__(self, image_bgr):
        import torchvision
        from detectron2.modeling.proposal_generator import proposal_utils
        from detectron2.modeling.roi_heads import fast_rcnn

        def batched_nms(boxes, scores, idxs, iou_threshold):   # Detectron2's casts boxes to float32
            return torchvision.ops.batched_nms(boxes.to(scores.dtype), scores, idxs, iou_threshold)
        saved = proposal_utils.batched_nms, fast_rcnn.batched_nms
        proposal_utils.batched_nms = fast_rcnn.batched_nms = batched_nms
        try:
            return self._inner(image_bgr)
        finally:
            proposal_utils.batched_nms, fast_rcnn.batched_nms = saved


def float64_predictor(model, cfg):
    """The same model in float64 (its input still PIL's uint8 resize), for measuring the float32
    rounding error of Detectron2 itself: `run_stages(float64_predictor(m, cfg), image)` against
    `run_stages(in_memory_predictor(m, cfg), image)`. A parity tolerance below that error would
    compare rounding, not semantics."""
    import_detectron2()
    return _Float64Predictor(model, cfg)


# -- stages --------------------------------------------------------------------------------------

def _instances_numpy(inst) -> dict[str, np.ndarray]:
    out = {}
    for k, v in inst.get_fields().items():
        t = v.tensor if hasattr(v, 'tensor') else v
        out[k] = t.detach().cpu().clone().numpy()
    return out


def run_stages(predictor, image_bgr: np.ndarray) -> dict:
    """DefaultPredictor(image_bgr), keeping the intermediate stages (forward hooks, which copy,
    because detector_postprocess scales the raw boxes in place). `predictor`: a DefaultPredictor,
    or an object with its attributes (`in_memory_predictor`). Returns numpy arrays:
      input        [Hp, Wp, 3] the normalized, padded tensor the backbone sees (channel order of
                   cfg.INPUT.FORMAT, BGR for the zoo's MSRA configs);
      image_size   (h, w) of the resized image inside it;
      features     {'p2'..'p6': [h, w, 256]};
      proposals    [N, 4] RPN proposals in the resized frame, in Detectron2's order (by logit),
      proposal_logits [N];
      raw          RoI heads' output in the resized frame: boxes, scores, classes (0-based, no
                   background), mask_probs [N, 28, 28] (the detection class's sigmoid), keypoints
                   [N, K, 2], keypoint_scores [N, K], heatmaps [N, K, 56, 56] (Keypoint R-CNN);
      final        what DefaultPredictor returns, in original pixels: boxes, scores, classes,
                   masks [N, H, W] bool (pasted, >= 0.5), keypoints, keypoint_scores.
    """
    import torch
    model = predictor.model
    got: dict[str, Any] = {}

    def on_backbone(m, args, out):
        got['input'] = args[0][0].detach().permute(1, 2, 0).numpy().copy()
        got['features'] = {k: v[0].detach().permute(1, 2, 0).numpy().copy() for k, v in out.items()}

    def on_rpn(m, args, out):
        inst = out[0][0]
        got['image_size'] = tuple(int(v) for v in inst.image_size)
        got['proposals'] = inst.proposal_boxes.tensor.detach().clone().numpy()
        got['proposal_logits'] = inst.objectness_logits.detach().clone().numpy()

    def on_roi_heads(m, args, out):
        got['raw'] = _instances_numpy(out[0][0])

    hooks = [model.backbone.register_forward_hook(on_backbone)]
    if model.proposal_generator is not None:
        hooks.append(model.proposal_generator.register_forward_hook(on_rpn))
    hooks.append(model.roi_heads.register_forward_hook(on_roi_heads))
    try:
        with torch.no_grad():
            final = predictor(np.ascontiguousarray(image_bgr))['instances']
    finally:
        for h in hooks:
            h.remove()
    from mrcnn_jax.testing.detectron2_heads import keypoint_fields
    raw = got.pop('raw')
    got['raw'] = {'boxes': raw['pred_boxes'], 'scores': raw['scores'], 'classes': raw['pred_classes'],
                  **keypoint_fields(raw)}
    if 'pred_masks' in raw:
        got['raw']['mask_probs'] = raw['pred_masks'][:, 0]
    f = _instances_numpy(final)
    got['final'] = {'boxes': f['pred_boxes'], 'scores': f['scores'], 'classes': f['pred_classes'],
                    **keypoint_fields(f)}
    if 'pred_masks' in f:
        got['final']['masks'] = f['pred_masks']
    return got


def score_gaps(scores: np.ndarray) -> float:
    """The smallest difference between two scores (inf for fewer than two)."""
    s = np.sort(np.asarray(scores, np.float64))
    return float(np.diff(s).min()) if len(s) > 1 else float('inf')


def calibration_report(stages: dict) -> dict[str, float]:
    """Figures that say whether a comparison on these outputs is meaningful (not degenerate)."""
    raw, final = stages['raw'], stages['final']
    rep = {
        'feature_std': {k: float(v.std()) for k, v in stages['features'].items()},
        'proposals': len(stages['proposals']),
        'proposal_logit_std': float(stages['proposal_logits'].std()),
        'proposal_logit_gap_top100': score_gaps(stages['proposal_logits'][:100]),
        'detections': len(final['scores']),
        'score_range': (float(final['scores'].min()), float(final['scores'].max())) if len(final['scores']) else None,
        'score_min_gap': score_gaps(final['scores']),
        'classes': len(set(final['classes'].tolist())),
    }
    if 'mask_probs' in raw and len(raw['mask_probs']):
        p = raw['mask_probs']
        rep['mask_unsaturated'] = float(((p > 0.05) & (p < 0.95)).mean())
        rep['mask_fg_fraction'] = float((p >= 0.5).mean())
    from mrcnn_jax.testing.detectron2_heads import keypoint_report
    return {**rep, **keypoint_report(raw)}
