"""Predictions drawn on their image: each instance's mask in its own colour, its box, class name
and score; and the per-image JSON that `mrcnn-jax predict` writes beside it."""

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


def draw_predictions(image: np.ndarray, pred: dict, class_names=None,
                     score_threshold: float = 0.0, mask_threshold: float = 0.5,
                     alpha: float = 0.45) -> Image.Image:
    """image [H, W, 3] uint8 RGB; pred as Predictor returns (boxes, scores, labels, optional masks
    [N, H, W] in [0, 1]). Returns an RGB PIL image."""
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
    return canvas.convert('RGB')


def predictions_to_json(pred: dict, class_names=None,
                        score_threshold: float = 0.0, mask_threshold: float = 0.5) -> list[dict]:
    """One dict per instance: box (xyxy, original pixels), score, label id and name, mask as COCO
    RLE (counts as str) when the model predicts masks."""
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
        out.append(item)
    return out
