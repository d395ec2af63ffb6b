"""The per-RoI branches of the Detectron2 reference (`detectron2_reference.py`): calibration of
the mask and keypoint heads' logits, and Keypoint R-CNN's outputs among DefaultPredictor's stages.

Masks: the predictor's logits (all classes, on the calibration photos' detections) to std
`logit_std` (3): Detectron2's std-0.001 init gives probabilities of 0.5 everywhere, which makes
the 0.5 threshold a coin toss.

Keypoints: Detectron2's `KRCNNConvDeconvUpsampleHead` initialises every weight with
kaiming_normal (fan_out) and every bias with 0. On the calibrated features its heatmap logits are
random, and their spread says nothing about a trained head's: `calibrate_keypoint_logits` scales
the transposed conv (`score_lowres`) so that its logits have std `logit_std` (3 by default, as the
torchvision reference's `_calibrate_keypoint_logits`) over the calibration photos' detections,
its bias 0. Each map keeps its random, smooth relief (the 2x bilinear upsample and the bicubic
resize of `heatmaps_to_keypoints` smooth it further) and a distinct maximum (exact ties would
also trip the assertion in Detectron2's `heatmaps_to_keypoints`). Detectron2's keypoint score,
the pool softmax exp(v - max) / sum(exp(map - max)) over the 56 x 56 map at the bicubic map's
maximum v (it exceeds 1 where the bicubic overshoots the map's largest sample), grows with the
spread: on the keypoint parity photo, std 3 gives a median of ~0.007, std 6 ~0.05 (Detectron2's
visualizer draws keypoints above 0.05).

The stages (`keypoint_fields`): `pred_keypoints` (x, y, pool-softmax score) and the raw
`pred_keypoint_heatmaps` of each detection, in the resized frame (`raw`), and DefaultPredictor's
keypoints in original pixels (`final`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def keypoint_maps(model, feats, boxes) -> 'torch.Tensor':  # noqa: F821 (torch is imported lazily)
    """The keypoint head's logits [R, K, 56, 56] for boxes (a list of one Boxes), as
    `_forward_keypoint` computes them at inference (without `heatmaps_to_keypoints`)."""
    heads = model.roi_heads
    x = heads.keypoint_pooler([feats[f] for f in heads.keypoint_in_features], boxes)
    return heads.keypoint_head.layers(x)


def calibrate_mask_logits(model, cache, detections: Sequence, logit_std: float) -> None:
    """Mask logits (all classes, on the calibration photos' detections) to std `logit_std`."""
    import torch
    layer = model.roi_heads.mask_head.predictor
    logits = []
    hook = layer.register_forward_hook(lambda m, a, o: logits.append(o))
    try:
        for (_, feats), inst in zip(cache, detections):
            if len(inst):
                model.roi_heads.forward_with_given_boxes(feats, [inst])
    finally:
        hook.remove()
    if not logits:
        raise ValueError('no detections on the calibration photos to calibrate the mask head on')
    scale = logit_std / torch.cat([l.flatten() for l in logits]).std()
    layer.weight.mul_(scale)
    layer.bias.mul_(scale)


def calibrate_keypoint_logits(model, cache, detections: Sequence, logit_std: float,
                              rois_per_image: int = 16) -> None:
    """Scale `score_lowres` so that its logits (all keypoints, on the calibration photos' top
    `rois_per_image` detections; `cache`: (ImageList, features) per photo) have std `logit_std`;
    bias 0. The upsample is linear: the 56 x 56 maps scale with it. (The head costs ~3.7 GMAC per
    RoI: 16 give the std within a few percent.)"""
    import torch
    layer = model.roi_heads.keypoint_head.score_lowres
    outs = []
    hook = layer.register_forward_hook(lambda m, a, o: outs.append(o - layer.bias[None, :, None, None]))
    try:
        for (_, feats), inst in zip(cache, detections):
            if len(inst):
                keypoint_maps(model, feats, [inst.pred_boxes[:rois_per_image]])
    finally:
        hook.remove()
    if not outs:
        raise ValueError('no detections on the calibration photos to calibrate the keypoint head on')
    layer.weight.mul_(logit_std / torch.cat([o.flatten() for o in outs]).std())
    layer.bias.zero_()


def keypoint_fields(instances: dict) -> dict[str, np.ndarray]:
    """From `_instances_numpy` of Detectron2's instances: 'keypoints' [N, K, 2] (x, y),
    'keypoint_scores' [N, K] (Detectron2's pool-softmax score, pred_keypoints[..., 2]) and, where
    the instances carry them (the RoI heads' output), 'heatmaps' [N, K, 56, 56]; {} for a model
    without keypoints."""
    if 'pred_keypoints' not in instances:
        return {}
    kp = instances['pred_keypoints']
    out = {'keypoints': kp[..., :2], 'keypoint_scores': kp[..., 2]}
    if 'pred_keypoint_heatmaps' in instances:
        out['heatmaps'] = instances['pred_keypoint_heatmaps']
    return out


def keypoint_report(raw: dict) -> dict[str, float]:
    """Figures that say whether a keypoint comparison is meaningful: the heatmap logits' std and
    the keypoint scores' range."""
    if 'heatmaps' not in raw or not len(raw['heatmaps']):
        return {}
    s = raw['keypoint_scores']
    return {'heatmap_std': float(raw['heatmaps'].std()), 'keypoint_score_range': (float(s.min()), float(s.max()))}
