"""JAX against torchvision on the same weights, images and machine (issue 6, section 1).

    python scripts/benchmark.py [--quick] [--only NAME[,NAME]] [--runs N] [--json PATH]
    mrcnn-jax benchmark [the same arguments]

One run builds torchvision's Mask R-CNN R50-FPN with seeded, calibrated weights
(`mrcnn_jax.testing.torchvision_reference`, calibrated on the benchmark images), converts its
state_dict with `Predictor.from_torchvision` and times, on the same real photos
(`../shared/data/coco128_seg`, else synthetic photo-like images):

  inference_b1    image in -> pasted masks out, 800/1333 sizing: `Predictor(image)` vs `model([x])`
  inference_b4    4 images of one canvas bucket: `Predictor(batch_size=4)(images)` vs `model(4 x)`
  forward_b1      the model alone on a preprocessed canvas (no paste): our jitted `model.apply`
                  vs torchvision's backbone + rpn + roi_heads on its transformed ImageList
  train_step_b2   one SGD step at batch 2 on torchvision's padded canvas: `make_train_step`
                  (FrozenBN, frozen stem + res2, 1-device mesh) vs `model(images, targets)`,
                  `sum(losses).backward()`, `SGD.step()`
  roi_align_{7x7,14x14}_{gather,einsum}
                  multi-level RoIAlign (1000 RoIs -> 7x7 and 100 RoIs -> 14x14, 256 channels,
                  on the FPN of an 800x1216 canvas) vs torchvision's MultiScaleRoIAlign
  nms_{1000,5000} fixed-size NMS (IoU 0.7, every kept box returned) vs torchvision.ops.nms
  paste_rle_100   100 masks of 28x28 pasted into a 427x640 image, thresholded at 0.5 and
                  RLE-encoded: `ops.masks.paste_masks_to_rle` vs `paste_masks_in_image` +
                  pycocotools (as torchvision's COCO evaluation does)
  train_1024_bf16 (GPU default; `--only throughput` elsewhere) a train step on
                  `--throughput-batch` (16) photos letterboxed onto 1024x1024, bf16 compute
                  (`model.dtype='bfloat16'`, float32 parameters) vs torch autocast(bfloat16);
                  the row adds images/s per side (issue 6's H100 goal: >= 40 images/s)
  inference_bf16_b8 (GPU default) 8 photos per Predictor call, 800/1333, bf16 compute vs torch
                  autocast(bfloat16) inference; images/s and ms per image

Each case runs JAX and torch interleaved (A B A B ...): one first call each (JAX compiles there),
optional warm-up pairs, then `--runs` timed pairs. A row gives the medians per side and the
median of the per-pair ratios jax / torch (< 1: JAX is faster), JAX's compile time (XLA's own
events during the first call: tracing + lowering + backend compile, from `jax.monitoring`; the
first call minus the steady-state median is kept as `jax_first_minus_median_s`) and torch's first
call. Peak memory is measured per side and case in a fresh subprocess
(`python -m mrcnn_jax.benchmark --probe SIDE CASE --probe-dir DIR`, which never imports the other
side's framework): the process's peak RSS (VmHWM: imports, weights, compilation, a first and a
steady run) and, on a GPU, the device's peak (JAX `memory_stats()['peak_bytes_in_use']`,
`torch.cuda.max_memory_allocated`), which then fills `*_peak_memory_mb`.

Cores are shared: JAX's and torch's thread pools are both sized to the available cores (torch's
is set here). Numbers from a machine with other work running are noisy; every row records the
load average after it (`load_avg`). On a GPU, JAX is started without preallocation
(XLA_PYTHON_CLIENT_PREALLOCATE=false) so that both frameworks fit on one device.

Output: a header naming the machine, versions and thread counts, a markdown table, and with
`--json PATH` a list of rows {"name", "jax_median_s", "torch_median_s", "ratio", "runs",
"jax_compile_s", "torch_first_call_s", "jax_peak_memory_mb", "torch_peak_memory_mb", ...}.
`--quick`: 320/512 sizing, 2 runs, smaller RoIAlign cases (a smoke run, not a measurement).
`--data DIR`: another COCO-style folder (annotations.json + images/) of photos, e.g. a copy of
coco128_seg on a machine without `../shared`. On a GPU, per-case device peaks are also recorded in
process (`torch_device_peak_mb`, reset per case; `jax_device_peak_so_far_mb`, XLA's peak since
the process began, which cannot be reset).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import pathlib
import pickle
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
DATASET = SHARED_DATA / 'coco128_seg'

MODEL_CASES = ('inference_b1', 'inference_b4', 'forward_b1', 'train_step_b2')
MICRO_CASES = ('roi_align_7x7_gather', 'roi_align_7x7_einsum', 'roi_align_14x14_gather',
               'roi_align_14x14_einsum', 'nms_1000', 'nms_5000', 'paste_rle_100')
# The H100 goals of issue 6 (bf16 training on a 1024x1024 canvas, bf16 inference per image):
# part of the default set only where torch sees a GPU (on a 2-core CPU they take many minutes).
THROUGHPUT_CASES = ('train_1024_bf16', 'inference_bf16_b8')
CASES = MODEL_CASES + MICRO_CASES + THROUGHPUT_CASES
SIDES = ('jax', 'torch')
REFERENCE_HW = (427, 640)        # a 640x427 COCO photo: 800x1201 at 800/1333, padded 800x1216
PASTE_IMAGE_HW = (427, 640)
NUM_IMAGES = 4
TRAIN_BATCH = 2
TORCH_LR = 0.02 * 1e-3           # = our schedule's lr at step 0 (base 0.02, warmup factor 1e-3)
PROBE_TIMEOUT_S = 3600


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
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> 'Settings':
        s = cls()
        if args.quick:
            s.quick, s.min_size, s.max_size, s.runs = True, 320, 512, 2
            s.rois_7 = 250
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
    from mrcnn_jax import preprocess
    return preprocess.resized_size(h, w, min_size, max_size, 'torchvision')


def padded_size(h: int, w: int, divisible: int = 32) -> tuple[int, int]:
    """torchvision's padded size of a resized image (models.layers.np_padded_size as ints)."""
    from mrcnn_jax.models.layers import np_padded_size
    ph, pw = np_padded_size((h, w), divisible)
    return int(ph), int(pw)


