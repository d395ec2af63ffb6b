"""One image and its instances as a `tf.train.Example`: the record schema of every source.

Features (n instances, K keypoints; boxes in pixels of the upright original image):
    image/encoded      bytes     JPEG or PNG (see images.encode_for_record)
    image/format       bytes     'jpeg' | 'png'
    image/id           int64     COCO image id
    image/height, image/width  int64
    image/file_name    bytes
    objects/bbox       float     [n * 4] xyxy, clipped to the image
    objects/category_id int64    [n] dataset category id (the metadata maps it to 1..K)
    objects/is_crowd   int64     [n] 0/1
    objects/area       float     [n] annotation area (chooses the kept instances when n > N)
    objects/id         int64     [n] annotation id
    objects/mask       bytes     [n] PNG, 8-bit gray, values {0, 1}, full image size (with masks)
    objects/keypoints  float     [n * K * 3] (x, y, v) (with keypoints)

`encode_example` writes the protobuf wire format directly, so converter processes need no
TensorFlow; `parse_example` reads it with TensorFlow into the *parsed example* dict that
`transforms.preprocess` consumes (the tfds adapter produces the same dict).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mrcnn_jax.data import coco, images
from mrcnn_jax.data import validation as val
from mrcnn_jax.data.validation import SkipLog


# --- protobuf wire format (tf.train.Example) ------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(values) -> bytes:
    return _field(1, b''.join(_field(1, v) for v in values))           # Feature.bytes_list


def _float_feature(values) -> bytes:
    arr = np.asarray(values, '<f4').ravel()
    inner = _field(1, arr.tobytes()) if arr.size else b''                # packed FloatList.value
    return _field(2, inner)                                               # Feature.float_list


def _int64_feature(values) -> bytes:
    arr = np.asarray(values, np.int64).ravel()
    inner = _field(1, b''.join(_varint(int(v)) for v in arr)) if arr.size else b''
    return _field(3, inner)                                               # Feature.int64_list


def _example(features: dict[str, bytes]) -> bytes:
    entries = b''.join(_field(1, _field(1, k.encode()) + _field(2, v))  # map<string, Feature>
                       for k, v in sorted(features.items()))
    return _field(1, entries)                                             # Example.features


def encode_mask_png(mask: np.ndarray) -> bytes:
    """[H, W] uint8 {0, 1} → PNG bytes (8-bit gray; fast zlib level: masks compress well anyway)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, np.uint8), mode='L').save(out, format='PNG',
                                                                          compress_level=1)
    return out.getvalue()


def encode_example(image: images.EncodedImage, image_id: int, file_name: str,
                   instances: coco.Instances) -> bytes:
    """Serialized tf.train.Example bytes (schema in the module docstring)."""
    features = {
        'image/encoded': _bytes_feature([image.data]),
        'image/format': _bytes_feature([image.format.encode()]),
        'image/id': _int64_feature([image_id]),
        'image/height': _int64_feature([image.height]),
        'image/width': _int64_feature([image.width]),
        'image/file_name': _bytes_feature([file_name.encode()]),
        'objects/bbox': _float_feature(instances.boxes),
        'objects/category_id': _int64_feature(instances.category_ids),
        'objects/is_crowd': _int64_feature(instances.is_crowd.astype(np.int64)),
        'objects/area': _float_feature(instances.areas),
        'objects/id': _int64_feature(instances.ids),
    }
    if instances.masks is not None:
        features['objects/mask'] = _bytes_feature([encode_mask_png(m) for m in instances.masks])
    if instances.keypoints is not None:
        features['objects/keypoints'] = _float_feature(instances.keypoints)
    return _example(features)


@dataclasses.dataclass(frozen=True)
class EncodedRecord:
    data: bytes            # serialized tf.train.Example
    image_id: int
    height: int
    width: int
    num_instances: int     # non-crowd
    num_crowd: int


