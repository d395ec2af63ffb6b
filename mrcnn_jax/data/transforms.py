"""Per-example TensorFlow ops: parsed example (variable size) → one fixed-shape batch element.

    decode → keep the N largest instances → horizontal flip → resize (the model conventions' rule,
    fitted into the canvas) → normalize → pad to the canvas at the top-left → GT padded to N,
    masks sampled at M×M cell centres of each box from the full-resolution mask.

The output element (N = max_instances, M = mask_size, K = num_keypoints, H×W = canvas):
    images      [H, W, 3] float32  (pixel * pixel_scale - mean) / std in the conventions' channel
                                   order (model.conventions: pixel format); the
                                   resized image at the top-left, 0 elsewhere (torchvision pads
                                   after normalizing)
    image_info  [6] float32        original_h, original_w, resized_h, resized_w, scale_h, scale_w
                                   (scale = resized / original, per axis)
    image_id    [] int64           -1 for a padding element
    gt_boxes    [N, 4] float32     xyxy in canvas pixels; rows >= the valid count are 0
    gt_classes  [N] int32          1..K (0: padding)
    gt_is_crowd [N] bool
    gt_valid    [N] bool           marks the real rows (crowd instances included)
    gt_masks    [N, M, M] uint8    with masks
    gt_keypoints [N, K, 3] float32 (x, y, v) in canvas pixels, with keypoints
    _num_dropped [] int32          instances beyond N (the pipeline counts and removes this key)

Every random choice comes from a per-element stateless seed, so an element is the same function of
(seed, position) whatever the parallelism, and a resumed pipeline repeats it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mrcnn_jax.data import metadata as metadata_lib
from mrcnn_jax.data import tensorflow_on_cpu

tf = tensorflow_on_cpu()


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
    train: bool                        # random flip and scale choice; eval: min_sizes[-1], no flip
    min_sizes: tuple[int, ...]
    max_size: int
    resize_rule: str                   # 'floor' (torchvision) | 'round' (Detectron2)
    antialias: bool
    flip_prob: float
    channel_order: str                 # 'RGB' | 'BGR'
    pixel_scale: float
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    max_instances: int
    mask_size: int
    with_masks: bool
    num_keypoints: int                 # 0: no keypoints in the output
    keypoint_flip_map: tuple[int, ...]
    class_table: tuple[int, ...]       # category id → class index (0: not a class)
    keypoint_offset: float = 0.0       # added to labelled keypoints' x, y (conventions.keypoint_offset)

    @classmethod
    def from_config(cls, data, metadata: dict, *, conventions, train: bool, with_masks: bool,
                    with_keypoints: bool) -> 'PreprocessOptions':
        """From a config's data section and the model's `Conventions` (resize rule, pixel format)."""
        min_sizes = tuple(int(s) for s in (data.min_size if isinstance(data.min_size, Sequence)
                                           else (data.min_size,)))
        if data.class_index == 'contiguous':
            table = metadata_lib.category_index_table(metadata)
        elif data.class_index == 'category_id':
            # torchvision's COCO models: the label is the category id itself (91-way head).
            ids = metadata['category_ids']
            table = np.zeros(max(ids) + 1, np.int32)
            table[ids] = ids
        else:
            raise ValueError(f"data.class_index must be 'contiguous' or 'category_id', got "
                             f'{data.class_index!r}')
        return cls(
            train=train, min_sizes=min_sizes, max_size=int(data.max_size),
            resize_rule=conventions.resize_rule, antialias=bool(conventions.resize_antialias),
            flip_prob=float(data.flip_prob) if train else 0.0, channel_order=conventions.channel_order,
            pixel_scale=float(conventions.pixel_scale), pixel_mean=tuple(conventions.pixel_mean),
            pixel_std=tuple(conventions.pixel_std), max_instances=int(data.max_instances),
            mask_size=int(data.mask_size), with_masks=with_masks,
            num_keypoints=len(metadata['keypoint_names']) if with_keypoints else 0,
            keypoint_flip_map=tuple(metadata['keypoint_flip_map']) if with_keypoints else (),
            keypoint_offset=float(getattr(conventions, 'keypoint_offset', 0.0)),
            class_table=tuple(int(v) for v in table))


def resized_size(height, width, min_size, max_size: int, canvas_hw, rule: str):
    """Resized (h, w) int32 of a height×width image (scalars, any int/float dtype).

    'floor', torchvision (`GeneralizedRCNNTransform.resize`): scale = min(min_size / short, max_size / long)
    in float64, size = floor(side * scale), as `F.interpolate(scale_factor=scale,
    recompute_scale_factor=True)` computes it. 'round', Detectron2 (`ResizeShortestEdge`): the short side
    becomes min_size, both sides shrink if the long one exceeds max_size, then int(x + 0.5).
    Ours, for static shapes: if the result does not fit the canvas, the scale shrinks further so
    that it does (only when the canvas is smaller than max_size allows; identical otherwise).
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    ch = tf.cast(canvas_hw[0], tf.float64)
    cw = tf.cast(canvas_hw[1], tf.float64)
    size = tf.cast(min_size, tf.float64)
    max_size = tf.constant(float(max_size), tf.float64)
    if rule == 'floor':
        scale = tf.minimum(size / tf.minimum(h, w), max_size / tf.maximum(h, w))
        scale = tf.minimum(scale, tf.minimum(ch / h, cw / w))
        new_h, new_w = tf.floor(h * scale), tf.floor(w * scale)
    elif rule == 'round':
        s = size / tf.minimum(h, w)
        new_h = tf.where(h < w, size, s * h)
        new_w = tf.where(h < w, s * w, size)
        longest = tf.maximum(new_h, new_w)
        shrink = tf.where(longest > max_size, max_size / longest, tf.constant(1.0, tf.float64))
        fit = tf.minimum(tf.constant(1.0, tf.float64),
                         tf.minimum(ch / (new_h * shrink), cw / (new_w * shrink)))
        new_h, new_w = new_h * shrink * fit, new_w * shrink * fit
        new_h, new_w = tf.floor(new_h + 0.5), tf.floor(new_w + 0.5)   # int(x + 0.5)
    else:
        raise ValueError(f"resize_rule must be 'floor' or 'round', got {rule!r}")
    new_h = tf.clip_by_value(new_h, 1.0, ch)
    new_w = tf.clip_by_value(new_w, 1.0, cw)
    return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def select_instances(areas, max_instances: int):
    """Indices [min(n, N)] int32 of the N largest areas, in their original order; and n - N."""
    n = tf.shape(areas)[0]
    k = tf.minimum(n, max_instances)
    _, top = tf.math.top_k(areas, k=k, sorted=False)
    return tf.sort(top), tf.maximum(n - max_instances, 0)


