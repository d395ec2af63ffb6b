"""What the cases run on: the settings of a run, the photos (or synthetic photo-like images),
the train batch built from them, letterboxed throughput samples and the seeded inputs of the
micro-benchmarks. numpy and PIL only: no JAX model code, no torch."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / 'shared' / 'data'
DATASET = SHARED_DATA / 'coco128_seg'

REFERENCE_HW = (427, 640)        # a 640x427 COCO photo: 800x1201 at 800/1333, padded 800x1216
PASTE_IMAGE_HW = (427, 640)
NUM_IMAGES = 4
# The Detectron2 column: this model-zoo config (the vendored source's configs/), R50-FPN as
# torchvision's maskrcnn_resnet50_fpn; its own weights, calibrated like torchvision's.
D2_CONFIG = 'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml'


# -- settings ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    quick: bool = False
    min_size: int = 800
    max_size: int = 1333
    runs: int = 5
    warmup: int = 0                 # extra untimed pairs after the first calls (model cases)
    micro_warmup: int = 2           # the same for micro-benchmarks
    micro_canvas: tuple[int, int] = (800, 1216)
    rois_7: int = 1000
    rois_14: int = 100
    paste_n: int = 100
    throughput_batch: int = 16      # train_1024_bf16: images per step
    throughput_size: int = 1024     # train_1024_bf16: square canvas side
    infer_batch: int = 8            # inference_bf16_b8: images per call
    images: tuple[str, ...] = ()    # file names in the dataset; () picks them (see select_samples)
    synthetic: bool = False         # force synthetic images even when the dataset is present
    data: str = str(DATASET)        # a COCO-style folder: annotations.json + images/
    num_images: int = NUM_IMAGES    # photos picked (inference_b4 takes 4, cycling if fewer)
    detectron2: bool = True         # the Detectron2 column where its source is found
    d2_config: str = D2_CONFIG      # its model-zoo config
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> 'Settings':
        s = cls()
        if args.quick:
            s.quick, s.min_size, s.max_size, s.runs = True, 320, 512, 2
            s.rois_7 = 250
        if getattr(args, 'd2_config', ''):
            s.d2_config = args.d2_config
        if args.min_size:
            s.min_size = args.min_size
        if args.max_size:
            s.max_size = args.max_size
        if args.runs:
            s.runs = args.runs
        if args.warmup is not None:
            s.warmup = args.warmup
        s.micro_canvas = padded_size(*resized_size(*REFERENCE_HW, s.min_size, s.max_size))
        if args.micro_canvas:
            h, w = args.micro_canvas.lower().split('x')
            s.micro_canvas = (int(h), int(w))
        if args.micro_rois:
            s.rois_7 = s.rois_14 = args.micro_rois
        if args.quick:
            s.throughput_batch, s.throughput_size, s.infer_batch = 2, 512, 2
        if args.throughput_batch:
            s.throughput_batch = args.throughput_batch
        s.images = tuple(x for x in (args.images or '').split(',') if x)
        s.synthetic = bool(args.synthetic)
        if args.data:
            s.data = args.data
        s.detectron2 = not getattr(args, 'no_detectron2', False)
        return s

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> 'Settings':
        d = dict(d)
        d['micro_canvas'] = tuple(d['micro_canvas'])
        d['images'] = tuple(d['images'])
        return cls(**d)


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision's resize of an h x w photo (the benchmark's reference)."""
    from mrcnn_jax.models.conventions import TORCHVISION
    return TORCHVISION.resized_size(h, w, min_size, max_size)


def padded_size(h: int, w: int, divisible: int = 32) -> tuple[int, int]:
    """torchvision's padded size of a resized image (models.layers.np_padded_size as ints)."""
    from mrcnn_jax.models.layers import np_padded_size
    ph, pw = np_padded_size((h, w), divisible)
    return int(ph), int(pw)


# -- photos ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    name: str
    image: np.ndarray      # [H, W, 3] uint8 RGB
    boxes: np.ndarray      # [n, 4] float32 xyxy, original pixels
    classes: np.ndarray    # [n] int64 COCO category ids
    masks: np.ndarray      # [n, H, W] uint8


