"""Batches → annotated PNGs: the normalization undone, boxes, masks, keypoints and skeletons drawn.

The way to see what the model is fed (`mrcnn-jax data show`): the whole canvas is drawn (its
padding, 0 after normalization, shows as the mean colour), the resized image's extent outlined in
white, one colour per class, crowd instances grey and labelled '(crowd)'.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from mrcnn_jax.data.metadata import default_keypoint_skeleton
from mrcnn_jax.visualize import draw_keypoints


def unnormalize(images: np.ndarray, conventions) -> np.ndarray:
    """[..., H, W, 3] float32 normalized with the model's pixel format (a `Conventions`) → uint8 RGB."""
    mean = np.asarray(conventions.pixel_mean, np.float32)
    std = np.asarray(conventions.pixel_std, np.float32)
    pixels = (images * std + mean) / float(conventions.pixel_scale)
    if conventions.channel_order == 'BGR':
        pixels = pixels[..., ::-1]
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _colour(index: int) -> tuple[int, int, int]:
    h = (index * 0.61803398875) % 1.0
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0))


def draw_element(batch: dict, i: int, metadata: dict, conventions) -> Image.Image:
    """Element i of a batch (pipeline output) → RGB PIL image of the canvas with its GT drawn;
    conventions: the model's `Conventions` (its pixel format undoes the normalization)."""
    pixels = unnormalize(batch['images'][i], conventions)
    canvas = Image.fromarray(pixels).convert('RGBA')
    overlay = Image.new('RGBA', canvas.size, (0, 0, 0, 0))
    names = metadata.get('category_names', [])
    valid = batch['gt_valid'][i]
    for n in np.nonzero(valid)[0]:
        cls = int(batch['gt_classes'][i, n])
        colour = (160, 160, 160) if batch['gt_is_crowd'][i, n] else _colour(cls)
        x1, y1, x2, y2 = (float(v) for v in batch['gt_boxes'][i, n])
        if 'gt_masks' in batch:
            left, top = int(round(x1)), int(round(y1))
            w, h = max(1, int(round(x2)) - left), max(1, int(round(y2)) - top)
            mask = Image.fromarray(batch['gt_masks'][i, n] * 255).resize((w, h), Image.NEAREST)
            patch = Image.new('RGBA', (w, h), colour + (110,))
            overlay.paste(patch, (left, top), mask)
    canvas = Image.alpha_composite(canvas, overlay)
    draw = ImageDraw.Draw(canvas)
    info = batch['image_info'][i]
    draw.rectangle([0, 0, float(info[3]) - 1, float(info[2]) - 1], outline=(255, 255, 255, 160))
    for n in np.nonzero(valid)[0]:
        cls = int(batch['gt_classes'][i, n])
        crowd = bool(batch['gt_is_crowd'][i, n])
        colour = (160, 160, 160) if crowd else _colour(cls)
        box = [float(v) for v in batch['gt_boxes'][i, n]]
        draw.rectangle(box, outline=colour + (255,), width=2)
        label = names[cls - 1] if 0 < cls <= len(names) else str(cls)
        draw.text((box[0] + 2, box[1] + 1), label + (' (crowd)' if crowd else ''),
                  fill=(255, 255, 255, 255))
        if 'gt_keypoints' in batch:
            kps = batch['gt_keypoints'][i, n]
            skeleton = metadata.get('keypoint_skeleton') or default_keypoint_skeleton(
                kps.shape[0], metadata.get('keypoint_names', ()))
            draw_keypoints(draw, kps, skeleton, colour, radius=2.0, width=1)
    return canvas.convert('RGB')