def mask_targets(masks, boxes, mask_size: int):
    """Each mask sampled at the M×M cell centres of its box; bilinear, threshold 0.5.

    masks: [n, H, W] uint8 {0, 1}; boxes: [n, 4] float32 xyxy in the same pixels.
    Returns [n, M, M] uint8: cell (i, j) = mask at
    (x1 + (j + .5)(x2 - x1)/M, y1 + (i + .5)(y2 - y1)/M) in continuous pixel coordinates (pixel
    centres at k + 0.5). Points within half a pixel of the border read the border pixel (the mask
    is padded by one replicated pixel), as RoIAlign clamps.
    """
    n, h, w = tf.shape(masks)[0], tf.shape(masks)[1], tf.shape(masks)[2]
    padded = tf.pad(masks[..., None], [[0, 0], [1, 1], [1, 1], [0, 0]], mode='SYMMETRIC')
    x1, y1, x2, y2 = tf.unstack(boxes, axis=1)
    m = float(mask_size)
    # index coordinates (pixel centres at integers) of the first and last cell centre, +1 for pad
    cx0 = x1 + 0.5 * (x2 - x1) / m + 0.5
    cx1 = x1 + (m - 0.5) * (x2 - x1) / m + 0.5
    cy0 = y1 + 0.5 * (y2 - y1) / m + 0.5
    cy1 = y1 + (m - 0.5) * (y2 - y1) / m + 0.5
    # crop_and_resize samples y1n * (H' - 1) + i * (y2n - y1n) * (H' - 1) / (M - 1), H' = H + 2
    hn = tf.cast(h + 1, tf.float32)
    wn = tf.cast(w + 1, tf.float32)
    norm = tf.stack([cy0 / hn, cx0 / wn, cy1 / hn, cx1 / wn], axis=1)
    crops = tf.image.crop_and_resize(padded, norm, tf.range(n), [mask_size, mask_size],
                                     method='bilinear')
    return tf.cast(crops[..., 0] >= 0.5, tf.uint8)


