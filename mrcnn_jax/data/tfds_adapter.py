"""tfds 'coco/2017' (or any tfds dataset with its features) → a stream of parsed examples.

tfds features used: image (JPEG/PNG), image/id, image/filename, objects/{bbox (normalized
[ymin, xmin, ymax, xmax]), label (ClassLabel), is_crowd, area}. There are no instance masks:
this source feeds box-only (Faster R-CNN) training; the pipeline refuses a mask model on it.

Labels: a ClassLabel with 80 classes is COCO's 80 categories in id order (tfds 'coco/2017'), so
label l ↔ COCO category id COCO_CATEGORIES[l][0]; any other ClassLabel maps label l to id l + 1.
"""

from __future__ import annotations

import logging

import numpy as np

from mrcnn_jax.data import coco
from mrcnn_jax.data import metadata as metadata_lib
from mrcnn_jax.data import tensorflow_on_cpu, transforms

tf = tensorflow_on_cpu()
log = logging.getLogger(__name__)


def _tfds():
    import tensorflow_datasets as tfds
    return tfds


def _split_name(data, split: str) -> str:
    return data.tfds_train_split if split == 'train' else data.tfds_val_split


def _category_ids_and_names(label_feature) -> tuple[list[int], list[str]]:
    names = list(label_feature.names)
    if len(names) == len(coco.COCO_CATEGORIES):
        # tfds' coco/2017 class names are COCO's, in id order ('0'..'79' without metadata files).
        return [c[0] for c in coco.COCO_CATEGORIES], [c[1] for c in coco.COCO_CATEGORIES]
    return list(range(1, len(names) + 1)), names


def load_builder(data):
    tfds = _tfds()
    return tfds.builder(data.tfds_name, data_dir=data.tfds_data_dir or None)


def dataset_metadata(data, split: str) -> dict:
    builder = load_builder(data)
    features = builder.info.features
    ids, names = _category_ids_and_names(features['objects']['label'])
    num_examples = -1
    try:
        num_examples = int(builder.info.splits[_split_name(data, split)].num_examples)
    except Exception:  # splits unknown (e.g. metadata not generated, mocked data)
        pass
    return metadata_lib.make_metadata(ids, names, has_masks=False, num_images=num_examples,
                                      source='tfds', tfds_name=data.tfds_name)


def host_split(data, split: str, process_index: int, process_count: int) -> str:
    name = _split_name(data, split)
    if process_count == 1:
        return name
    return _tfds().even_splits(name, n=process_count)[process_index]


def host_num_examples(data, split: str, process_index: int, process_count: int) -> int | None:
    """Examples of this host's part of the split, None when tfds does not know it."""
    try:
        builder = load_builder(data)
        return int(builder.info.splits[host_split(data, split, process_index,
                                                  process_count)].num_examples)
    except Exception:
        return None


def raw_dataset(data, split: str, *, process_index: int, process_count: int, seed: int,
                shuffle_files: bool):
    """This host's part of the tfds split, images left encoded (decoded later, after any skip)."""
    tfds = _tfds()
    read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=4)
    return tfds.load(data.tfds_name, split=host_split(data, split, process_index, process_count),
                     data_dir=data.tfds_data_dir or None, shuffle_files=shuffle_files,
                     download=False, read_config=read_config,
                     decoders={'image': tfds.decode.SkipDecoding()})


def count_filter(data, train: bool):
    """Predicate on raw tfds examples implementing keep_negatives / skip_crowd_only (train only)."""
    def keep(ex):
        crowd = tf.cast(ex['objects']['is_crowd'], tf.bool)
        n = tf.size(crowd)
        ok = tf.constant(True)
        if train and not data.keep_negatives:
            ok = ok & (n > 0)
        if train and data.skip_crowd_only:
            ok = ok & ((n == 0) | tf.reduce_any(~crowd))
        return ok
    return keep


def to_parsed(ex: dict, category_ids: list[int]) -> dict:
    """Raw tfds example → parsed example dict (example.parse_example's schema, image decoded)."""
    image = ex['image']
    if image.dtype == tf.string:
        image = transforms.decode_image(image)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    objects = ex['objects']
    ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(objects['bbox'], [-1, 4]), axis=1)
    boxes = tf.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)
    table = tf.constant(np.asarray(category_ids, np.int64))
    labels = tf.cast(objects['label'], tf.int64)
    return {
        'image': image,
        'image_id': tf.cast(ex['image/id'], tf.int64),
        'height': tf.cast(tf.shape(image)[0], tf.int64),
        'width': tf.cast(tf.shape(image)[1], tf.int64),
        'boxes': boxes,
        'category_ids': tf.gather(table, labels),
        'is_crowd': tf.cast(objects['is_crowd'], tf.bool),
        'areas': tf.cast(objects['area'], tf.float32),
    }


def iterate_images(data, split: str, *, process_index: int = 0, process_count: int = 1):
    """(image_id, encoded image bytes, file name) of this host's part of the split, in order."""
    ds = raw_dataset(data, split, process_index=process_index, process_count=process_count,
                     seed=0, shuffle_files=False)
    for ex in ds.as_numpy_iterator():
        name = ex.get('image/filename', b'')
        name = name.decode() if isinstance(name, bytes) else str(name)
        yield int(ex['image/id']), ex['image'], name


def ground_truth(data, split: str) -> dict:
    """COCO-format ground truth dict (boxes only) of the split, built by reading it once."""
    ds = raw_dataset(data, split, process_index=0, process_count=1, seed=0, shuffle_files=False)
    meta = dataset_metadata(data, split)
    ids = meta['category_ids']
    images, annotations = [], []
    for ex in ds.as_numpy_iterator():
        encoded = ex['image']
        shape = tf.io.extract_jpeg_shape(encoded).numpy() if encoded[:2] == b'\xff\xd8' else \
            tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False)).numpy()
        h, w = int(shape[0]), int(shape[1])
        image_id = int(ex['image/id'])
        name = ex.get('image/filename', b'')
        images.append({'id': image_id, 'height': h, 'width': w,
                       'file_name': name.decode() if isinstance(name, bytes) else str(name)})
        obj = ex['objects']
        for k in range(len(obj['label'])):
            ymin, xmin, ymax, xmax = (float(v) for v in obj['bbox'][k])
            annotations.append({
                'id': int(obj['id'][k]) if 'id' in obj else len(annotations) + 1,
                'image_id': image_id, 'category_id': ids[int(obj['label'][k])],
                'bbox': [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h],
                'area': float(obj['area'][k]), 'iscrowd': int(obj['is_crowd'][k])})
    return {'images': images, 'annotations': annotations,
            'categories': [{'id': i, 'name': n} for i, n in zip(ids, meta['category_names'])]}