# -- timing ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    jax_first_s: float
    torch_first_s: float
    jax_runs: list[float]
    torch_runs: list[float]

    @property
    def ratios(self) -> list[float]:
        """jax / torch of each interleaved pair."""
        return [a / b if b > 0 else float('nan') for a, b in zip(self.jax_runs, self.torch_runs)]

    @property
    def jax_median_s(self) -> float:
        return statistics.median(self.jax_runs)

    @property
    def torch_median_s(self) -> float:
        return statistics.median(self.torch_runs)

    @property
    def ratio(self) -> float:
        """Median of the per-pair ratios (not the ratio of the medians)."""
        return statistics.median(self.ratios)


def interleave(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], runs: int, warmup: int = 0,
               clock: Callable[[], float] = time.perf_counter,
               on_first: Callable[[str, Any], None] | None = None) -> Timing:
    """Times jax_fn and torch_fn alternately: first calls (A B), `warmup` untimed pairs, then
    `runs` timed pairs A B A B. Each fn must block until its result is computed."""
    if runs < 1:
        raise ValueError(f'runs must be >= 1, got {runs}')
    t0 = clock()
    out = jax_fn()
    jax_first = clock() - t0
    if on_first:
        on_first('jax', out)
    t0 = clock()
    out = torch_fn()
    torch_first = clock() - t0
    if on_first:
        on_first('torch', out)
    del out
    for _ in range(warmup):
        jax_fn()
        torch_fn()
    ja, ta = [], []
    for _ in range(runs):
        t0 = clock()
        jax_fn()
        ja.append(clock() - t0)
        t0 = clock()
        torch_fn()
        ta.append(clock() - t0)
    return Timing(jax_first, torch_first, ja, ta)


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- data --------------------------------------------------------------------------------------
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
    d, m = cfg.data, cfg.model
    sizes = [s.image.shape[:2] for s in samples]
    resized = [preprocess.resized_size(h, w, d.min_size[0], d.max_size, d.resize_rule) for h, w in sizes]
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
        x = preprocess.normalize(s.image, d.pixel_scale, d.pixel_mean, d.pixel_std, d.channel_order)
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


# -- the two sides' models ---------------------------------------------------------------------
def torch_device():
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def torch_sync(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def torch_architecture(min_size: int, max_size: int, num_classes: int = 91):
    """torchvision's maskrcnn_resnet50_fpn as the v1 COCO weights load it (FrozenBN eps 0, 3
    trainable backbone layers), without weights: for loading a saved state_dict."""
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops
    body = torchvision.models.resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes, min_size=min_size,
                     max_size=max_size)
    overwrite_eps(model, 0.0)
    return model


class Context:
    """What the cases share, built lazily: the images, torchvision's model, its state_dict and
    our predictors. In a probe it is read from the files the parent saved (`save_for_probes`), so
    that a JAX probe never imports torch."""

    def __init__(self, settings: Settings, probe_dir: str | None = None):
        self.settings = settings
        self.probe_dir = probe_dir
        self._cache: dict[str, Any] = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def samples(self) -> list[Sample]:
        return self._get('samples', self._load_samples)

    def _load_samples(self):
        if self.probe_dir:
            with open(os.path.join(self.probe_dir, 'samples.pkl'), 'rb') as f:
                return [Sample(**d) for d in pickle.load(f)]
        samples, where = select_samples(self.settings)
        self._cache['samples_source'] = where
        return samples

    @property
    def samples_source(self) -> str:
        self.samples
        return self._cache.get('samples_source', 'probe')

    @property
    def device(self):
        return self._get('device', torch_device)

    @property
    def tv_model(self):
        return self._get('tv_model', self._build_tv_model)

    def _build_tv_model(self):
        import torch
        s = self.settings
        if self.probe_dir:
            model = torch_architecture(s.min_size, s.max_size)
            model.load_state_dict(torch.load(os.path.join(self.probe_dir, 'state.pth'), weights_only=True))
        else:
            from mrcnn_jax.testing.torchvision_reference import build_torchvision_maskrcnn
            t0 = time.perf_counter()
            model = build_torchvision_maskrcnn(seed=s.seed, min_size=s.min_size, max_size=s.max_size,
                                               calibration_images=[x.image for x in self.samples])
            self._cache['tv_build_s'] = time.perf_counter() - t0
        return model.eval().to(self.device)

    @property
    def state_dict(self) -> dict[str, np.ndarray]:
        return self._get('state_dict', self._load_state_dict)

    def _load_state_dict(self):
        if self.probe_dir:
            with np.load(os.path.join(self.probe_dir, 'state.npz')) as z:
                return {k: z[k] for k in z.files}
        return {k: v.detach().cpu().numpy() for k, v in self.tv_model.state_dict().items()}

    def predictor(self, batch_size: int, dtype: str = 'float32'):
        """Our Predictor of torchvision's weights; `dtype` is its compute dtype."""
        def make():
            from mrcnn_jax.predictor import Predictor
            if batch_size == 1 and dtype == 'float32':
                s = self.settings
                return Predictor.from_torchvision(self.state_dict, min_size=s.min_size, max_size=s.max_size)
            p = self.predictor(1)              # the same converted variables
            config = copy.deepcopy(p.config)
            config.model.dtype = dtype
            return Predictor(config, p.variables, label_ids=p.label_ids, class_names=p.class_names,
                             batch_size=batch_size)
        return self._get(f'predictor_{batch_size}_{dtype}', make)

    def save_for_probes(self, directory: str, with_model: bool) -> None:
        with open(os.path.join(directory, 'settings.json'), 'w') as f:
            json.dump(self.settings.to_json(), f)
        if with_model:
            import torch
            with open(os.path.join(directory, 'samples.pkl'), 'wb') as f:
                pickle.dump([dataclasses.asdict(x) for x in self.samples], f)
            torch.save(self.tv_model.state_dict(), os.path.join(directory, 'state.pth'))
            np.savez(os.path.join(directory, 'state.npz'), **self.state_dict)

    def release_models(self) -> None:
        for k in [k for k in self._cache if k not in ('samples', 'samples_source', 'device', 'tv_build_s')]:
            del self._cache[k]
        import gc
        gc.collect()


