"""What evaluation needs from a split: its original images and its COCO ground truth.

    for image_id, image, file_name in eval_images(config, 'val'):   # image: [H, W, 3] uint8 RGB
        ...
    coco_gt = coco_ground_truth(config, 'val')                       # pycocotools COCO
    path = ground_truth_path(config, 'val')                          # '' for tfds

Images are the upright originals (EXIF applied, any mode → RGB), exactly the pixels the training
pipeline decodes before resizing (TFRecords hold already-normalized bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from mrcnn_jax.data import coco, images, sources, synthetic, tfrecord
from mrcnn_jax.data.validation import DataError

log = logging.getLogger(__name__)


def _prefix(split: str) -> str:
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return split


def ground_truth_path(config, split: str = 'val') -> str:
    """The COCO instances json of the split ('' for tfds, whose ground truth is built in memory).

    TFRecords: `<prefix>.annotations.json` written beside them (the images actually converted).
    """
    data, prefix = config.data, _prefix(split)
    if data.source == 'coco_json':
        return data[f'{prefix}_annotations']
    if data.source == 'synthetic':
        return synthetic.ensure_synthetic(config)[prefix][0]
    if data.source == 'tfrecord':
        return tfrecord.open_tfrecords(data[f'{prefix}_tfrecords']).ground_truth_path
    if data.source == 'tfds':
        return ''
    raise ValueError(f'unknown data.source {data.source!r}')


def coco_ground_truth(config, split: str = 'val'):
    """pycocotools.coco.COCO of the split."""
    from pycocotools.coco import COCO
    path = ground_truth_path(config, split)
    if path:
        return COCO(path)
    from mrcnn_jax.data import tfds_adapter
    gt = COCO()
    gt.dataset = tfds_adapter.ground_truth(config.data, split)
    gt.createIndex()
    return gt


def eval_images(config, split: str = 'val', *, process_index: int = 0,
                process_count: int = 1) -> Iterator[tuple[int, np.ndarray, str]]:
    """Yields (image_id, [H, W, 3] uint8 RGB original image, file name) of the split, in dataset
    order; with several processes, process p gets images p, p + P, p + 2P, ... (tfds: its
    even_splits part). Unreadable images are logged and skipped."""
    data, prefix = config.data, _prefix(split)
    if data.source == 'tfds':
        from mrcnn_jax.data import tfds_adapter
        for image_id, encoded, name in tfds_adapter.iterate_images(
                data, split, process_index=process_index, process_count=process_count):
            yield image_id, images.decode_image_bytes(encoded, name), name
        return
    if data.source == 'tfrecord':
        source = sources.TFRecordSource(data[f'{prefix}_tfrecords'])
        from mrcnn_jax.data import example
        for i in range(process_index, len(source), process_count):
            fields = example.read_example_numpy(source.read(i))
            name = fields['image/file_name'][0].decode()
            try:
                pixels = images.decode_image_bytes(fields['image/encoded'][0], name)
            except DataError as e:
                log.warning('skipping %s: %s', name, e)
                continue
            yield int(fields['image/id'][0]), pixels, name
        return
    if data.source == 'synthetic':
        ann, images_dir = synthetic.ensure_synthetic(config)[prefix]
    elif data.source == 'coco_json':
        ann, images_dir = data[f'{prefix}_annotations'], data[f'{prefix}_images']
    else:
        raise ValueError(f'unknown data.source {data.source!r}')
    dataset = coco.load_coco_json(ann)
    for entry in dataset.images[process_index::process_count]:
        path = coco.image_path(images_dir, entry)
        try:
            pixels = images.load_image(path)
        except (DataError, OSError) as e:
            log.warning('skipping image id %d: %s', entry.id, e)
            continue
        yield entry.id, pixels, entry.file_name
