"""Predictions drawn on their image: each instance's mask in its own colour, its box, class name
and score, its keypoints joined by the dataset's skeleton; and the per-image JSON that
`mrcnn-jax predict` writes beside it."""

from __future__ import annotations

import colorsys
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw


def instance_colour(i: int) -> tuple[int, int, int]:
    """Distinct, bright colours by golden-ratio hue steps."""
    h = (i * 0.61803398875) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 1.0))


def label_name(class_names, label: int) -> str:
    """class_names: a {label id: name} mapping, a sequence indexed by label id, or None."""
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def draw_keypoints(draw: ImageDraw.ImageDraw, keypoints: np.ndarray, skeleton, colour,
                   visible=None, radius: float = 2.5, width: int = 2) -> None:
    """One instance's keypoints on a PIL drawing: the skeleton's lines in `colour`, then each
    keypoint as a dot (white rim).

    keypoints: [K, 3] (x, y, v) in the drawing's pixels; visible: [K] bool of the keypoints to
    draw (default v > 0); skeleton: 0-based index pairs (lines to invisible keypoints are left
    out); colour: an RGB tuple.
    """
    keypoints = np.asarray(keypoints, np.float32).reshape(-1, 3)
    show = keypoints[:, 2] > 0 if visible is None else np.asarray(visible, bool)
    k = len(keypoints)
    for a, b in skeleton or ():
        if a < k and b < k and show[a] and show[b]:
            draw.line([tuple(keypoints[a, :2]), tuple(keypoints[b, :2])], fill=tuple(colour) + (255,),
                      width=width)
    for (x, y, _), on in zip(keypoints, show):
        if on:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(colour) + (255,),
                         outline=(255, 255, 255, 255))


def default_skeleton(num_keypoints: int, keypoint_names=()) -> list[list[int]]:
    """The skeleton drawn when none is given: COCO's person skeleton for 17 keypoints, the
    synthetic figures' for theirs (`data.metadata.default_keypoint_skeleton`)."""
    from mrcnn_jax.data.metadata import default_keypoint_skeleton
    return default_keypoint_skeleton(num_keypoints, keypoint_names)


def keypoint_skeleton(cfg, model_metadata: Mapping | None = None) -> list[list[int]] | None:
    """The skeleton to draw a model's keypoints with: its model directory's metadata
    ('keypoint_skeleton', from the dataset it was trained on) when it has one, else the
    synthetic figures' for a model of that dataset, else `default_skeleton` (COCO's person
    skeleton for 17 keypoints). None for a model without keypoints."""
    m = cfg.model
    if not m.get('keypoint_on', False):
        return None
    meta = model_metadata or {}
    if meta.get('keypoint_skeleton'):
        return [list(p) for p in meta['keypoint_skeleton']]
    names = tuple(meta.get('keypoint_names') or ())
    if not names and cfg.data.source == 'synthetic' and cfg.data.get('synthetic_task') == 'keypoints':
        from mrcnn_jax.data.synthetic_keypoints import KEYPOINT_NAMES
        names = KEYPOINT_NAMES
    return default_skeleton(int(m.num_keypoints), names)


def draw_predictions(image: np.ndarray, pred: dict, class_names=None,
                     score_threshold: float = 0.0, mask_threshold: float = 0.5,
                     alpha: float = 0.45, keypoint_skeleton=None,
                     keypoint_threshold: float | None = None) -> Image.Image:
    """image [H, W, 3] uint8 RGB; pred as Predictor returns (boxes, scores, labels, optional masks
    [N, H, W] in [0, 1], optional keypoints [N, K, 3] (x, y, v) and keypoints_scores [N, K]).
    keypoint_skeleton: 0-based index pairs joined by lines (None: `default_skeleton`, COCO's
    person skeleton for 17 keypoints); keypoint_threshold: keypoints whose score is below it are
    not drawn (None: all are). Returns an RGB PIL image."""
    base = Image.fromarray(np.asarray(image, np.uint8)).convert('RGBA')
    keep = np.nonzero(np.asarray(pred['scores']) >= score_threshold)[0]
    overlay = np.zeros((base.height, base.width, 4), np.uint8)
    masks = pred.get('masks')
    for rank, i in enumerate(keep):
        if masks is not None:
            m = np.asarray(masks[i]) > mask_threshold
            overlay[m] = instance_colour(rank) + (int(255 * alpha),)
    canvas = Image.alpha_composite(base, Image.fromarray(overlay, 'RGBA'))
    draw = ImageDraw.Draw(canvas)
    for rank, i in enumerate(keep):
        colour = instance_colour(rank) + (255,)
        x1, y1, x2, y2 = (float(v) for v in pred['boxes'][i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        label = int(pred['labels'][i])
        text = f'{label_name(class_names, label)} {float(pred["scores"][i]):.2f}'
        tw = draw.textlength(text)
        ty = max(y1 - 12, 0)
        draw.rectangle([x1, ty, x1 + tw + 4, ty + 12], fill=colour)
        draw.text((x1 + 2, ty), text, fill=(0, 0, 0, 255))
    keypoints = pred.get('keypoints')
    if keypoints is not None and len(keep):
        keypoints = np.asarray(keypoints, np.float32)
        skeleton = (default_skeleton(keypoints.shape[1]) if keypoint_skeleton is None
                    else keypoint_skeleton)
        kp_scores = pred.get('keypoints_scores')
        radius = max(2.0, min(base.width, base.height) / 150)
        for rank, i in enumerate(keep):
            visible = keypoints[i, :, 2] > 0
            if keypoint_threshold is not None and kp_scores is not None:
                visible &= np.asarray(kp_scores[i]) >= keypoint_threshold
            draw_keypoints(draw, keypoints[i], skeleton, instance_colour(rank), visible,
                           radius=radius, width=max(1, int(round(radius * 0.8))))
    return canvas.convert('RGB')


def predictions_to_json(pred: dict, class_names=None,
                        score_threshold: float = 0.0, mask_threshold: float = 0.5) -> list[dict]:
    """One dict per instance: box (xyxy, original pixels), score, label id and name, mask as COCO
    RLE (counts as str) when the model predicts masks, keypoints [[x, y, v], ...] (original
    pixels) and keypoints_scores (the Predictor's name) when it predicts keypoints."""
    keep = np.nonzero(np.asarray(pred['scores']) >= score_threshold)[0]
    rles = None
    if pred.get('masks') is not None and len(keep):
        from mrcnn_jax.evaluation.rle import encode_rle
        rles = encode_rle(np.asarray(pred['masks'])[keep], threshold=mask_threshold)
    out = []
    for j, i in enumerate(keep):
        label = int(pred['labels'][i])
        item = {
            'box': [round(float(v), 3) for v in pred['boxes'][i]],
            'score': round(float(pred['scores'][i]), 5),
            'label': label,
            'name': label_name(class_names, label),
        }
        if rles is not None:
            item['mask'] = rles[j]
        if pred.get('keypoints') is not None:
            item['keypoints'] = [[round(float(v), 2) for v in kp] for kp in np.asarray(pred['keypoints'][i])]
            if pred.get('keypoints_scores') is not None:
                item['keypoints_scores'] = [round(float(v), 4) for v in np.asarray(pred['keypoints_scores'][i])]
        out.append(item)
    return out