# -- the cases: one builder per (case, side), returning a blocking fn() and a summary of its output
def _summ_detections(out) -> str:
    outs = out if isinstance(out, (list, tuple)) else [out]
    counts = [len(o['scores']) for o in outs]
    return 'detections ' + '/'.join(str(c) for c in counts)


def _cycle(items: Sequence[Any], n: int) -> list[Any]:
    """n items, repeating the list as often as needed (the first n when there are enough)."""
    return [items[i % len(items)] for i in range(n)]


def _jax_inference(ctx: Context, b: int, dtype: str = 'float32'):
    p = ctx.predictor(b, dtype)
    images = _cycle([x.image for x in ctx.samples], b)
    arg = images[0] if b == 1 else images
    return (lambda: p(arg)), _summ_detections


def _torch_autocast(dev, bf16: bool):
    import torch
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _torch_inference(ctx: Context, b: int, bf16: bool = False):
    import torch
    from mrcnn_jax.testing.torchvision_reference import image_to_tensor
    model, dev = ctx.tv_model, ctx.device
    model.eval()
    images = _cycle([x.image for x in ctx.samples], b)

    def fn():
        with torch.inference_mode(), _torch_autocast(dev, bf16):
            xs = [image_to_tensor(im).to(dev) for im in images]
            out = [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()}
                   for o in model(xs)]
        torch_sync(dev)
        return out if b > 1 else out[0]
    return fn, _summ_detections


def _jax_forward(ctx: Context):
    import jax
    p = ctx.predictor(1)
    x, info, bucket = p.preprocess(ctx.samples[0].image)
    canvas = np.zeros((1, bucket[0], bucket[1], 3), np.float32)
    canvas[0, :x.shape[0], :x.shape[1]] = x
    images, image_info = jax.device_put((canvas, info[None]))
    forward = jax.jit(p.model.apply)   # its own program: compiled (and timed) here

    def fn():
        return jax.block_until_ready(forward(p.variables, images, image_info))
    return fn, lambda out: f'canvas HxW {bucket[0]}x{bucket[1]}, detections {int(np.asarray(out["valid"]).sum())}'


def _torch_forward(ctx: Context):
    import torch
    from mrcnn_jax.testing.torchvision_reference import image_to_tensor
    model, dev = ctx.tv_model, ctx.device
    model.eval()
    with torch.inference_mode():
        image_list, _ = model.transform([image_to_tensor(ctx.samples[0].image).to(dev)])

    def fn():
        with torch.inference_mode():
            feats = model.backbone(image_list.tensors)
            proposals, _ = model.rpn(image_list, feats)
            dets, _ = model.roi_heads(feats, proposals, image_list.image_sizes)
        torch_sync(dev)
        return dets
    h, w = image_list.tensors.shape[-2:]
    return fn, lambda out: f'canvas HxW {h}x{w}, detections {len(out[0]["scores"])}'


def jax_train_setup(state_dict: dict, samples: Sequence[Sample], min_size: int, max_size: int,
                    dtype: str = 'float32'):
    """(step_fn, state, batch, mesh) of our train step on converted torchvision weights; `dtype`
    is the compute dtype of convolutions and FCs (parameters and optimizer state stay float32)."""
    import jax
    from mrcnn_jax.convert import torchvision as tv_convert
    from mrcnn_jax.models.mask_rcnn import build_model
    from mrcnn_jax.predictor import config_for_torchvision
    from mrcnn_jax.training import optimizer, train_step as ts
    from mrcnn_jax.training.losses import make_loss_fn
    cfg = config_for_torchvision(tv_convert.model_config_from_state_dict(state_dict),
                                 min_size=min_size, max_size=max_size)
    cfg.model.backbone.frozen_stages = 2          # torchvision: trainable_backbone_layers=3
    cfg.data.class_index = 'category_id'          # torchvision's 91-way COCO head
    cfg.model.dtype = dtype
    model = build_model(cfg.model)
    variables = tv_convert.convert_state_dict(state_dict, cfg.model)
    tx = optimizer.build_optimizer(cfg.train, variables['params'], cfg.model.backbone.frozen_stages)
    mesh = ts.make_mesh(jax.devices()[:1])
    state = ts.place_state(ts.create_state(variables, tx, jax.random.PRNGKey(0)), mesh)
    frozen = optimizer.frozen_param_mask(variables['params'], cfg.model.backbone.frozen_stages)
    step = ts.make_train_step(make_loss_fn(model, cfg.model), tx, mesh, frozen=frozen)
    return step, state, train_batch(samples, cfg), mesh


def _jax_train(ctx: Context, samples: Sequence[Sample], min_size: int, max_size: int,
               dtype: str = 'float32', prefetch: bool = False):
    """Our train step on `samples`; with `prefetch` the batch is on the device before the timed
    calls (an input pipeline's prefetch), else each call transfers it, as torch's side does."""
    import jax
    from mrcnn_jax.training import train_step as ts
    step, state, batch, mesh = jax_train_setup(ctx.state_dict, samples, min_size, max_size, dtype=dtype)
    holder = {'state': state}
    device_batch = ts.shard_batch(batch, mesh) if prefetch else None

    def fn():
        new_state, metrics = step(holder['state'], device_batch if prefetch else ts.shard_batch(batch, mesh))
        holder['state'] = new_state
        return jax.device_get(metrics)
    canvas = batch['images'].shape[1:3]
    return fn, lambda m: (f'batch {len(samples)}, canvas HxW {canvas[0]}x{canvas[1]}, '
                          f'loss {float(m["loss"]):.3f}, finite {bool(m["finite"])}')