def flip_boxes(boxes, width):
    """Horizontal flip of xyxy boxes in an image `width` wide (continuous coordinates: x → W-x)."""
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    width = tf.cast(width, boxes.dtype)
    return tf.stack([width - x2, y1, width - x1, y2], axis=-1)


def flip_keypoints(keypoints, width, flip_map: Sequence[int]):
    """[n, K, 3] (x, y, v): x → W - x (torchvision's `_flip_coco_person_keypoints`), then each
    keypoint takes its mirror's slot (left ↔ right)."""
    x, y, v = tf.unstack(keypoints, axis=-1)
    flipped = tf.stack([tf.cast(width, keypoints.dtype) - x, y, v], axis=-1)
    return tf.gather(flipped, list(flip_map), axis=1)


def normalize(image, options: PreprocessOptions):
    """float32 [h, w, 3] RGB in 0..255 → (x * pixel_scale - mean) / std in config channel order."""
    if options.channel_order == 'BGR':
        image = image[..., ::-1]
    elif options.channel_order != 'RGB':
        raise ValueError(f'channel_order must be RGB or BGR, got {options.channel_order!r}')
    mean = tf.constant(options.pixel_mean, tf.float32)
    std = tf.constant(options.pixel_std, tf.float32)
    if abs(options.pixel_scale * 255.0 - 1.0) < 1e-12:
        image = image / 255.0          # torchvision's to_tensor divides (x * (1/255) rounds apart)
    elif options.pixel_scale != 1.0:
        image = image * options.pixel_scale
    return (image - mean) / std