def select_samples(settings: Settings, n: int = NUM_IMAGES) -> tuple[list[Sample], str]:
    """n photos of one canvas class with annotations, and a description of where they came from.

    Default choice: the first n dataset images (in file-name order) with at least one instance
    whose torchvision padded size is that of a 640x427 photo (800x1216 at 800/1333: the class
    of the issue's reference timing), falling back to the most common padded size.
    """
    dataset = pathlib.Path(settings.data)
    if settings.synthetic or not (dataset / 'annotations.json').exists():
        return synthetic_samples(n, settings.seed), f'synthetic photo-like images (no {dataset})'
    from mrcnn_jax.data import coco, images as image_io
    ann = json.loads((dataset / 'annotations.json').read_text())
    by_image: dict[int, list[dict]] = {}
    for a in ann['annotations']:
        if not a.get('iscrowd', 0):
            by_image.setdefault(a['image_id'], []).append(a)
    entries = sorted(ann['images'], key=lambda e: e['file_name'])
    if settings.images:
        wanted = {e['file_name']: e for e in entries}
        missing = [x for x in settings.images if x not in wanted]
        if missing:
            raise ValueError(f'images not in {dataset}: {missing}')
        chosen = [wanted[x] for x in settings.images]
    else:
        def pclass(e):
            return padded_size(*resized_size(e['height'], e['width'], settings.min_size, settings.max_size))
        usable = [e for e in entries if by_image.get(e['id'])]
        target = padded_size(*resized_size(*REFERENCE_HW, settings.min_size, settings.max_size))
        chosen = [e for e in usable if pclass(e) == target][:n]
        if len(chosen) < n:
            counts: dict[tuple[int, int], int] = {}
            for e in usable:
                counts[pclass(e)] = counts.get(pclass(e), 0) + 1
            target = max(counts, key=counts.get)
            chosen = [e for e in usable if pclass(e) == target][:n]
    samples = []
    for e in chosen:
        image = image_io.load_image(str(dataset / 'images' / e['file_name']))
        h, w = image.shape[:2]
        objs = by_image.get(e['id'], [])
        boxes, classes, masks = [], [], []
        for a in objs:
            x, y, bw, bh = a['bbox']
            x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            if x2 <= x1 or y2 <= y1:
                continue
            boxes.append((x1, y1, x2, y2))
            classes.append(a['category_id'])
            masks.append(coco.segmentation_to_mask(a['segmentation'], h, w))
        k = len(boxes)
        samples.append(Sample(e['file_name'], image, np.asarray(boxes, np.float32).reshape(k, 4),
                              np.asarray(classes, np.int64).reshape(k),
                              np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)))
    return samples, f'{dataset.name} ({len(samples)} photos)'


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: tuple[int, int], ch: int) -> np.ndarray:
    from PIL import Image
    noise = rng.random((cells[0], cells[1], ch)).astype(np.float32)
    out = np.stack([np.asarray(Image.fromarray(noise[..., c]).resize((hw[1], hw[0]), Image.BILINEAR))
                    for c in range(ch)], axis=-1)
    return out


def synthetic_samples(n: int, seed: int = 0, hw: tuple[int, int] = REFERENCE_HW) -> list[Sample]:
    """Photo-like images (smooth colour fields at several scales plus filled ellipses, which are
    also the instances), 640x427 like the reference photo class."""
    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for i in range(n):
        img = sum(_smooth_noise(rng, hw, cells, 3) for cells in ((3, 4), (12, 18), (48, 72))) / 3
        yy, xx = np.mgrid[:h, :w]
        k = int(rng.integers(3, 9))
        boxes, classes, masks = [], [], []
        for _ in range(k):
            cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
            ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.3) * w
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            img[m] = img[m] * 0.3 + rng.random(3) * 0.7
            ys, xs = np.nonzero(m)
            boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
            classes.append(int(rng.integers(1, 91)))
            masks.append(m.astype(np.uint8))
        image = np.clip(img * 255, 0, 255).astype(np.uint8)
        out.append(Sample(f'synthetic_{i}', image, np.asarray(boxes, np.float32), np.asarray(classes, np.int64),
                          np.stack(masks)))
    return out