def _torch_train(ctx: Context, samples: Sequence[Sample], canvas_size: int | None = None,
                 bf16: bool = False, prefetch: bool = False):
    """torchvision's train step on `samples` (SGD as ours at step 0); `canvas_size` sets its
    transform's min and max size; `bf16`: autocast; `prefetch` as in `_jax_train`."""
    import torch
    from mrcnn_jax.testing.torchvision_reference import image_to_tensor
    dev = ctx.device
    model = copy.deepcopy(ctx.tv_model).to(dev)
    if canvas_size is not None:
        model.transform.min_size, model.transform.max_size = (canvas_size,), canvas_size
    model.train()    # FrozenBN stays frozen; conv1 + layer1 have requires_grad False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=TORCH_LR, momentum=0.9, weight_decay=1e-4)
    images = [image_to_tensor(x.image) for x in samples]
    targets = [{'boxes': torch.from_numpy(x.boxes), 'labels': torch.from_numpy(x.classes),
                'masks': torch.from_numpy(x.masks)} for x in samples]

    def to_device():
        return [x.to(dev) for x in images], [{k: v.to(dev) for k, v in t.items()} for t in targets]
    on_device = to_device() if prefetch else None

    def fn():
        xs, ts = on_device if prefetch else to_device()
        with _torch_autocast(dev, bf16):
            losses = model(xs, ts)
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch_sync(dev)
        return float(loss.detach())
    return fn, lambda loss: f'batch {len(samples)}, loss {loss:.3f}'


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


def _throughput_samples(ctx: Context) -> list[Sample]:
    s = ctx.settings
    return ctx._get('throughput_samples', lambda: _cycle(
        [letterbox(x, s.throughput_size) for x in ctx.samples], s.throughput_batch))


# micro-benchmarks: inputs from a seeded numpy generator, shared by both sides
POOLER_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


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


def _roi_inputs(s: Settings, out: int):
    rng = np.random.default_rng(s.seed + out)
    h, w = s.micro_canvas
    feats = [rng.standard_normal((1, int(h * sc), int(w * sc), 256), dtype=np.float32) for sc in POOLER_SCALES]
    n = s.rois_7 if out == 7 else s.rois_14
    return feats, random_boxes(rng, n, (h, w))


def _roi_params(s: Settings, out: int) -> str:
    n = s.rois_7 if out == 7 else s.rois_14
    return f'{n} RoIs x 256 ch -> {out}x{out}, P2-P5 of {s.micro_canvas[0]}x{s.micro_canvas[1]}, sampling 2'


def _jax_roi_align(ctx: Context, out: int, method: str):
    import jax
    from mrcnn_jax.ops.roi_align import multilevel_roi_align
    feats, boxes = _roi_inputs(ctx.settings, out)
    feats, boxes = jax.device_put((feats, boxes[None]))
    f = jax.jit(lambda fs, bx: multilevel_roi_align(fs, bx, (out, out), 2, False, scales=POOLER_SCALES,
                                                    method=method))
    return (lambda: jax.block_until_ready(f(feats, boxes))), None


def _torch_roi_align(ctx: Context, out: int):
    import torch
    from torchvision.ops import MultiScaleRoIAlign
    dev = ctx.device
    feats, boxes = _roi_inputs(ctx.settings, out)
    x = {str(i): torch.from_numpy(f.transpose(0, 3, 1, 2).copy()).to(dev) for i, f in enumerate(feats)}
    b = [torch.from_numpy(boxes).to(dev)]
    pool = MultiScaleRoIAlign([str(i) for i in range(len(feats))], out, 2)
    hw = [tuple(ctx.settings.micro_canvas)]

    def fn():
        with torch.inference_mode():
            r = pool(x, b, hw)
        torch_sync(dev)
        return r
    return fn, None