def decode_image(encoded):
    """JPEG/PNG bytes → [h, w, 3] uint8. JPEGs use the accurate integer IDCT (libjpeg's ISLOW),
    as PIL and torchvision do; TensorFlow's default (IFAST) is off by a few levels."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
        lambda: tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False),
                                [None, None, 3]))


def _pad_rows(x, n: int):
    pad = [[0, n - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
    return tf.pad(x, pad)


def _decode_masks(masks_png, height, width):
    """[n] PNG strings → [n, height, width] uint8 (n may be 0: a negative image)."""
    def decode():
        masks = tf.map_fn(lambda s: tf.io.decode_png(s, channels=1)[..., 0], masks_png,
                          fn_output_signature=tf.TensorSpec([None, None], tf.uint8))
        return tf.reshape(masks, [-1, height, width])
    # map_fn cannot stack zero elements of unknown shape
    return tf.cond(tf.size(masks_png) > 0, decode,
                   lambda: tf.zeros([0, height, width], tf.uint8))


def preprocess(parsed: dict, canvas_hw, seed, options: PreprocessOptions) -> dict:
    """Parsed example (example.parse_example's dict; 'image' uint8 [h, w, 3] may replace
    'image_encoded') → batch element (module docstring).

    canvas_hw: [2] int32 canvas (H, W) of this element's batch; seed: [2] int64 stateless seed.
    """
    if 'image' in parsed:   # already decoded (tfds adapter)
        image = parsed['image']
    else:
        image = decode_image(parsed['image_encoded'])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    n_max = options.max_instances

    keep, num_dropped = select_instances(parsed['areas'], n_max)
    boxes = tf.gather(parsed['boxes'], keep)
    table = tf.constant(options.class_table, tf.int32)
    ids = tf.cast(tf.gather(parsed['category_ids'], keep), tf.int32)
    in_table = (ids >= 0) & (ids < len(options.class_table))
    safe_ids = tf.clip_by_value(ids, 0, len(options.class_table) - 1)
    classes = tf.where(in_table, tf.gather(table, safe_ids), 0)
    is_crowd = tf.gather(parsed['is_crowd'], keep)
    valid = classes > 0

    u = tf.random.stateless_uniform([2], seed=seed)
    flip = u[0] < options.flip_prob if options.train else tf.constant(False)
    if options.train and len(options.min_sizes) > 1:
        choice = tf.minimum(tf.cast(u[1] * len(options.min_sizes), tf.int32),
                            len(options.min_sizes) - 1)
        min_size = tf.gather(tf.constant(options.min_sizes, tf.int32), choice)
    else:
        min_size = options.min_sizes[-1]   # torchvision evaluates at min_size[-1]
    new_h, new_w = resized_size(height, width, min_size, options.max_size, canvas_hw,
                                options.resize_rule)

    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    # Bilinear, half-pixel centres, no antialias == F.interpolate(align_corners=False).
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                              method='bilinear', antialias=options.antialias)
    images = tf.image.pad_to_bounding_box(normalize(resized, options), 0, 0, canvas_hw[0],
                                          canvas_hw[1])

    hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    scale_h = tf.cast(new_h, tf.float32) / hf
    scale_w = tf.cast(new_w, tf.float32) / wf
    image_info = tf.stack([hf, wf, tf.cast(new_h, tf.float32), tf.cast(new_w, tf.float32),
                           scale_h, scale_w])
    flipped_boxes = tf.where(flip, flip_boxes(boxes, wf), boxes)
    gt_boxes = flipped_boxes * tf.stack([scale_w, scale_h, scale_w, scale_h])

    out = {
        'images': images,
        'image_info': image_info,
        'image_id': tf.cast(parsed['image_id'], tf.int64),
        'gt_boxes': tf.ensure_shape(_pad_rows(gt_boxes, n_max), [n_max, 4]),
        'gt_classes': tf.ensure_shape(_pad_rows(classes, n_max), [n_max]),
        'gt_is_crowd': tf.ensure_shape(_pad_rows(is_crowd, n_max), [n_max]),
        'gt_valid': tf.ensure_shape(_pad_rows(valid, n_max), [n_max]),
        '_num_dropped': tf.cast(num_dropped, tf.int32),
    }
    if options.with_masks:
        masks = _decode_masks(tf.gather(parsed['masks_png'], keep), height, width)
        # Sampling the unflipped mask with the unflipped box, then reversing the columns, equals
        # sampling the flipped mask with the flipped box: cell j of one is cell M-1-j of the other.
        targets = mask_targets(masks, boxes, options.mask_size)
        targets = tf.cond(flip, lambda: tf.reverse(targets, axis=[2]), lambda: targets)
        out['gt_masks'] = tf.ensure_shape(_pad_rows(targets, n_max),
                                          [n_max, options.mask_size, options.mask_size])
    if options.num_keypoints:
        kps = tf.gather(parsed['keypoints'], keep)
        # Detectron2 shifts COCO's pixel indices to continuous coordinates when it loads them,
        # before flipping (x -> W - x) and resizing: so do we under its conventions
        kps = kps + tf.constant([options.keypoint_offset, options.keypoint_offset, 0.0], kps.dtype)
        kps = tf.where(flip, flip_keypoints(kps, wf, options.keypoint_flip_map), kps)
        visible = kps[..., 2:3] > 0
        kps = tf.where(visible, kps * tf.stack([scale_w, scale_h, 1.0]), 0.0)
        out['gt_keypoints'] = tf.ensure_shape(_pad_rows(kps, n_max),
                                              [n_max, options.num_keypoints, 3])
    return out


def padding_element(canvas_hw, options: PreprocessOptions) -> dict:
    """A blank element (image_id -1, no instances): a zero image, image_info (H, W, H, W, 1, 1)."""
    n_max = options.max_instances
    hf = tf.cast(canvas_hw[0], tf.float32)
    wf = tf.cast(canvas_hw[1], tf.float32)
    out = {
        'images': tf.zeros(tf.stack([canvas_hw[0], canvas_hw[1], 3]), tf.float32),
        'image_info': tf.stack([hf, wf, hf, wf, 1.0, 1.0]),
        'image_id': tf.constant(-1, tf.int64),
        'gt_boxes': tf.zeros([n_max, 4], tf.float32),
        'gt_classes': tf.zeros([n_max], tf.int32),
        'gt_is_crowd': tf.zeros([n_max], tf.bool),
        'gt_valid': tf.zeros([n_max], tf.bool),
        '_num_dropped': tf.constant(0, tf.int32),
    }
    if options.with_masks:
        out['gt_masks'] = tf.zeros([n_max, options.mask_size, options.mask_size], tf.uint8)
    if options.num_keypoints:
        out['gt_keypoints'] = tf.zeros([n_max, options.num_keypoints, 3], tf.float32)
    return out
