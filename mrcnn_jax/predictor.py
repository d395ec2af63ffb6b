"""The public inference API.

```python
from mrcnn_jax import Predictor
p = Predictor.from_torchvision('maskrcnn_resnet50_fpn_coco.pth')   # path or state_dict
p = Predictor.from_detectron2('model_final.pkl', config_file='mask_rcnn_R_50_FPN_3x.yaml')
p = Predictor.from_checkpoint('converted/')                         # what `mrcnn-jax convert` writes
out = p(image)            # HxWx3 uint8 RGB; a list of images gives a list of outputs
out['boxes']  (N, 4) float32 xyxy in original pixels;  out['scores'] (N,);  out['labels'] (N,) int
out['masks']  (N, H, W) float32 in [0, 1]  (mask models; bool with mask_threshold=0.5)
out['keypoints'] (N, K, 3) float32 (x, y, visibility 1) in original pixels, out['keypoints_scores']
              (N, K)  (keypoint models; the score rule is `conventions.keypoint_score`)
```
Each image is resized by the model conventions' rule (`model.conventions`, to data.test_min_size /
test_max_size), placed on the smallest canvas bucket that holds it and run through one compiled
program per (bucket, batch size); images of other sizes in the same bucket reuse it.

The conventions decide the rest of the pre- and post-processing too: with `resize_antialias`
(Detectron2) images are resized on the host with PIL as Detectron2 resizes them (antialiased,
rounded to uint8) and uploaded at their resized size; with `clip_output_boxes` the boxes in
original pixels are clipped to the image and empty ones dropped (Detectron2's
`detector_postprocess`); masks are pasted by `conventions.mask_paste`'s rule (`ops/paste.py`).

One batched-inference path, for a few images and for a dataset: `predict_iter` streams (key,
image) pairs through batches of `batch_size` per bucket, sharded over a device mesh, and yields
results as batches finish; `__call__` collects them in order. COCO
evaluation (`evaluation/inference.py`) and the `predict` CLI use it.

Images are processed independently: torchvision's batched inference pads every image to the
largest in its batch, which changes results with batch composition; ours are those of torchvision
run on each image alone.

Where the work runs (`on_device`): by default the resize and the mask paste run on the device in
jnp (`ops/resample.py`, `ops/paste.py`; the raw uint8 image is uploaded on a canvas padded to a multiple of 64,
pasted masks come back on it and are cropped), so that a GPU never waits on host numpy; equal to
the host path within float32 rounding. `on_device=False` keeps both in host numpy, bit for bit
torch's CPU kernels (`preprocess.resize_bilinear`, `ops.paste.paste_masks`). Masks whose pasted
canvas would exceed `max_device_paste_bytes` (photos of many megapixels) are pasted on the host,
chunk by chunk. `mask_threshold=t` returns bool masks (`probability > t`, as COCO evaluation and
drawing use them; `>= t` under Detectron2's paste rule): thresholded where they are pasted, a quarter of the bytes to move and keep.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mrcnn_jax import preprocess
from mrcnn_jax.config import default_config
from mrcnn_jax.models.conventions import Conventions
from mrcnn_jax.models.layers import np_padded_size
from mrcnn_jax.models.mask_rcnn import build_model
from mrcnn_jax.ops import resample
from mrcnn_jax.ops.paste import paste_masks, paste_masks_to_canvas
from mrcnn_jax.training.train_step import batch_sharding, make_mesh, replicated

log = logging.getLogger(__name__)


class Predictor:
    """Image(s) in, instances out, in original image pixels."""

    def __init__(self, config: ml_collections.ConfigDict, variables: Any, *,
                 label_ids: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 buckets: Sequence[tuple[int, int]] | None = None, batch_size: int = 1,
                 mesh: Mesh | None = None, paste: bool = True, on_device: bool = True,
                 max_device_paste_bytes: int = 2 ** 30, mask_threshold: float | None = None,
                 label_space: str | None = None):
        self.config = config
        # What out['labels'] are, for the record (model directory metadata): e.g.
        # 'coco_category_id' or 'detectron2_class_index'; None: not stated.
        self.label_space = label_space
        self.conventions = Conventions.from_config(config.model.conventions)
        self.model = build_model(config.model)
        k = config.model.num_classes
        self.label_ids = np.asarray(label_ids if label_ids is not None else np.arange(k), np.int64)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in self.label_ids]
        d = config.data
        self.buckets = [tuple(b) for b in (buckets or d.test_buckets or
                                           preprocess.default_buckets(d.test_min_size, d.test_max_size,
                                                                      config.model.size_divisible))]
        self._own_mesh = mesh
        self._variables = None
        self.batch_size = batch_size             # chooses the mesh (see the setter)
        self.variables = variables
        self.paste = paste
        self.on_device = on_device
        self.max_device_paste_bytes = max_device_paste_bytes
        if mask_threshold is not None and not 0 <= mask_threshold < 1:
            raise ValueError(f'mask_threshold must be in [0, 1) or None, got {mask_threshold}')
        self.mask_threshold = mask_threshold
        # Shardings follow the inputs: variables replicated, batches split on the mesh's 'data' axis.
        self._predict = jax.jit(self.model.apply)
        self._resize = jax.jit(self._resize_fn, static_argnums=2)
        self._paste = jax.jit(self._paste_fn, static_argnums=(2, 3))

    @property
    def batch_size(self) -> int:
        """Images per compiled batch (per bucket), a multiple of the mesh's devices."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, n: int):
        """Without a mesh of the caller's, the batch is split over as many local devices as divide
        it (`training.train_step.make_mesh`): batch 1 runs on one device, batch 8 on 8 GPUs; a
        given mesh keeps its devices and the batch is rounded up to a multiple of them."""
        n = max(int(n), 1)
        if self._own_mesh is not None:
            self.mesh = self._own_mesh
            devices = self.mesh.devices.size
            if n % devices:
                log.info('inference batch rounded up to %d (a multiple of %d devices)', -(-n // devices) * devices,
                         devices)
                n = -(-n // devices) * devices
        else:
            local = jax.local_devices()
            self.mesh = make_mesh(local[:math.gcd(n, len(local))])
        self._batch_size = n
        self._data = batch_sharding(self.mesh)
        self._rep = replicated(self.mesh)
        if self._variables is not None:
            self.variables = self._variables     # onto the new mesh

    @property
    def variables(self):
        return self._variables

    @variables.setter
    def variables(self, variables):
        """Replicated on the mesh (a no-op for arrays already placed so, e.g. a train state's)."""
        self._variables = jax.device_put(variables, self._rep)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_torchvision(cls, path_or_state_dict: Any, *, score_thresh: float = 0.05,
                         nms_thresh: float = 0.5, detections_per_img: int = 100, min_size: int = 800,
                         max_size: int = 1333, norm_eps: float = 0.0, **kwargs) -> 'Predictor':
        """From a torchvision `maskrcnn_resnet50_fpn` / `fasterrcnn_resnet50_fpn` (or other depth)
        state_dict or .pth path. Defaults are torchvision's COCO v1 inference settings, including
        FrozenBN eps 0 (torchvision overwrites eps to 0.0 when it loads those weights)."""
        from mrcnn_jax.convert import torchvision as tv
        sd = tv.load_state_dict(path_or_state_dict)
        cfg = config_for_torchvision(tv.model_config_from_state_dict(sd), score_thresh=score_thresh,
                                     nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                                     min_size=min_size, max_size=max_size, norm_eps=norm_eps)
        variables = tv.convert_state_dict(sd, cfg.model)
        label_ids, names = torchvision_labels(cfg.model.num_classes)
        kwargs.setdefault('label_space', 'coco_category_id' if cfg.model.num_classes == 91 else 'class_index')
        return cls(cfg, variables, label_ids=label_ids, class_names=names, **kwargs)

    @classmethod
    def from_detectron2(cls, checkpoint: Any, *, config_file, score_thresh: float | None = None,
                        nms_thresh: float | None = None, detections_per_img: int | None = None,
                        min_size: int | None = None, max_size: int | None = None, **kwargs) -> 'Predictor':
        """From a Detectron2 checkpoint (model-zoo .pkl, training .pth, or a state_dict) and the
        yaml config it was trained with (`_BASE_` chains are followed). A None setting takes the
        config's value (SCORE_THRESH_TEST, NMS_THRESH_TEST, DETECTIONS_PER_IMAGE, MIN_SIZE_TEST,
        MAX_SIZE_TEST); a given one overrides it. Outputs are Detectron2's: labels are COCO
        category ids when the config trains on a COCO split, else Detectron2's class index
        (`convert/detectron2.py`)."""
        from mrcnn_jax.convert import detectron2 as d2
        cfg, info = d2.config_from_yaml(config_file)
        cfg = d2.config_with_overrides(cfg, score_thresh=score_thresh, nms_thresh=nms_thresh,
                                       detections_per_img=detections_per_img, min_size=min_size,
                                       max_size=max_size)
        variables = d2.convert_state_dict(d2.load_checkpoint(checkpoint), cfg.model)
        return cls(cfg, variables, label_ids=info['label_ids'], class_names=info['class_names'],
                   label_space=info['labels'], **kwargs)

    @classmethod
    def from_checkpoint(cls, path, config: ml_collections.ConfigDict | None = None, **kwargs) -> 'Predictor':
        """From a model directory written by `mrcnn-jax convert` or by training (see model_dir.py)."""
        from mrcnn_jax.model_dir import load_model_dir
        cfg, variables, meta = load_model_dir(path, config)
        kwargs.setdefault('label_space', meta.get('label_space'))
        return cls(cfg, variables, label_ids=meta.get('label_ids'), class_names=meta.get('class_names'),
                   **kwargs)

    # -- inference -----------------------------------------------------------------------------
    def __call__(self, images):
        """One HxWx3 uint8 image -> its result dict; a list of images -> a list of results."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results: list[dict | None] = [None] * len(items)
        for i, res in self.predict_iter(enumerate(items)):
            results[i] = res
        return results[0] if single else results

    def predict_iter(self, items: Iterable[tuple[Any, Any]],
                     on_error: Callable[[Any, Exception], None] | None = None) -> Iterator[tuple[Any, dict]]:
        """(key, uint8 image) pairs in, (key, result) out as batches finish (grouped by bucket, so
        not in input order). Memory stays bounded: one pending batch per bucket.

        on_error(key, exception): called for an image that cannot be prepared (bad shape or
        dtype: ValueError, TypeError), which is then skipped; None raises.
        """
        prepare = self._prepare if self.on_device else self.preprocess
        pending: dict[tuple[int, int], list] = {}
        for key, image in items:
            try:
                prepped = prepare(image)
            except (ValueError, TypeError) as e:
                if on_error is None:
                    raise
                on_error(key, e)
                continue
            rows = pending.setdefault(prepped[2], [])
            rows.append((key, prepped))
            if len(rows) == self.batch_size:
                yield from self._run(prepped[2], rows)
                pending[prepped[2]] = []
        for bucket, rows in pending.items():
            if rows:
                yield from self._run(bucket, rows)

    def _run(self, bucket, rows) -> Iterator[tuple[Any, dict]]:
        run = self._run_on_device if self.on_device else self._run_on_host
        results = run([p for _, p in rows], bucket)
        yield from zip((key for key, _ in rows), results)

    def preprocess(self, image) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """uint8 image -> (resized normalized [h, w, 3] float32, image_info [6], bucket), on the host."""
        c = self.conventions
        img, info, bucket = self._prepare(image)
        x = preprocess.normalize(img, c.pixel_scale, c.pixel_mean, c.pixel_std, c.channel_order)
        return preprocess.resize_bilinear(x, (int(info[2]), int(info[3]))), info, bucket

    def predict_batch(self, images: np.ndarray, image_info: np.ndarray) -> dict[str, np.ndarray]:
        """Raw padded model outputs for a canvas batch [B, H, W, 3] (numpy; B a multiple of the
        mesh's devices)."""
        out = self._predict(self.variables, self._shard(images), self._shard(image_info))
        return jax.tree_util.tree_map(np.asarray, out)

    def _shard(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(x), self._data)

    def _batch_info(self, prepped, bucket) -> np.ndarray:
        """[batch_size, 6] image_info of a chunk; unused slots hold the whole bucket at scale 1."""
        info = np.tile(np.asarray([bucket[0], bucket[1], bucket[0], bucket[1], 1, 1], np.float32),
                       (self.batch_size, 1))
        for j, (_, inf, _) in enumerate(prepped):
            info[j] = inf
        return info

    def _run_on_host(self, prepped, bucket):
        canvas = np.zeros((self.batch_size, bucket[0], bucket[1], 3), np.float32)
        for j, (x, _, _) in enumerate(prepped):
            canvas[j, :x.shape[0], :x.shape[1]] = x
        info = self._batch_info(prepped, bucket)
        raw = self.predict_batch(canvas, info)
        return [self.postprocess({k: v[j] for k, v in raw.items()}, info[j]) for j in range(len(prepped))]

    # -- the device path -------------------------------------------------------------------------
    def _prepare(self, image) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """uint8 image -> (uint8 RGB image to upload, image_info [6] (h, w, rh, rw, rh / h, rw / w),
        the canvas bucket): the sizes, without the resize itself (or, with PIL's resize, already
        resized)."""
        d = self.config.data
        img = preprocess.as_rgb_uint8(image)
        h, w = img.shape[:2]
        if h < 1 or w < 1:
            raise ValueError(f'empty image of shape {img.shape}')
        rh, rw = self.conventions.resized_size(h, w, d.test_min_size, d.test_max_size)
        if self.conventions.resize_antialias:
            # Detectron2 resizes the uint8 image with PIL (antialiased, rounded to uint8) before
            # anything else; the device then "resizes" (rh, rw) to itself, an exact copy.
            img = preprocess.resize_pil(img, (rh, rw))
        padded = tuple(int(v) for v in np_padded_size((rh, rw), self.config.model.size_divisible))
        bucket = preprocess.choose_bucket(padded, self.buckets)
        if bucket is None:
            log.warning('image resized to %s exceeds every bucket %s; compiling a canvas of %s',
                        (rh, rw), self.buckets, padded)
            bucket = padded
        return img, np.asarray([h, w, rh, rw, rh / h, rw / w], np.float32), bucket

    def _resize_fn(self, raw, sizes, canvas_hw):
        c = self.conventions
        return resample.normalize_resize_to_canvas(raw, sizes, canvas_hw, pixel_scale=c.pixel_scale,
                                                   mean=c.pixel_mean, std=c.pixel_std,
                                                   channel_order=c.channel_order)

    def _paste_fn(self, out, info, raw_hw, threshold):
        # Boxes in original pixels exactly as `postprocess` computes them (torchvision's
        # resize_boxes: float32(original) / float32(resized) per axis; clipped with
        # clip_output_boxes), then pasted on the canvas.
        ratio_h, ratio_w = info[:, 0] / info[:, 2], info[:, 1] / info[:, 3]
        scale = jnp.stack([ratio_w, ratio_h, ratio_w, ratio_h], axis=-1)[:, None, :]
        boxes = out['boxes'] * scale
        if self.conventions.clip_output_boxes:
            hi = jnp.stack([info[:, 1], info[:, 0], info[:, 1], info[:, 0]], axis=-1)[:, None, :]
            boxes = jnp.clip(boxes, 0.0, hi)
        return paste_masks_to_canvas(out['masks'], boxes, raw_hw, threshold=threshold,
                                     rule=self.conventions.mask_paste)

    def _run_on_device(self, prepped, bucket):
        bs, n = self.batch_size, len(prepped)
        up_hw = tuple(max(resample.raw_canvas(*img.shape[:2])[k] for img, _, _ in prepped) for k in (0, 1))
        raw = np.zeros((bs,) + up_hw + (3,), np.uint8)
        sizes = np.ones((bs, 4), np.int32)           # unused slots: a 1x1 image
        for j, (img, inf, _) in enumerate(prepped):
            raw[j, :img.shape[0], :img.shape[1]] = img
            sizes[j] = (img.shape[0], img.shape[1], inf[2], inf[3])
        info = self._batch_info(prepped, bucket)
        info_d = self._shard(info)
        out = self._predict(self.variables, self._resize(self._shard(raw), self._shard(sizes), bucket), info_d)
        pasted = None
        if self.paste and 'masks' in out:
            # masks go back onto the canvas of the original images (the upload may be resized)
            raw_hw = tuple(max(resample.raw_canvas(int(inf[0]), int(inf[1]))[k] for _, inf, _ in prepped)
                           for k in (0, 1))
            d = out['masks'].shape[1]
            if bs * d * raw_hw[0] * raw_hw[1] * 4 <= self.max_device_paste_bytes:
                pasted = self._paste(out, info_d, raw_hw, self.mask_threshold)
        out, pasted = jax.device_get((out, pasted))
        results = []
        for j in range(n):
            res, rows = self._postprocess({k: v[j] for k, v in out.items()}, info[j],
                                          paste=self.paste and pasted is None)
            if pasted is not None:
                h0, w0 = int(info[j, 0]), int(info[j, 1])
                # Crop, then select: indexing copies once, into a contiguous array.
                res['masks'] = pasted[j, :, :h0, :w0][rows]
            results.append(res)
        return results

    @staticmethod
    def output_ratios(info: np.ndarray) -> tuple[np.float32, np.float32]:
        """(x, y) scale from the resized image to the original: float32(original) /
        float32(resized) per axis, as torchvision's resize_boxes / resize_keypoints (and the same
        float32 as Detectron2's scale by output / input size)."""
        h0, w0, rh, rw = (int(v) for v in info[:4])
        return np.float32(w0) / np.float32(rw), np.float32(h0) / np.float32(rh)

    def output_boxes(self, boxes: np.ndarray, info: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes [N, 4] on the resized image -> (boxes in original pixels, keep [N] bool).

        torchvision's resize_boxes: ratio = float32(original) / float32(resized), per axis (the
        same float32 as Detectron2's Boxes.scale by output / input size). With
        `conventions.clip_output_boxes` (Detectron2's detector_postprocess) the boxes are then
        clipped to the original image and those left empty (a side <= 0) are dropped."""
        h0, w0 = int(info[0]), int(info[1])
        ratio_w, ratio_h = self.output_ratios(info)
        boxes = (boxes * np.asarray([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)).astype(np.float32)
        keep = np.ones(len(boxes), bool)
        if self.conventions.clip_output_boxes:
            boxes = np.clip(boxes, 0, np.asarray([w0, h0, w0, h0], np.float32))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes, keep

    def postprocess(self, raw: dict[str, np.ndarray], info: np.ndarray,
                    paste: bool | None = None) -> dict[str, np.ndarray]:
        """One image's padded outputs -> its valid instances in original pixels; masks are pasted
        on the host when `paste` (default: the predictor's `paste`)."""
        return self._postprocess(raw, info, paste)[0]

    def _postprocess(self, raw, info, paste=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(postprocess's result, the padded rows it kept, in order)."""
        rows = np.flatnonzero(raw['valid'])
        h0, w0 = int(info[0]), int(info[1])
        boxes, keep = self.output_boxes(raw['boxes'][rows], info)
        rows = rows[keep]
        out = {
            'boxes': boxes[keep],
            'scores': raw['scores'][rows].astype(np.float32),
            'labels': self.label_ids[raw['labels'][rows]],
        }
        if 'keypoints' in raw:
            # torchvision's resize_keypoints / Detectron2's detector_postprocess: x, y scaled by
            # the box ratios; the visibility column (1) is kept
            kps = raw['keypoints'][rows].astype(np.float32)
            kps[..., :2] *= np.asarray(self.output_ratios(info), np.float32)
            out['keypoints'] = kps
            out['keypoints_scores'] = raw['keypoints_scores'][rows].astype(np.float32)
        if 'masks' in raw:
            probs = raw['masks'][rows].astype(np.float32)
            out['mask_probs'] = probs
            if self.paste if paste is None else paste:
                out['masks'] = paste_masks(probs, out['boxes'], (h0, w0), threshold=self.mask_threshold,
                                           rule=self.conventions.mask_paste)
        return out, rows


def config_for_torchvision(model_cfg: ml_collections.ConfigDict, *, score_thresh: float = 0.05,
                           nms_thresh: float = 0.5, detections_per_img: int = 100, min_size: int = 800,
                           max_size: int = 1333, norm_eps: float = 0.0) -> ml_collections.ConfigDict:
    """A full config around a torchvision model section, with its inference settings."""
    cfg = default_config()
    cfg.model = model_cfg
    cfg.model.conventions.name = 'torchvision'
    cfg.model.backbone.norm_eps = norm_eps
    cfg.model.roi.score_thresh = score_thresh
    cfg.model.roi.nms_thresh = nms_thresh
    cfg.model.roi.detections_per_img = detections_per_img
    cfg.data.test_min_size = min_size
    cfg.data.test_max_size = max_size
    cfg.data.min_size = (min_size,)
    cfg.data.max_size = max_size
    return cfg


def torchvision_labels(num_classes: int):
    """torchvision COCO weights predict the COCO category id directly (91 slots, 'N/A' gaps)."""
    from mrcnn_jax.coco_categories import COCO_CATEGORY_NAMES
    ids = list(range(num_classes))
    names = list(COCO_CATEGORY_NAMES) if num_classes == len(COCO_CATEGORY_NAMES) else [str(i) for i in ids]
    return ids, names