def coco_image_to_example(entry: coco.ImageEntry, annotations: Sequence[coco.Annotation],
                          images_dir: str, *, with_masks: bool, num_keypoints: int,
                          skips: SkipLog) -> EncodedRecord | None:
    """Reads one image of a COCO dataset and its annotations → an encoded record, or None.

    None: the image was skipped (missing, unreadable, size mismatch), counted in `skips` (which
    raises instead when strict).
    """
    path = coco.image_path(images_dir, entry)
    try:
        image = images.encode_for_record(path)
    except FileNotFoundError:
        skips.skip_image(val.MISSING_IMAGE_FILE, f'{path}: image id {entry.id}: file not found')
        return None
    except images.ImageDecodeError as e:
        skips.skip_image(val.UNREADABLE_IMAGE, f'image id {entry.id}: {e}')
        return None
    except Exception as e:  # a mode conversion PIL cannot do, an I/O error: still one image
        skips.skip_image(val.UNREADABLE_IMAGE,
                         f'{path}: image id {entry.id}: {type(e).__name__}: {e}')
        return None
    if image.reencoded:
        skips.note('image_reencoded')
    if entry.height is not None and (entry.height, entry.width) != (image.height, image.width):
        skips.skip_image(val.SIZE_MISMATCH,
                         f'{path}: image id {entry.id}: json says {entry.height}x{entry.width} '
                         f'(h x w), the image (after EXIF orientation) is {image.height}x'
                         f'{image.width}')
        return None
    instances = coco.build_instances(annotations, image.height, image.width,
                                     with_masks=with_masks, num_keypoints=num_keypoints,
                                     skips=skips, file_name=path)
    num_crowd = int(instances.is_crowd.sum())
    return EncodedRecord(encode_example(image, entry.id, entry.file_name, instances), entry.id,
                         image.height, image.width, len(instances) - num_crowd, num_crowd)


# --- parsing (TensorFlow) ---------------------------------------------------------------------

def parse_example(serialized, *, with_masks: bool, num_keypoints: int) -> dict:
    """Serialized example (scalar tf.string) → parsed example dict of tensors:

        image_encoded  [] string       image_id [] int64       height, width [] int64
        boxes [n, 4] float32 xyxy      category_ids [n] int64   is_crowd [n] bool
        areas [n] float32              masks_png [n] string (with_masks)
        keypoints [n, K, 3] float32 (num_keypoints > 0)
    """
    import tensorflow as tf  # traced inside tf.data maps; the pipeline set TF up already
    seq = lambda dtype: tf.io.FixedLenSequenceFeature([], dtype, allow_missing=True)  # noqa: E731
    spec = {
        'image/encoded': tf.io.FixedLenFeature([], tf.string),
        'image/id': tf.io.FixedLenFeature([], tf.int64),
        'image/height': tf.io.FixedLenFeature([], tf.int64),
        'image/width': tf.io.FixedLenFeature([], tf.int64),
        'objects/bbox': seq(tf.float32),
        'objects/category_id': seq(tf.int64),
        'objects/is_crowd': seq(tf.int64),
        'objects/area': seq(tf.float32),
    }
    if with_masks:
        spec['objects/mask'] = seq(tf.string)
    if num_keypoints:
        spec['objects/keypoints'] = seq(tf.float32)
    f = tf.io.parse_single_example(serialized, spec)
    out = {
        'image_encoded': f['image/encoded'],
        'image_id': f['image/id'],
        'height': f['image/height'],
        'width': f['image/width'],
        'boxes': tf.reshape(f['objects/bbox'], [-1, 4]),
        'category_ids': f['objects/category_id'],
        'is_crowd': f['objects/is_crowd'] > 0,
        'areas': f['objects/area'],
    }
    if with_masks:
        out['masks_png'] = f['objects/mask']
    if num_keypoints:
        out['keypoints'] = tf.reshape(f['objects/keypoints'], [-1, num_keypoints, 3])
    return out


def read_example_numpy(serialized: bytes) -> dict:
    """Serialized example → numpy dict, without the image decoded (for tools and tests)."""
    from mrcnn_jax.data import tensorflow_on_cpu
    tf = tensorflow_on_cpu()
    ex = tf.train.Example.FromString(serialized)
    out = {}
    for key, feature in ex.features.feature.items():
        kind = feature.WhichOneof('kind')
        values = getattr(feature, kind).value
        out[key] = list(values) if kind == 'bytes_list' else np.asarray(values)
    return out

