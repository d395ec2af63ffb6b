"""COCO json + images → sharded TFRecords, and random access to those records by offset.

`convert()` writes, for `prefix` (default: the annotation file's stem), into `out_dir`:
    <prefix>-00000-of-00008.tfrecord ...  the records (schema: example.py), uncompressed
    <prefix>.metadata.json                category mapping, counts, shards, conversion summary
    <prefix>.index.npy                    [num_records, 8] int64, one row per record:
                                          shard, offset, length, image_id, height, width,
                                          num_instances (non-crowd), num_crowd
    <prefix>.annotations.json             COCO ground truth of the written images (evaluation)

Images are read and encoded by worker processes (`spawn`, so they never inherit TensorFlow); the
parent writes with `tf.io.TFRecordWriter` and records each record's offset, which lets the
pipeline read any record directly (an exact global shuffle per epoch and a resumable position, see
pipeline.py). A TFRecord record is [length u64][crc u32][data][crc u32].
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import re
import time

import numpy as np

from mrcnn_jax.data import coco, example, files
from mrcnn_jax.data import metadata as metadata_lib
from mrcnn_jax.data.validation import DataError, SkipLog

log = logging.getLogger(__name__)

_HEADER_BYTES = 12   # u64 length + u32 masked crc of the length
_FOOTER_BYTES = 4    # u32 masked crc of the data
_SHARD_RE = re.compile(r'^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$')

INDEX_COLUMNS = ('shard', 'offset', 'length', 'image_id', 'height', 'width', 'num_instances',
                 'num_crowd')


def shard_name(prefix: str, index: int, count: int) -> str:
    return f'{prefix}-{index:05d}-of-{count:05d}.tfrecord'


@dataclasses.dataclass
class ConversionResult:
    metadata: dict
    metadata_path: str
    index_path: str
    shard_paths: list[str]
    ground_truth_path: str
    skips: SkipLog
    num_images_in_json: int
    num_images_written: int
    num_instances_written: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_images_in_json / max(self.seconds, 1e-9)

    def format(self) -> str:
        return '\n'.join([
            f'images in json: {self.num_images_in_json}, written: {self.num_images_written}, '
            f'instances written: {self.num_instances_written}',
            self.skips.format(),
            f'{len(self.shard_paths)} shards, metadata {self.metadata_path}',
            f'{self.seconds:.1f} s ({self.images_per_second:.1f} images/s)',
        ])


# Worker state, set once per process by _init_worker (spawned processes import nothing else).
_WORKER: dict = {}


def _init_worker(images_dir: str, with_masks: bool, num_keypoints: int, strict: bool) -> None:
    _WORKER.update(images_dir=images_dir, with_masks=with_masks, num_keypoints=num_keypoints,
                   strict=strict)


def _encode_task(task):
    entry, annotations = task
    skips = SkipLog(strict=_WORKER['strict'])
    record = example.coco_image_to_example(
        entry, annotations, _WORKER['images_dir'], with_masks=_WORKER['with_masks'],
        num_keypoints=_WORKER['num_keypoints'], skips=skips)
    return record, skips


def _ground_truth_json(annotations_path: str, kept_image_ids: set,
                       kept_annotation_ids: set) -> dict:
    raw = json.loads(files.read_bytes(annotations_path).decode('utf-8'))
    return {
        **{k: v for k, v in raw.items() if k not in ('images', 'annotations')},
        'images': [im for im in raw['images'] if im['id'] in kept_image_ids],
        'annotations': [a for a in raw.get('annotations', [])
                        if isinstance(a, dict) and a.get('id') in kept_annotation_ids
                        and a.get('image_id') in kept_image_ids],
    }


def convert(annotations: str, images_dir: str, out_dir: str, *, num_shards: int = 8,
            prefix: str | None = None, strict: bool = False, num_workers: int | None = None,
            with_masks: bool | None = None, write_ground_truth: bool = True,
            progress: bool = True) -> ConversionResult:
    """Converts a COCO instances json and its image folder into sharded TFRecords.

    Args:
        with_masks: store instance masks; None: when the json has segmentations.
        strict: the first skipped image or annotation raises DataError instead of being counted.
        num_workers: encoding processes; None: all cores; 0 or 1: in this process.
    Returns:
        ConversionResult with the summary (also logged).
    """
    from mrcnn_jax.data import tensorflow_on_cpu
    from tqdm import tqdm
    tf = tensorflow_on_cpu()
    start = time.perf_counter()
    dataset = coco.load_coco_json(annotations, strict=strict)
    if with_masks is None:
        with_masks = dataset.has_segmentation
    prefix = prefix or os.path.splitext(os.path.basename(annotations))[0]
    num_shards = max(1, min(num_shards, max(1, len(dataset.images))))
    files.makedirs(out_dir)
    shard_paths = [os.path.join(out_dir, shard_name(prefix, i, num_shards))
                   for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in shard_paths]
    offsets = [0] * num_shards
    shard_counts = [0] * num_shards
    rows = []
    skips = dataset.skips
    tasks = ((entry, dataset.annotations[entry.id]) for entry in dataset.images)
    init_args = (images_dir, with_masks, len(dataset.keypoint_names), strict)
    num_workers = os.cpu_count() if num_workers is None else num_workers
    pool = None
    if num_workers > 1 and len(dataset.images) > 1:
        pool = multiprocessing.get_context('spawn').Pool(num_workers, _init_worker, init_args)
        results = pool.imap(_encode_task, tasks, chunksize=4)
    else:
        _init_worker(*init_args)
        results = map(_encode_task, tasks)
    kept_images, kept_annotations, num_instances = set(), set(), 0
    try:
        for entry, (record, task_skips) in tqdm(zip(dataset.images, results),
                                                total=len(dataset.images), unit='img',
                                                disable=not progress, desc='to-tfrecord'):
            skips.merge(task_skips)
            if record is None:
                continue
            shard = len(rows) % num_shards
            writers[shard].write(record.data)
            rows.append((shard, offsets[shard], len(record.data), record.image_id, record.height,
                         record.width, record.num_instances, record.num_crowd))
            offsets[shard] += _HEADER_BYTES + len(record.data) + _FOOTER_BYTES
            shard_counts[shard] += 1
            kept_images.add(entry.id)
            kept_annotations.update(a.id for a in dataset.annotations[entry.id])
            num_instances += record.num_instances + record.num_crowd
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for w in writers:
            w.close()
    index = np.asarray(rows, np.int64).reshape(-1, len(INDEX_COLUMNS))
    index_path = os.path.join(out_dir, f'{prefix}.index.npy')
    buf = io.BytesIO()
    np.save(buf, index)
    files.write_bytes(index_path, buf.getvalue())
    gt_path = ''
    if write_ground_truth:
        gt_path = os.path.join(out_dir, f'{prefix}.annotations.json')
        gt = _ground_truth_json(annotations, kept_images, kept_annotations)
        files.write_bytes(gt_path, json.dumps(gt).encode('utf-8'))
    meta = metadata_lib.make_metadata(
        dataset.category_ids, dataset.category_names, has_masks=with_masks,
        keypoint_names=dataset.keypoint_names, keypoint_skeleton=dataset.keypoint_skeleton,
        num_images=len(rows), num_instances=num_instances,
        source='tfrecord',
        shards=[{'file': os.path.basename(p), 'num_records': c}
                for p, c in zip(shard_paths, shard_counts)],
        index_file=os.path.basename(index_path),
        ground_truth_file=os.path.basename(gt_path) if gt_path else '',
        annotations_source=annotations if '://' in annotations else os.path.abspath(annotations),
        conversion=skips.to_dict())
    metadata_path = os.path.join(out_dir, f'{prefix}.metadata.json')
    metadata_lib.write_metadata(meta, metadata_path)
    result = ConversionResult(meta, metadata_path, index_path, shard_paths, gt_path, skips,
                              len(dataset.images), len(rows), num_instances,
                              time.perf_counter() - start)
    log.info('TFRecord conversion of %s:\n%s', annotations, result.format())
    return result


# --- reading ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TFRecordSet:
    """The files of one converted dataset, found from a shard file pattern."""
    shard_paths: list[str]      # by shard number
    metadata: dict
    index: np.ndarray           # [num_records, 8] int64, columns INDEX_COLUMNS
    ground_truth_path: str      # '' when not written


def open_tfrecords(pattern: str) -> TFRecordSet:
    """`DIR/PREFIX-*.tfrecord` (any pattern matching one converted dataset's shards) → TFRecordSet.

    Raises DataError when nothing matches or when the sidecar metadata / index is missing
    (records not written by `convert` have no offsets to read them by).
    """
    paths = files.glob(pattern)
    if not paths:
        raise DataError(f'no TFRecord files match {pattern!r}')
    prefixes = set()
    for p in paths:
        m = _SHARD_RE.match(p)
        if not m:
            raise DataError(f'{p}: not named PREFIX-NNNNN-of-NNNNN.tfrecord (written by '
                            '`mrcnn-jax data to-tfrecord`)')
        prefixes.add(m.group('prefix'))
    if len(prefixes) != 1:
        raise DataError(f'{pattern!r} matches shards of several datasets: {sorted(prefixes)}')
    prefix = prefixes.pop()
    metadata_path = prefix + '.metadata.json'
    if not files.exists(metadata_path):
        raise DataError(f'{metadata_path} not found: the metadata written by to-tfrecord must sit '
                        'beside the shards')
    meta = metadata_lib.read_metadata(metadata_path)
    directory = os.path.dirname(prefix)
    shard_paths = [os.path.join(directory, s['file']) for s in meta['shards']]
    missing = sorted(set(shard_paths) - set(paths))
    if missing:
        raise DataError(f'{pattern!r} misses shards listed in {metadata_path}: {missing[:3]}...')
    index_path = os.path.join(directory, meta['index_file'])
    if not files.exists(index_path):
        raise DataError(f'{index_path} not found (record offsets written by to-tfrecord)')
    index = np.load(io.BytesIO(files.read_bytes(index_path)))
    gt = os.path.join(directory, meta['ground_truth_file']) if meta.get('ground_truth_file') else ''
    return TFRecordSet(shard_paths, meta, index, gt)


def read_record(records: TFRecordSet, i: int) -> bytes:
    """Serialized example of record `i` (a row of `records.index`)."""
    shard, offset, length = (int(v) for v in records.index[i, :3])
    return files.read_range(records.shard_paths[shard], offset + _HEADER_BYTES, length)
