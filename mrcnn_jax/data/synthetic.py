"""A generated COCO-format dataset of coloured shapes: the built-in dataset of the demo and tests.

`generate(out_dir, num_images, image_size, seed, split_name)` writes
    out_dir/annotations_<split>.json   COCO instances: compressed-RLE segmentations of the visible
                                       part of each shape (exact: pixels are painted through the
                                       same masks), bbox and area from that mask, iscrowd 0
    out_dir/<split>/000000.png ...     RGB images
deterministic per (seed, split_name). Categories: circle, square, triangle, star (ids 1..4).

Each image: a textured background (low-frequency colour noise, stripes, grain) in muted colours,
2–6 saturated shapes of random colour, size (diameter ~18–44% of the image side), rotation and
position, drawn in z-order so that later shapes occlude earlier ones. Every shape keeps at least
half of its area visible, so the task stays learnable by a small model on a CPU in minutes.

`data.synthetic_task` picks the generator: 'shapes' (this module) or 'keypoints' (stick figures
with 13 joints, `synthetic_keypoints.py`); both write the same layout through `write_split`, and
`ensure_synthetic` caches either.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import logging
import math
import os
import shutil
import zlib

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

CATEGORIES = (
    {'id': 1, 'name': 'circle', 'supercategory': 'shape'},
    {'id': 2, 'name': 'square', 'supercategory': 'shape'},
    {'id': 3, 'name': 'triangle', 'supercategory': 'shape'},
    {'id': 4, 'name': 'star', 'supercategory': 'shape'},
)
_VERSION = 1          # bump when the generator's output changes: cached datasets regenerate
_MIN_VISIBLE = 0.5    # fraction of a shape's area that must stay visible


def _rng(seed: int, split_name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split_name.encode())])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float32 muted texture."""
    base = _hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.8))
    grid = rng.normal(0.0, 25.0, (rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
    low = np.stack([np.asarray(Image.fromarray(grid[..., c], mode='F').resize(
        (size, size), Image.BILINEAR)) for c in range(3)], axis=-1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(6, 40)
    stripes = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    stripes = stripes[..., None] * rng.uniform(5.0, 25.0) * _hsv(rng.random(), 0.2, 1.0) / 255.0
    return base + low + stripes


def _shape_mask(rng: np.random.Generator, category: int, cx: float, cy: float, r: float,
                size: int) -> np.ndarray:
    """[size, size] bool mask of one shape (aliased drawing: exact, binary)."""
    canvas = Image.new('L', (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    theta = rng.uniform(0, 2 * math.pi)
    if category == 1:                                     # circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        if category == 2:                                 # square, same area scale as the circle
            radii, count = [r * 1.1] * 4, 4
        elif category == 3:                               # equilateral triangle
            radii, count = [r * 1.25] * 3, 3
        else:                                             # five-pointed star
            radii, count = [r * 1.25, r * 0.5] * 5, 10
        points = [(cx + rad * math.cos(theta + 2 * math.pi * k / count),
                   cy + rad * math.sin(theta + 2 * math.pi * k / count))
                  for k, rad in enumerate(radii)]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _render(rng: np.random.Generator, size: int):
    """One image: ([size, size, 3] uint8, [(category_id, visible_mask), ...] in z-order)."""
    image = _background(rng, size)
    num_objects = int(rng.integers(2, 7))
    shapes: list[tuple[int, np.ndarray, np.ndarray]] = []     # (category, full mask, colour)
    for _ in range(num_objects):
        for _attempt in range(30):
            category = int(rng.integers(1, len(CATEGORIES) + 1))
            r = rng.uniform(0.09, 0.22) * size
            cx = rng.uniform(0.7 * r, size - 0.7 * r)
            cy = rng.uniform(0.7 * r, size - 0.7 * r)
            mask = _shape_mask(rng, category, cx, cy, r, size)
            if mask.sum() < 0.004 * size * size:
                continue
            # every earlier shape must keep >= half of its area visible under the new one
            covered = mask.copy()
            ok = True
            for _, other, _ in reversed(shapes):
                visible = other & ~covered
                if visible.sum() < _MIN_VISIBLE * other.sum():
                    ok = False
                    break
                covered |= other
            if ok:
                colour = _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
                shapes.append((category, mask, colour))
                break
    for _, mask, colour in shapes:
        image[mask] = colour
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)   # grain over everything
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    objects = []
    above = np.zeros((size, size), bool)
    for category, mask, _ in reversed(shapes):
        objects.append((category, mask & ~above))
        above |= mask
    return pixels, objects[::-1]


def write_split(out_dir: str, split_name: str, renders, categories, info: dict) -> str:
    """Writes one split of a generated dataset; returns the annotation json path.

    renders: an iterable of (pixels [S, S, 3] uint8, objects), one per image, where objects is a
    list of (category_id, visible [S, S] bool mask, extra annotation fields dict). Each object
    becomes an annotation with a compressed-RLE segmentation of its visible mask, bbox and area
    from that mask, iscrowd 0, and the extra fields (e.g. keypoints).
    """
    from pycocotools import mask as mask_utils
    image_dir = os.path.join(out_dir, split_name)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i, (pixels, objects) in enumerate(renders):
        height, width = pixels.shape[:2]
        file_name = f'{i:06d}.png'
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name), compress_level=1)
        image_id = i + 1
        images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
        for category, visible, extra in objects:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            annotations.append({
                'id': len(annotations) + 1, 'image_id': image_id, 'category_id': category,
                'segmentation': {'size': [height, width], 'counts': rle['counts'].decode('ascii')},
                'area': float(mask_utils.area(rle)),
                'bbox': [float(v) for v in mask_utils.toBbox(rle)],
                'iscrowd': 0,
                **extra,
            })
    path = os.path.join(out_dir, f'annotations_{split_name}.json')
    with open(path, 'w', encoding='utf-8') as f:
        json.dump({'info': info, 'images': images, 'annotations': annotations,
                   'categories': list(categories)}, f)
    return path


def generate(out_dir: str, num_images: int, image_size: int = 256, seed: int = 0,
             split_name: str = 'train') -> str:
    """Writes the split (module docstring); returns the annotation json path."""
    rng = _rng(seed, split_name)

    def renders():
        for _ in range(num_images):
            pixels, objects = _render(rng, image_size)
            yield pixels, [(category, visible, {}) for category, visible in objects]
    return write_split(out_dir, split_name, renders(), CATEGORIES,
                       {'description': f'mrcnn_jax synthetic shapes v{_VERSION}', 'seed': seed,
                        'split': split_name})


TASKS = ('shapes', 'keypoints')


def _task(d) -> str:
    task = d.get('synthetic_task', 'shapes') or 'shapes'
    if task not in TASKS:
        raise ValueError(f'data.synthetic_task must be one of {TASKS}, got {task!r}')
    return task


def _generator(task: str):
    """(generate function, version) of a task."""
    if task == 'keypoints':
        from mrcnn_jax.data import synthetic_keypoints
        return synthetic_keypoints.generate, synthetic_keypoints.VERSION
    return generate, _VERSION


def default_dir(data_config) -> str:
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    d = data_config
    task = _task(d)
    _, version = _generator(task)
    name = ('' if task == 'shapes' else f'{task}-') + (
        f'v{version}-{d.synthetic_image_size}px-{d.synthetic_num_train}-'
        f'{d.synthetic_num_val}-seed{d.synthetic_seed}')
    return os.path.join(cache, 'mrcnn_jax', 'synthetic', name)


@contextlib.contextmanager
def _locked(path: str):
    import fcntl
    with open(path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_synthetic(config) -> dict[str, tuple[str, str]]:
    """Generates the train and val splits into `data.synthetic_dir` unless already there.

    `data.synthetic_dir` '' means a cache folder keyed by the generation parameters
    (~/.cache/mrcnn_jax/synthetic/...). A folder generated with other parameters is regenerated
    (only files this generator writes are replaced). Safe to call from concurrent processes.
    Returns {'train': (annotations_json, images_dir), 'val': (...)}.
    """
    d = config.data if hasattr(config, 'data') else config
    task = _task(d)
    generate_split, version = _generator(task)
    root = d.synthetic_dir or default_dir(d)
    os.makedirs(root, exist_ok=True)
    params = {'version': version, 'image_size': int(d.synthetic_image_size),
              'seed': int(d.synthetic_seed),
              'splits': {'train': int(d.synthetic_num_train), 'val': int(d.synthetic_num_val)}}
    if task != 'shapes':      # (shapes folders written before tasks existed stay valid)
        params['task'] = task
    marker = os.path.join(root, 'synthetic.json')
    out = {split: (os.path.join(root, f'annotations_{split}.json'), os.path.join(root, split))
           for split in params['splits']}
    with _locked(os.path.join(root, '.lock')):
        if os.path.exists(marker):
            with open(marker, encoding='utf-8') as f:
                if json.load(f) == params and all(os.path.exists(j) for j, _ in out.values()):
                    return out
            os.remove(marker)
        for split, count in params['splits'].items():
            shutil.rmtree(os.path.join(root, split), ignore_errors=True)
            log.info('generating %d synthetic %s %s images in %s', count, task, split, root)
            generate_split(root, count, params['image_size'], params['seed'], split)
        with open(marker, 'w', encoding='utf-8') as f:
            json.dump(params, f)
    return out
