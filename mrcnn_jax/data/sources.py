"""Random-access record sources: record i → serialized example (schema: example.py).

    CocoJsonSource   a COCO json + image folder, encoded on the fly (small datasets, synthetic)
    TFRecordSource   TFRecords written by `tfrecord.convert`, read by offset

Both expose the same table of per-record facts, so the pipeline can filter (negatives, crowd-only)
and permute records without reading them:
    info: [num_records, 8] int64, columns tfrecord.INDEX_COLUMNS (shard/offset/length are -1 for
    json): shard, offset, length, image_id, height, width, num_instances (non-crowd), num_crowd
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from mrcnn_jax.data import coco, example, files, tfrecord
from mrcnn_jax.data import metadata as metadata_lib
from mrcnn_jax.data import validation as val
from mrcnn_jax.data.validation import DataError, SkipLog

log = logging.getLogger(__name__)


class CocoJsonSource:
    """Reads COCO json + images directly; each read decodes the image and its masks.

    Images whose file is missing are dropped up front (counted in `skips`, or DataError when
    strict); images that fail to decode are found when read: `read` raises DataError.
    num_keypoints: the K the config expects, for a json whose categories name no keypoints
    (`coco.load_coco_json`).
    """

    def __init__(self, annotations: str, images_dir: str, *, with_masks: bool | None = None,
                 strict: bool = False, source_name: str = 'coco_json',
                 num_keypoints: int | None = None):
        self.dataset = coco.load_coco_json(annotations, strict=strict, num_keypoints=num_keypoints)
        self.images_dir = images_dir
        self.with_masks = self.dataset.has_segmentation if with_masks is None else with_masks
        self.skips = self.dataset.skips
        entries = []
        for entry in self.dataset.images:
            path = coco.image_path(images_dir, entry)
            if '://' not in path and not files.isfile(path):
                self.skips.skip_image(val.MISSING_IMAGE_FILE,
                                      f'{path}: image id {entry.id}: file not found')
                continue
            entries.append(entry)
        self.entries = entries
        self.read_skips = SkipLog()           # failures found while reading (never strict)
        self._lock = threading.Lock()
        rows = []
        for e in entries:
            anns = self.dataset.annotations[e.id]
            crowd = sum(a.is_crowd for a in anns)
            rows.append((-1, -1, -1, e.id, e.height or -1, e.width or -1, len(anns) - crowd, crowd))
        self.info = np.asarray(rows, np.int64).reshape(-1, len(tfrecord.INDEX_COLUMNS))
        self.metadata = metadata_lib.make_metadata(
            self.dataset.category_ids, self.dataset.category_names, has_masks=self.with_masks,
            keypoint_names=self.dataset.keypoint_names,
            keypoint_skeleton=self.dataset.keypoint_skeleton, num_images=len(entries),
            num_instances=int(self.info[:, 6:8].sum()), source=source_name,
            annotations=annotations, images=images_dir, validation=self.skips.to_dict())
        self.ground_truth_path = annotations
        if self.skips.num_skipped_images or self.skips.num_skipped_instances:
            log.warning('%s: %s', annotations, self.skips.format())

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, i: int) -> bytes:
        entry = self.entries[i]
        skips = SkipLog()
        record = example.coco_image_to_example(
            entry, self.dataset.annotations[entry.id], self.images_dir,
            with_masks=self.with_masks, num_keypoints=len(self.dataset.keypoint_names),
            skips=skips)
        with self._lock:
            self.read_skips.merge(skips)
        if record is None:
            reason, messages = next(iter(skips.examples.items()))
            raise DataError(f'{messages[0]} [{reason}]')
        return record.data

    def file_name(self, i: int) -> str:
        return self.entries[i].file_name


class TFRecordSource:
    """TFRecords written by `tfrecord.convert`, found from a shard file pattern."""

    def __init__(self, pattern: str):
        self.records = tfrecord.open_tfrecords(pattern)
        self.metadata = dict(self.records.metadata)
        self.metadata['source'] = 'tfrecord'
        self.info = self.records.index
        self.ground_truth_path = self.records.ground_truth_path
        self.read_skips = SkipLog()

    def __len__(self) -> int:
        return int(self.info.shape[0])

    def read(self, i: int) -> bytes:
        return tfrecord.read_record(self.records, i)

    def file_name(self, i: int) -> str:
        names = example.read_example_numpy(self.read(i))['image/file_name']
        return names[0].decode() if names else ''