# -- train inputs ------------------------------------------------------------------------------
def crop_masks(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """[n, H, W] uint8 full masks -> [n, size, size] uint8, each sampled (nearest pixel) at the
    size x size cell centres of its box: the box-cropped GT masks the train step consumes."""
    n, h, w = masks.shape
    out = np.zeros((n, size, size), np.uint8)
    t = (np.arange(size) + 0.5) / size
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        ys = np.clip(np.floor(y1 + t * (y2 - y1)).astype(np.int64), 0, h - 1)
        xs = np.clip(np.floor(x1 + t * (x2 - x1)).astype(np.int64), 0, w - 1)
        out[i] = masks[i][ys[:, None], xs[None, :]]
    return out


def train_batch(samples: Sequence[Sample], cfg) -> dict[str, np.ndarray]:
    """The numpy batch of the train step: images normalized and resized as torchvision's
    transform, on torchvision's padded canvas (the largest padded size of the batch), GT boxes in
    canvas pixels, category ids as classes (torchvision's 91-way head), 112x112 cropped masks."""
    from mrcnn_jax import preprocess
    from mrcnn_jax.models.conventions import Conventions
    d, m = cfg.data, cfg.model
    c = Conventions.from_config(m.conventions)
    sizes = [s.image.shape[:2] for s in samples]
    resized = [c.resized_size(h, w, d.min_size[0], d.max_size) for h, w in sizes]
    canvas = tuple(max(padded_size(rh, rw, m.size_divisible)[k] for rh, rw in resized) for k in (0, 1))
    b, g, ms = len(samples), d.max_instances, d.mask_size
    batch = {
        'images': np.zeros((b, canvas[0], canvas[1], 3), np.float32),
        'image_info': np.zeros((b, 6), np.float32),
        'gt_boxes': np.zeros((b, g, 4), np.float32),
        'gt_classes': np.zeros((b, g), np.int32),
        'gt_valid': np.zeros((b, g), bool),
        'gt_is_crowd': np.zeros((b, g), bool),
        'gt_masks': np.zeros((b, g, ms, ms), np.uint8),
    }
    for i, (s, (h, w), (rh, rw)) in enumerate(zip(samples, sizes, resized)):
        x = preprocess.normalize(s.image, c.pixel_scale, c.pixel_mean, c.pixel_std, c.channel_order)
        batch['images'][i, :rh, :rw] = preprocess.resize_bilinear(x, (rh, rw))
        batch['image_info'][i] = (h, w, rh, rw, rh / h, rw / w)
        # torchvision resize_boxes: ratio = float32(resized) / float32(original) per axis.
        rx, ry = np.float32(rw) / np.float32(w), np.float32(rh) / np.float32(h)
        k = min(len(s.boxes), g)
        batch['gt_boxes'][i, :k] = s.boxes[:k] * np.asarray([rx, ry, rx, ry], np.float32)
        batch['gt_classes'][i, :k] = s.classes[:k]
        batch['gt_valid'][i, :k] = True
        batch['gt_masks'][i, :k] = crop_masks(s.masks[:k], s.boxes[:k], ms)
    return batch


# throughput cases (issue 6's H100 goals): bf16 compute on both sides
def letterbox(sample: Sample, size: int) -> Sample:
    """The photo scaled so that its longer side is `size` and placed top-left on a black
    size x size canvas (Detectron2's large-scale-jitter canvas without the jitter), with its boxes
    and masks: both frameworks then train on exactly size x size with no resize of their own."""
    from PIL import Image
    h, w = sample.image.shape[:2]
    scale = size / max(h, w)
    rh, rw = min(round(h * scale), size), min(round(w * scale), size)
    image = np.zeros((size, size, 3), np.uint8)
    image[:rh, :rw] = np.asarray(Image.fromarray(sample.image).resize((rw, rh), Image.BILINEAR))
    masks = np.zeros((len(sample.masks), size, size), np.uint8)
    for i, m in enumerate(sample.masks):
        masks[i, :rh, :rw] = np.asarray(Image.fromarray(m).resize((rw, rh), Image.NEAREST))
    boxes = sample.boxes * np.float32(scale)
    return Sample(f'{sample.name}@{size}', image, boxes.astype(np.float32), sample.classes, masks)


# -- micro-benchmarks: inputs from a seeded numpy generator, shared by both sides ---------------
POOLER_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)   # models.poolers.FPN_SCALES; not imported (this module imports no JAX)


def random_boxes(rng: np.random.Generator, n: int, hw: tuple[int, int], min_side: float = 8,
                 max_side: float = 600) -> np.ndarray:
    """[n, 4] float32 xyxy: log-uniform sizes, aspect ratios in [0.5, 2], clipped to the image."""
    h, w = hw
    side = np.exp(rng.uniform(np.log(min_side), np.log(min(max_side, h, w)), n))
    ar = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    bw, bh = side / np.sqrt(ar), side * np.sqrt(ar)
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    boxes = np.clip(boxes, 0, [w, h, w, h])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes.astype(np.float32)


def roi_inputs(s: Settings, out: int):
    """FPN levels P2-P5 of the micro canvas ([1, h, w, 256] float32 each) and the RoIs."""
    rng = np.random.default_rng(s.seed + out)
    h, w = s.micro_canvas
    feats = [rng.standard_normal((1, int(h * sc), int(w * sc), 256), dtype=np.float32) for sc in POOLER_SCALES]
    n = s.rois_7 if out == 7 else s.rois_14
    return feats, random_boxes(rng, n, (h, w))


def nms_inputs(s: Settings, n: int):
    """n boxes in clusters (jittered copies of n / 20 objects), uniform scores."""
    rng = np.random.default_rng(s.seed + n)
    h, w = s.micro_canvas
    centres = random_boxes(rng, max(n // 20, 1), (h, w), 16, 400)
    pick = centres[rng.integers(0, len(centres), n)]
    size = np.concatenate([pick[:, 2:] - pick[:, :2]] * 2, axis=1)
    boxes = pick + rng.normal(0, 0.08, (n, 4)).astype(np.float32) * size
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes.astype(np.float32), rng.random(n).astype(np.float32)


def paste_inputs(s: Settings):
    """`paste_n` soft 28x28 masks and their boxes in a PASTE_IMAGE_HW image."""
    rng = np.random.default_rng(s.seed + 28)
    n = s.paste_n
    logits = np.stack([_smooth_noise(rng, (28, 28), (5, 5), 1)[..., 0] for _ in range(n)])
    masks = 1 / (1 + np.exp(-12 * (logits - 0.5)))
    return masks.astype(np.float32), random_boxes(rng, n, PASTE_IMAGE_HW, 8, 400)