def _nms_inputs(s: Settings, n: int):
    """n boxes in clusters (jittered copies of n / 20 objects), uniform scores."""
    rng = np.random.default_rng(s.seed + n)
    h, w = s.micro_canvas
    centres = random_boxes(rng, max(n // 20, 1), (h, w), 16, 400)
    pick = centres[rng.integers(0, len(centres), n)]
    size = np.concatenate([pick[:, 2:] - pick[:, :2]] * 2, axis=1)
    boxes = pick + rng.normal(0, 0.08, (n, 4)).astype(np.float32) * size
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes.astype(np.float32), rng.random(n).astype(np.float32)


def _jax_nms(ctx: Context, n: int):
    import jax
    import jax.numpy as jnp
    from mrcnn_jax.ops.nms import nms
    boxes, scores = jax.device_put(_nms_inputs(ctx.settings, n))
    f = jax.jit(lambda b, s: nms(b, s, jnp.ones(s.shape, bool), 0.7, n))
    return (lambda: jax.block_until_ready(f(boxes, scores))), \
        (lambda out: f'kept {int(np.asarray(out[1]).sum())}')


def _torch_nms(ctx: Context, n: int):
    import torch
    import torchvision
    dev = ctx.device
    boxes, scores = (torch.from_numpy(a).to(dev) for a in _nms_inputs(ctx.settings, n))

    def fn():
        keep = torchvision.ops.nms(boxes, scores, 0.7)
        torch_sync(dev)
        return keep
    return fn, lambda keep: f'kept {len(keep)}'


def _paste_inputs(s: Settings):
    rng = np.random.default_rng(s.seed + 28)
    n = s.paste_n
    logits = np.stack([_smooth_noise(rng, (28, 28), (5, 5), 1)[..., 0] for _ in range(n)])
    masks = 1 / (1 + np.exp(-12 * (logits - 0.5)))
    return masks.astype(np.float32), random_boxes(rng, n, PASTE_IMAGE_HW, 8, 400)


def _jax_paste(ctx: Context):
    # Host-side numpy (no JAX program): what the Predictor / evaluation run after `predict`.
    from mrcnn_jax.ops.masks import paste_masks_to_rle
    masks, boxes = _paste_inputs(ctx.settings)
    return (lambda: paste_masks_to_rle(masks, boxes, PASTE_IMAGE_HW)), None


def _torch_paste(ctx: Context):
    import torch
    from pycocotools import mask as mask_util
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    dev = ctx.device
    masks, boxes = (torch.from_numpy(a).to(dev) for a in _paste_inputs(ctx.settings))

    def fn():
        with torch.inference_mode():
            pasted = paste_masks_in_image(masks[:, None], boxes, PASTE_IMAGE_HW, padding=1)
            binary = (pasted > 0.5).cpu().numpy()
        # torchvision's references/detection/coco_eval.py, prepare_for_coco_segmentation
        rles = [mask_util.encode(np.array(m[0, :, :, np.newaxis], dtype=np.uint8, order='F'))[0]
                for m in binary]
        for rle in rles:
            rle['counts'] = rle['counts'].decode('utf-8')
        return rles
    return fn, None


def build_case(name: str, side: str, ctx: Context) -> tuple[Callable[[], Any], Callable[[Any], str] | None]:
    j, s = side == 'jax', ctx.settings
    if name in ('inference_b1', 'inference_b4'):
        b = 1 if name == 'inference_b1' else 4
        return _jax_inference(ctx, b) if j else _torch_inference(ctx, b)
    if name == 'forward_b1':
        return _jax_forward(ctx) if j else _torch_forward(ctx)
    if name == 'train_step_b2':
        samples = ctx.samples[:TRAIN_BATCH]
        return (_jax_train(ctx, samples, s.min_size, s.max_size) if j else _torch_train(ctx, samples))
    if name.startswith('roi_align_'):
        _, _, size, method = name.split('_')
        out = int(size.split('x')[0])
        return _jax_roi_align(ctx, out, method) if j else _torch_roi_align(ctx, out)
    if name.startswith('nms_'):
        n = int(name.split('_')[1])
        return _jax_nms(ctx, n) if j else _torch_nms(ctx, n)
    if name == 'paste_rle_100':
        return _jax_paste(ctx) if j else _torch_paste(ctx)
    if name == 'train_1024_bf16':
        samples, size = _throughput_samples(ctx), s.throughput_size
        return (_jax_train(ctx, samples, size, size, 'bfloat16', prefetch=True) if j else
                _torch_train(ctx, samples, size, bf16=True, prefetch=True))
    if name == 'inference_bf16_b8':
        return (_jax_inference(ctx, s.infer_batch, 'bfloat16') if j else
                _torch_inference(ctx, s.infer_batch, bf16=True))
    raise ValueError(f'unknown case {name!r}; known: {", ".join(CASES)}')


def case_params(name: str, ctx: Context) -> str:
    s = ctx.settings
    if name in MODEL_CASES:
        n = {'inference_b1': 1, 'inference_b4': 4, 'forward_b1': 1, 'train_step_b2': TRAIN_BATCH}[name]
        shapes = ', '.join(f'{x.image.shape[1]}x{x.image.shape[0]}' for x in ctx.samples[:n])
        return f'{s.min_size}/{s.max_size} sizing, images {shapes}'
    if name.startswith('roi_align_'):
        return _roi_params(s, int(name.split('_')[2].split('x')[0]))
    if name.startswith('nms_'):
        return f'N={name.split("_")[1]} clustered boxes, IoU 0.7, all kept boxes returned'
    if name == 'train_1024_bf16':
        return (f'{s.throughput_batch} photos letterboxed on {s.throughput_size}x{s.throughput_size}, '
                f'bf16 compute (torch autocast), fp32 params')
    if name == 'inference_bf16_b8':
        return f'{s.infer_batch} photos, {s.min_size}/{s.max_size} sizing, bf16 compute (torch autocast)'
    if name == 'paste_rle_100':
        return f'{s.paste_n} masks 28x28 -> {PASTE_IMAGE_HW[0]}x{PASTE_IMAGE_HW[1]}, > 0.5, RLE'
    return ''


# -- running -----------------------------------------------------------------------------------
COMPILE_EVENTS = {
    '/jax/core/compile/jaxpr_trace_duration': 'trace',
    '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
    '/jax/core/compile/backend_compile_duration': 'backend_compile',
}


class CompileTimer:
    """Sums JAX's compile-time events (trace, lowering to MLIR, XLA backend compile) from entry
    until `stop()` (the end of the JAX side's first call) or exit."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self._on = True

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if self._on and event in COMPILE_EVENTS:
            self.events.append((COMPILE_EVENTS[event], float(duration)))

    def __enter__(self) -> 'CompileTimer':
        import jax.monitoring
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def stop(self) -> None:
        self._on = False

    def __exit__(self, *exc) -> None:
        import jax.monitoring
        self._on = False
        try:
            jax.monitoring.unregister_event_duration_listener(self._listener)
        except (AttributeError, ValueError, AssertionError):
            pass

    @property
    def total_s(self) -> float:
        return sum(d for _, d in self.events)

    def breakdown(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, d in self.events:
            out[k] = out.get(k, 0.0) + d
        return out


def run_case(name: str, ctx: Context, log: Callable[[str], None] = print) -> dict:
    """Times one case (both sides interleaved) and returns its row."""
    s = ctx.settings
    row: dict[str, Any] = {'name': name, 'jax_median_s': None, 'torch_median_s': None, 'ratio': None,
                           'runs': 0, 'params': case_params(name, ctx)}
    t0 = time.perf_counter()
    jax_fn, jax_summ = build_case(name, 'jax', ctx)
    jax_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch_fn, torch_summ = build_case(name, 'torch', ctx)
    torch_setup = time.perf_counter() - t0
    notes: dict[str, str] = {}

    def on_first(side, out):
        summ = jax_summ if side == 'jax' else torch_summ
        if summ is not None:
            notes[side] = summ(out)

    micro = name in MICRO_CASES
    _reset_torch_device_peak()
    with CompileTimer() as compile_timer:
        timing = interleave(jax_fn, torch_fn, s.runs, s.micro_warmup if micro else s.warmup,
                            on_first=lambda side, out: (on_first(side, out), compile_timer.stop()))
    first_minus_median = max(timing.jax_first_s - timing.jax_median_s, 0.0)
    row.update(
        jax_median_s=timing.jax_median_s, torch_median_s=timing.torch_median_s, ratio=timing.ratio,
        runs=len(timing.jax_runs),
        # XLA's own account of the first call: tracing + lowering + backend compilation (from
        # jax.monitoring); the first call minus the steady-state median is kept beside it.
        jax_compile_s=(compile_timer.total_s if compile_timer.events else
                       (first_minus_median if name != 'paste_rle_100' else None)),
        jax_compile_breakdown_s=compile_timer.breakdown(),
        jax_first_minus_median_s=first_minus_median,
        jax_first_call_s=timing.jax_first_s, torch_first_call_s=timing.torch_first_s,
        jax_runs_s=timing.jax_runs, torch_runs_s=timing.torch_runs, ratios=timing.ratios,
        jax_setup_s=jax_setup, torch_setup_s=torch_setup,
        jax_output=notes.get('jax'), torch_output=notes.get('torch'),
        load_avg=load_avg())
    row.update(device_peaks_mb())
    if name in THROUGHPUT_CASES:
        n = s.throughput_batch if name == 'train_1024_bf16' else s.infer_batch
        row['images_per_call'] = n
        row['jax_images_per_s'] = n / timing.jax_median_s
        row['torch_images_per_s'] = n / timing.torch_median_s
    if name == 'forward_b1' and compile_timer.breakdown().get('backend_compile', 0.0) < 1.0:
        row['notes'] = ('JAX reused the program inference_b1 compiled (same function and shapes): '
                        'see inference_b1 for its compile time')
    return row


def _reset_torch_device_peak() -> None:
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_peaks_mb() -> dict:
    """On a GPU, in this process: torch's peak allocation since the case began
    (`torch_device_peak_mb`) and JAX's peak since the process began (`jax_device_peak_so_far_mb`:
    XLA's allocator keeps no resettable peak, so this one only grows from case to case; the
    per-case figure comes from the probes)."""
    out: dict[str, float] = {}
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        out['torch_device_peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    jax = sys.modules.get('jax')
    if jax is not None and jax.default_backend() != 'cpu':
        stats = jax.devices()[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            out['jax_device_peak_so_far_mb'] = stats['peak_bytes_in_use'] / 2 ** 20
    return out


def probe_memory(name: str, side: str, probe_dir: str, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Runs `--probe side name` in a fresh interpreter; returns its report (or an 'error')."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    cmd = [sys.executable, '-m', 'mrcnn_jax.benchmark', '--probe', side, name, '--probe-dir', probe_dir]
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'probe timed out after {timeout:.0f} s'}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('PROBE '):
            return json.loads(line[len('PROBE '):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {'error': f'probe exited with {proc.returncode}: ' + '\n'.join(tail)}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: VmHWM of /proc/self/status, which starts
    afresh at exec (ru_maxrss does not: after fork + exec it keeps the parent's RSS at the fork,
    so every probe would report at least the parent's size)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _probe_main(side: str, name: str, probe_dir: str) -> int:
    """Child process: build one side of one case, run it twice (first call + one steady run),
    print its peak memory as `PROBE {json}`."""
    with open(os.path.join(probe_dir, 'settings.json')) as f:
        settings = Settings.from_json(json.load(f))
    if side == 'torch':
        import torch
        torch.set_num_threads(_cores())
    ctx = Context(settings, probe_dir=probe_dir)
    fn, _ = build_case(name, side, ctx)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    steady = time.perf_counter() - t0
    report = {'side': side, 'case': name, 'rss_peak_mb': peak_rss_mb(),
              'first_call_s': first, 'steady_s': steady, 'device_peak_mb': None}
    if side == 'jax':
        import jax
        stats = jax.devices()[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            report['device_peak_mb'] = stats['peak_bytes_in_use'] / 2 ** 20
    else:
        import torch
        if torch.cuda.is_available():
            report['device_peak_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    print('PROBE ' + json.dumps(report), flush=True)
    return 0


# -- reporting ---------------------------------------------------------------------------------
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _transparent_hugepages() -> str:
    """The kernel's transparent hugepage mode ('always', 'madvise', 'never'), '' if unknown."""
    try:
        text = open('/sys/kernel/mm/transparent_hugepage/enabled').read()
    except OSError:
        return ''
    return text[text.find('[') + 1:text.find(']')] if '[' in text else text.strip()


def machine_info() -> dict:
    import jax
    import jaxlib
    import torch
    import torchvision
    info = {
        'cpu': _cpu_model(), 'cores': _cores(), 'cpu_count': os.cpu_count(),
        'python': platform.python_version(),
        'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'jax_backend': jax.default_backend(),
        'jax_devices': [str(d) for d in jax.devices()],
        'torch': torch.__version__, 'torchvision': torchvision.__version__,
        'torch_threads': torch.get_num_threads(), 'torch_interop_threads': torch.get_num_interop_threads(),
        'torch_device': str(torch_device()),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        # host allocator settings: both frameworks' CPU steps page-fault GBs of freshly mapped
        # memory per step, and hugepages change that (docs/performance.md, "Host memory")
        'transparent_hugepages': _transparent_hugepages(),
        'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
        'load_avg_start': load_avg(),
    }
    try:
        info['memory_gib'] = round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpus = []
    if jax.default_backend() == 'gpu':
        gpus.append('jax: ' + ', '.join(sorted({d.device_kind for d in jax.devices()})))
    if torch.cuda.is_available():
        gpus.append('torch: ' + torch.cuda.get_device_name(0))
    info['gpu'] = '; '.join(gpus) or 'none'
    return info


def device_label(info: dict) -> str:
    if info['gpu'] != 'none':
        return info['gpu']
    return f'{info["cpu"]} x{info["cores"]} cores (CPU)'


def format_header(info: dict, settings: Settings, source: str) -> str:
    lines = [
        '# mrcnn_jax vs torchvision',
        f'- machine: {info["cpu"]}, {info["cores"]} cores available ({info["cpu_count"]} online), '
        f'{info.get("memory_gib", "?")} GiB RAM; GPU: {info["gpu"]}',
        f'- jax {info["jax"]} (jaxlib {info["jaxlib"]}, backend {info["jax_backend"]}, devices '
        f'{", ".join(info["jax_devices"])}), XLA_FLAGS={info["xla_flags"]!r}',
        f'- host memory: transparent hugepages {info["transparent_hugepages"] or "?"}, '
        f'GLIBC_TUNABLES={info["glibc_tunables"]!r}',
        f'- torch {info["torch"]}, torchvision {info["torchvision"]} on {info["torch_device"]}: '
        f'{info["torch_threads"]} intra-op / {info["torch_interop_threads"]} inter-op threads',
        f'- settings: {settings.min_size}/{settings.max_size} sizing, {settings.runs} timed pairs '
        f'(interleaved JAX, torch) after first calls{" (QUICK: smoke run)" if settings.quick else ""}',
        f'- images: {source}',
        f'- load average at start: {info["load_avg_start"]}',
    ]
    return '\n'.join(lines)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return '-'
    if isinstance(x, float):
        if x != x:
            return 'nan'
        return f'{x:.{digits}f}' if abs(x) < 100 else f'{x:.0f}'
    return str(x)


def format_table(rows: Sequence[dict]) -> str:
    head = ('case', 'runs', 'JAX s', 'torch s', 'ratio jax/torch', 'JAX compile s', 'torch 1st call s',
            'JAX peak MB', 'torch peak MB', 'load 1/5/15')
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        if r.get('error') and r.get('jax_median_s') is None:
            out.append(f'| {r["name"]} | error: {r["error"].splitlines()[-1][:80]} |' + ' |' * (len(head) - 2))
            continue
        load = '/'.join(str(x) for x in r.get('load_avg') or []) or '-'
        out.append('| ' + ' | '.join([
            r['name'], str(r['runs']), _fmt(r['jax_median_s'], 4), _fmt(r['torch_median_s'], 4),
            _fmt(r['ratio'], 2), _fmt(r.get('jax_compile_s'), 1), _fmt(r.get('torch_first_call_s'), 2),
            _fmt(r.get('jax_peak_memory_mb'), 0), _fmt(r.get('torch_peak_memory_mb'), 0), load]) + ' |')
    rates = [r for r in rows if r.get('jax_images_per_s') is not None]
    if rates:
        out += ['', '| case | images per call | JAX images/s | torch images/s | JAX ms/image | torch ms/image |',
                '|---|---|---|---|---|---|']
        for r in rates:
            out.append(f'| {r["name"]} | {r["images_per_call"]} | {_fmt(r["jax_images_per_s"], 1)} | '
                       f'{_fmt(r["torch_images_per_s"], 1)} | {_fmt(1e3 / r["jax_images_per_s"], 1)} | '
                       f'{_fmt(1e3 / r["torch_images_per_s"], 1)} |')
    return '\n'.join(out)


def _outputs(row: dict) -> str:
    if row.get('jax_output') is None and row.get('torch_output') is None:
        return ''
    return f'  [jax: {row.get("jax_output")} | torch: {row.get("torch_output")}]'


def write_json(path: str, rows: Sequence[dict]) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(list(rows), f, indent=1)
    os.replace(tmp, path)


def _hide_gpu_from_tensorflow() -> None:
    tf = sys.modules.get('tensorflow')
    if tf is not None:
        try:
            tf.config.set_visible_devices([], 'GPU')
        except Exception:  # already initialized: nothing more to do
            pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='benchmark', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='cases: ' + ', '.join(CASES))
    p.add_argument('--quick', action='store_true', help='smoke run: 320/512 sizing, 2 runs, smaller micro cases')
    p.add_argument('--only', default='', help='comma-separated case names (or "model", "micro", "throughput"); '
                   'default: all, the throughput cases only on a GPU')
    p.add_argument('--runs', type=int, default=0, help='timed pairs per case (default 5, quick 2)')
    p.add_argument('--warmup', type=int, default=None, help='untimed pairs after the first calls (model cases)')
    p.add_argument('--json', default='', help='write the rows to this JSON file')
    p.add_argument('--memory', choices=('model', 'all', 'none'), default='model',
                   help='peak-memory probes (a subprocess per side and case): model cases, all, none')
    p.add_argument('--min-size', type=int, default=0)
    p.add_argument('--max-size', type=int, default=0)
    p.add_argument('--images', default='', help='comma-separated file names in coco128_seg (4 of one bucket)')
    p.add_argument('--synthetic', action='store_true', help='synthetic images even if ../shared/data exists')
    p.add_argument('--data', default='', help=f'COCO-style folder of the photos (default {DATASET})')
    p.add_argument('--throughput-batch', type=int, default=0,
                   help='images per step of train_1024_bf16 (default 16, quick 2)')
    p.add_argument('--micro-canvas', default='', help='HxW of the RoIAlign FPN canvas (default: the image class)')
    p.add_argument('--micro-rois', type=int, default=0, help='RoIs of both RoIAlign cases (default 1000 / 100)')
    p.add_argument('--probe', nargs=2, metavar=('SIDE', 'CASE'), help=argparse.SUPPRESS)
    p.add_argument('--probe-dir', default='', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_cases(only: str, gpu: bool = False) -> list[str]:
    """The cases `--only` names (groups: model, micro, throughput); by default all, the
    throughput cases only where there is a GPU."""
    if not only:
        return list(MODEL_CASES + MICRO_CASES + (THROUGHPUT_CASES if gpu else ()))
    names: list[str] = []
    for item in (x.strip() for x in only.split(',') if x.strip()):
        group = {'model': MODEL_CASES, 'micro': MICRO_CASES, 'throughput': THROUGHPUT_CASES}.get(item)
        if group:
            names += [n for n in group if n not in names]
        elif item in CASES:
            if item not in names:
                names.append(item)
        else:
            raise SystemExit(f'unknown case {item!r}; known: {", ".join(CASES)} (or model, micro, throughput)')
    return [n for n in CASES if n in names]   # canonical order: inference before training


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')   # JAX and torch share a GPU
    if args.probe:
        side, name = args.probe
        if side not in SIDES or name not in CASES:
            raise SystemExit(f'--probe SIDE CASE: SIDE in {SIDES}, CASE in {CASES}')
        return _probe_main(side, name, args.probe_dir)

    import torch  # before tensorflow, should anything import it (see tests/conftest.py)
    _hide_gpu_from_tensorflow()
    torch.set_num_threads(_cores())
    names = resolve_cases(args.only, gpu=torch.cuda.is_available())
    settings = Settings.from_args(args)
    ctx = Context(settings)
    info = machine_info()
    needs_images = any(n not in MICRO_CASES for n in names)
    source = ctx.samples_source if needs_images else 'none (micro-benchmarks only)'
    print(format_header(info, settings, source), flush=True)
    if needs_images:
        for x in ctx.samples:
            h, w = x.image.shape[:2]
            rh, rw = resized_size(h, w, settings.min_size, settings.max_size)
            print(f'  {x.name} (W x H): {w}x{h} -> {rw}x{rh}, padded {padded_size(rh, rw)[1]}x{padded_size(rh, rw)[0]}, '
                  f'{len(x.boxes)} instances', flush=True)
        t0 = time.perf_counter()
        ctx.tv_model
        print(f'torchvision model built and calibrated on these images in {time.perf_counter() - t0:.1f} s '
              f'(load {load_avg()})', flush=True)
    label = device_label(info)
    rows: list[dict] = []
    failed = False
    for name in names:
        print(f'\n## {name}  (load {load_avg()})', flush=True)
        try:
            row = run_case(name, ctx)
        except Exception as e:  # keep going: one broken case must not hide the others
            failed = True
            row = {'name': name, 'jax_median_s': None, 'torch_median_s': None, 'ratio': None, 'runs': 0,
                   'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc(),
                   'load_avg': load_avg()}
            print(row['traceback'], file=sys.stderr, flush=True)
        row['device'] = label
        if 'tv_build_s' in ctx._cache and name not in MICRO_CASES:
            row['torch_model_build_s'] = ctx._cache['tv_build_s']
        rows.append(row)
        if row.get('jax_median_s') is not None:
            print(f'  jax {row["jax_median_s"]:.4f} s, torch {row["torch_median_s"]:.4f} s, ratio '
                  f'{row["ratio"]:.3f}, jax first call {row["jax_first_call_s"]:.2f} s, torch first call '
                  f'{row["torch_first_call_s"]:.2f} s{_outputs(row)} '
                  f'load {row["load_avg"]}', flush=True)
        if args.json:
            write_json(args.json, rows)

    probed = [r for r in rows if r.get('jax_median_s') is not None and
              (args.memory == 'all' or (args.memory == 'model' and r['name'] in MODEL_CASES))]
    if probed:
        print('\n## peak memory (one subprocess per side and case)', flush=True)
        with_model = any(r['name'] not in MICRO_CASES for r in probed)
        probe_dir = tempfile.mkdtemp(prefix='mrcnn_bench_probe_')
        try:
            ctx.save_for_probes(probe_dir, with_model)
            ctx.release_models()
            for row in probed:
                for side in SIDES:
                    rep = probe_memory(row['name'], side, probe_dir)
                    if 'error' in rep:
                        failed = True
                        row[f'{side}_memory_error'] = rep['error']
                        print(f'  {row["name"]} {side}: {rep["error"]}', file=sys.stderr, flush=True)
                        continue
                    peak = rep['device_peak_mb'] if rep.get('device_peak_mb') is not None else rep['rss_peak_mb']
                    row[f'{side}_peak_memory_mb'] = peak
                    row[f'{side}_peak_rss_mb'] = rep['rss_peak_mb']
                    row[f'{side}_memory_kind'] = 'device' if rep.get('device_peak_mb') is not None else 'rss'
                    row[f'{side}_probe_first_call_s'] = rep['first_call_s']
                    print(f'  {row["name"]} {side}: peak {peak:.0f} MB ({row[f"{side}_memory_kind"]}), '
                          f'rss {rep["rss_peak_mb"]:.0f} MB, load {load_avg()}', flush=True)
                row['memory_load_avg'] = load_avg()
                if args.json:
                    write_json(args.json, rows)
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)

    print('\n' + format_table(rows), flush=True)
    print(f'\nratio = median over pairs of jax_s / torch_s (< 1: JAX faster); load average at end: {load_avg()}')
    if args.json:
        write_json(args.json, rows)
        print(f'wrote {args.json}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
