"""Helpers shared by the input-pipeline tests."""

from __future__ import annotations

import numpy as np

from mrcnn_jax import config as config_lib


def small_config(source: str = 'synthetic', canvas=(256, 256), **data):
    """Default config shrunk for tests: 256² canvas, M=28, N=16, deterministic."""
    c = config_lib.default_config()
    c.data.source = source
    c.data.canvas = canvas
    c.data.min_size = (min(canvas),)
    c.data.max_size = max(canvas)
    c.data.mask_size = 28
    c.data.max_instances = 16
    c.data.deterministic = True
    c.train.batch_size = 2
    c.eval.batch_size = 2
    c.model.num_classes = 5 if source == 'synthetic' else 81
    for k, v in data.items():
        c.data[k] = v
    return c


def reference_mask_target(mask: np.ndarray, box, m: int) -> np.ndarray:
    """Independent numpy reference of the mask target: bilinear at the M×M cell centres of `box`
    (continuous pixel coordinates, pixel centres at k + 0.5, sample points clamped to the
    image), threshold 0.5."""
    h, w = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    xs = np.clip(x1 + (np.arange(m) + 0.5) * (x2 - x1) / m - 0.5, 0, w - 1)
    ys = np.clip(y1 + (np.arange(m) + 0.5) * (y2 - y1) / m - 0.5, 0, h - 1)
    x0 = np.floor(xs).astype(int)
    y0 = np.floor(ys).astype(int)
    x1i = np.minimum(x0 + 1, w - 1)
    y1i = np.minimum(y0 + 1, h - 1)
    wx = (xs - x0)[None, :]
    wy = (ys - y0)[:, None]
    f = mask.astype(np.float64)
    value = ((1 - wy) * (1 - wx) * f[np.ix_(y0, x0)] + (1 - wy) * wx * f[np.ix_(y0, x1i)]
             + wy * (1 - wx) * f[np.ix_(y1i, x0)] + wy * wx * f[np.ix_(y1i, x1i)])
    return (value >= 0.5).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB test picture (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return (base + rng.normal(0, 3, base.shape)).clip(0, 255).astype(np.uint8)


def make_bad_dataset(root) -> tuple[str, str, dict]:
    """A COCO dataset in `root` whose images and annotations exercise every bad-input case.

    Returns (annotation json, image folder, expected counts). Each image has one valid instance.
    """
    import json
    import os

    from PIL import Image

    images_dir = os.path.join(str(root), 'images')
    os.makedirs(images_dir, exist_ok=True)

    def save(name, image, **kw):
        image.save(os.path.join(images_dir, name), **kw)

    save('good.jpg', Image.fromarray(photo(60, 80)), quality=90)
    save('gray.jpg', Image.fromarray(photo(60, 80)[..., 0]), quality=90)
    rgba = np.concatenate([photo(60, 80), np.full((60, 80, 1), 9, np.uint8)], -1)
    save('rgba.png', Image.fromarray(rgba, 'RGBA'))
    save('cmyk.jpg', Image.fromarray(photo(60, 80)).convert('CMYK'), quality=90)
    save('deep.png', Image.fromarray((photo(60, 80)[..., 1].astype(np.uint16) * 257)))
    exif = Image.Exif()
    exif[0x0112] = 6                    # rotate 90°: stored 80x60 (h x w) is upright 60x80
    save('rotated.jpg', Image.fromarray(photo(80, 60)), exif=exif, quality=90)  # upright 60x80
    save('mismatch.jpg', Image.fromarray(photo(50, 80)), quality=90)
    with open(os.path.join(images_dir, 'corrupt.jpg'), 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0' + b'garbage' * 50)
    good = open(os.path.join(images_dir, 'good.jpg'), 'rb').read()
    with open(os.path.join(images_dir, 'truncated.jpg'), 'wb') as f:
        f.write(good[: len(good) // 2])
    names = ['good.jpg', 'gray.jpg', 'rgba.png', 'cmyk.jpg', 'deep.png', 'rotated.jpg',
             'mismatch.jpg', 'corrupt.jpg', 'truncated.jpg', 'missing.jpg']
    images = [{'id': i + 1, 'file_name': n, 'height': 60, 'width': 80} for i, n in enumerate(names)]
    poly = [[10, 10, 50, 10, 50, 40, 10, 40]]
    anns = [{'id': 100 + i, 'image_id': i + 1, 'category_id': 1, 'bbox': [10, 10, 40, 30],
             'area': 1200.0, 'iscrowd': 0, 'segmentation': poly} for i in range(len(names))]
    anns += [
        {'id': 900, 'image_id': 1, 'category_id': 42, 'bbox': [1, 1, 5, 5], 'iscrowd': 0,
         'segmentation': poly},                                        # unknown category
        {'id': 901, 'image_id': 77, 'category_id': 1, 'bbox': [1, 1, 5, 5], 'iscrowd': 0,
         'segmentation': poly},                                        # unknown image
        {'id': 902, 'image_id': 1, 'category_id': 2, 'bbox': [1, 1, 0, 5], 'iscrowd': 0,
         'segmentation': poly},                                        # zero area
        {'id': 903, 'image_id': 2, 'category_id': 2, 'bbox': [90, 70, 5, 5], 'iscrowd': 0,
         'segmentation': poly},                                        # outside the image
        {'id': 904, 'image_id': 2, 'category_id': 2, 'bbox': [70, 50, 20, 20], 'iscrowd': 0,
         'segmentation': [[70, 50, 80, 50, 80, 60, 70, 60]]},          # clipped, kept
    ]
    path = os.path.join(str(root), 'annotations.json')
    with open(path, 'w') as f:
        json.dump({'images': images, 'annotations': anns,
                   'categories': [{'id': 1, 'name': 'thing'}, {'id': 2, 'name': 'other'}]}, f)
    expected = {
        'written': ['good.jpg', 'gray.jpg', 'rgba.png', 'cmyk.jpg', 'deep.png', 'rotated.jpg'],
        'skipped_images': {'unreadable_image': 2, 'missing_image_file': 1,
                           'image_size_mismatch': 1},
        'skipped_instances': {'unknown_category_id': 1, 'unknown_image_id': 1,
                              'zero_area_box': 1, 'box_outside_image': 1},
    }
    return path, images_dir, expected
