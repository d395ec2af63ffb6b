"""build_dataset(): per-host fixed-shape numpy batches from any source, with a resumable position.

    ds = build_dataset(config, 'train', process_index=0, process_count=1, seed=0)
    batch = next(ds)                        # dict of numpy arrays (transforms.py lists them)
    state = ds.get_state()                  # small JSON-able dict; store it in the checkpoint
    ds.set_state(state)                     # the next batch is the one after `state`
    ds.metadata['category_ids']             # contiguous class i (1..K) <-> category_ids[i - 1]

Order of examples, random-access sources ('coco_json', 'synthetic', 'tfrecord'):
    A global stream of positions g = 0, 1, 2, ... defined independently of the number of hosts.
    train: epoch e = g // N, example = perm_e[g % N], perm_e a full random permutation of the N
           records (`tf.random.experimental.index_shuffle` keyed by (seed, e)); repeats forever.
    val:   example g for g < N, then padding elements (image_id -1) until the last global batch
           is full; one pass, ceil(N / global_batch) batches on every host.
    Global batch s holds positions [s * GB, (s + 1) * GB); host p takes its slice
    [s * GB + p * B, s * GB + (p + 1) * B). Each host reads only its own records, every host
    produces the same number of batches, and the state is just the step: resuming reproduces the
    same batches, even with another number of hosts (same global batch).
Order, 'tfds': each host reads its `tfds.even_splits` part, files and a `data.shuffle_buffer`
    buffer shuffled with the seed; resuming skips the records already consumed (reads, does not
    decode them); exact for the same number of hosts.

Canvas buckets (`data.buckets`): batch s uses bucket `draw(seed, s)`, a stateless random choice
    weighted by `data.bucket_weights` (uniform when empty): every host computes the same bucket
    without communication. Every image of the batch is resized to fit that canvas (the resize
    rule's scale, shrunk further if the image would not fit).

Randomness per element (flip, multi-scale choice) comes from a stateless seed of (seed, position),
    independent of parallelism. With `data.deterministic` (the default) the training element order
    is exact too, so the same config and seed give the same batches in every run and after a
    resume; it costs ~1% of input throughput on 2 cores (`scripts/benchmark_input.py
    --compare-order`). With False tf.data hands out elements as they finish (neighbours within the
    parallel-map window swap, also across batches): two runs of one seed then train on other
    batches and diverge. 'val' is always ordered.

Bad records: a record that fails to read or decode in Python is replaced (train: by another
    record, deterministically; val: by a padding element) and counted in `stats`; TensorFlow
    errors in a training element drop the element (logged) instead of ending the epoch. Such a
    drop shifts this host's later elements by one; the saved position (the step) does not count
    it, so a run resumed after one sees the unshifted elements.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import weakref
from collections.abc import Sequence

import numpy as np

from mrcnn_jax.data import example, sources, synthetic, tensorflow_on_cpu, tfds_adapter, transforms
from mrcnn_jax.data.validation import DataError
from mrcnn_jax.models.conventions import Conventions   # pure Python: the model's input format

tf = tensorflow_on_cpu()
log = logging.getLogger(__name__)

_MAX_READ_ATTEMPTS = 8
_STATE_VERSION = 1
_LIVE: 'weakref.WeakSet[InputPipeline]' = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # tf.data keeps prefetching on background threads; a py_function reader called while the
    # interpreter shuts down fails noisily. Stop every iterator before that.
    for ds in list(_LIVE):
        ds.close()


def _derive_keys(seed: int, *extra: int) -> list[int]:
    """Three independent int64 keys (shuffle, augmentation, bucket) from a seed."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *extra]).generate_state(3, np.uint32)
    return [int(v) for v in state]


def _canvases(data) -> np.ndarray:
    buckets = [tuple(b) for b in data.buckets] if len(data.buckets) else [tuple(data.canvas)]
    canvases = np.asarray(buckets, np.int32).reshape(-1, 2)
    if (canvases <= 0).any():
        raise ValueError(f'canvas sizes must be positive, got {canvases.tolist()}')
    return canvases


def _bucket_cdf(data, num_buckets: int) -> np.ndarray:
    weights = np.asarray(data.bucket_weights if len(data.bucket_weights) else [1.0] * num_buckets,
                         np.float64)
    if weights.shape != (num_buckets,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f'data.bucket_weights {list(data.bucket_weights)} must be one '
                         f'non-negative weight per bucket ({num_buckets})')
    cdf = np.cumsum(weights) / weights.sum()
    cdf[-1] = 1.0
    return cdf.astype(np.float32)


def _make_source(config, split: str):
    """The random-access source of a split, or None for tfds."""
    data = config.data
    prefix = 'train' if split == 'train' else 'val'
    with_masks = None if config.model.mask_on else False
    num_keypoints = int(data.num_keypoints) if data.keypoints else None
    if data.source == 'coco_json':
        ann, img = data[f'{prefix}_annotations'], data[f'{prefix}_images']
        if not ann or not img:
            raise ValueError(f"data.source='coco_json' needs data.{prefix}_annotations and "
                             f'data.{prefix}_images')
        return sources.CocoJsonSource(ann, img, with_masks=with_masks, strict=data.strict,
                                      num_keypoints=num_keypoints)
    if data.source == 'synthetic':
        ann, img = synthetic.ensure_synthetic(config)[prefix]
        return sources.CocoJsonSource(ann, img, with_masks=with_masks, strict=True,
                                      source_name='synthetic', num_keypoints=num_keypoints)
    if data.source == 'tfrecord':
        pattern = data[f'{prefix}_tfrecords']
        if not pattern:
            raise ValueError(f"data.source='tfrecord' needs data.{prefix}_tfrecords "
                             '(a file pattern)')
        return sources.TFRecordSource(pattern)
    if data.source == 'tfds':
        return None
    raise ValueError(f"data.source must be 'coco_json', 'tfrecord', 'tfds' or 'synthetic', got "
                     f'{data.source!r}')


def _check_config(config, metadata: dict) -> None:
    data, model = config.data, config.model
    source = data.source + (f' {data.tfds_name!r}' if data.source == 'tfds' else '')
    if model.mask_on and not metadata['has_masks']:
        raise ValueError(
            f'model.mask_on=True but the {source} source has no instance masks'
            + (' (tfds coco/2017 has boxes only)' if data.source == 'tfds' else '')
            + ': set model.mask_on=False for box-only (Faster R-CNN) training, or use COCO json / '
            'TFRecords with segmentations')
    if model.get('keypoint_on', False):
        if not data.keypoints:
            raise ValueError('model.keypoint_on=True learns from keypoints: set data.keypoints=True '
                             f'(and data.num_keypoints={model.num_keypoints})')
        if data.num_keypoints != model.num_keypoints:
            raise ValueError(f'data.num_keypoints={data.num_keypoints} but model.num_keypoints='
                             f'{model.num_keypoints}: the keypoint head predicts one heatmap per '
                             'keypoint of the dataset')
    if data.keypoints:
        k = len(metadata['keypoint_names'])
        if not k:
            raise ValueError(f'data.keypoints=True but the {source} source has no keypoints'
                             + (" (data.synthetic_task='keypoints' generates a dataset with "
                                'keypoints)' if data.source == 'synthetic' else ''))
        if k != data.num_keypoints:
            raise ValueError(f'data.num_keypoints={data.num_keypoints} but the dataset has {k} '
                             f"keypoints: {metadata['keypoint_names']}")
    if data.class_index == 'contiguous':
        k = metadata['num_classes']
    else:
        k = max(metadata['category_ids'])
    if model.num_classes < k + 1:
        raise ValueError(f'model.num_classes={model.num_classes} but the dataset needs {k + 1} '
                         f"(K={k} classes + background, data.class_index={data.class_index!r})")
    if model.num_classes > k + 1:
        log.warning('model.num_classes=%d > %d (dataset classes + background): unused classes',
                    model.num_classes, k + 1)


class InputPipeline:
    """An iterator over this host's batches (dicts of numpy arrays) with a resumable position.

    Attributes:
        metadata: dict (metadata.py): category mapping, has_masks, keypoint names, counts.
        batch_size: per-host batch B; global_batch_size: B * process_count.
        num_batches: batches in one pass of a 'val' split (None for repeating 'train').
        steps_per_epoch: ceil(N / global batch) for random-access sources, else None.
        stats: counters of instances dropped (> max_instances) and records that failed to read.
    """

    def __init__(self, config, split: str, *, process_index: int, process_count: int, seed: int,
                 global_batch_size: int, shuffle: bool, repeat: bool):
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if global_batch_size % process_count:
            raise ValueError(f'global batch {global_batch_size} is not divisible by '
                             f'{process_count} processes')
        self.config = config
        self.split = split
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // self.process_count
        self.shuffle = shuffle
        self.repeat = repeat
        data = config.data
        self._train = split == 'train'
        self._source = _make_source(config, split)
        if self._source is not None:
            self.metadata = dict(self._source.metadata)
        else:
            self.metadata = tfds_adapter.dataset_metadata(data, split)
        _check_config(config, self.metadata)
        self._canvases = _canvases(data)
        self._cdf = _bucket_cdf(data, len(self._canvases))
        self._check_canvas(data, config.model)
        self._options = transforms.PreprocessOptions.from_config(
            data, self.metadata, conventions=Conventions.from_config(config.model.conventions),
            train=self._train, with_masks=bool(config.model.mask_on),
            with_keypoints=bool(data.keypoints))
        self._keys = _derive_keys(self.seed)
        self.stats = {'instances_dropped': 0, 'images_with_dropped_instances': 0,
                      'read_failures': 0}
        self._failed_records: set[int] = set()
        self.num_batches = None
        self.steps_per_epoch = None
        if self._source is not None:
            self._eligible = self._eligible_records(data)
            n = len(self._eligible)
            if n == 0:
                raise DataError(f'{data.source} {split}: no usable images')
            self.steps_per_epoch = math.ceil(n / self.global_batch_size)
            if not repeat:
                self.num_batches = self.steps_per_epoch
        else:
            self._tfds_total = None
            if not repeat:
                total = self._tfds_count()
                self._tfds_total = total
                self.num_batches = math.ceil(math.ceil(total / self.process_count)
                                             / self.batch_size)
        self._step = 0
        self._iterator = None
        self._finished = False
        _LIVE.add(self)

    # --- construction helpers -----------------------------------------------------------

    def _check_canvas(self, data, model) -> None:
        div = int(getattr(model, 'size_divisible', 1) or 1)
        for h, w in self._canvases.tolist():
            if h % div or w % div:
                log.warning('canvas %dx%d is not a multiple of model.size_divisible=%d', h, w, div)
        min_sizes = data.min_size if isinstance(data.min_size, Sequence) else (data.min_size,)
        smallest = int(self._canvases.min())
        if max(min_sizes) > smallest or data.max_size > int(self._canvases.max()):
            log.info('canvas %s is smaller than min_size %s / max_size %d allow: images that do '
                     'not fit are shrunk to fit', self._canvases.tolist(), list(min_sizes),
                     data.max_size)

    def _eligible_records(self, data) -> np.ndarray:
        info = self._source.info
        keep = np.ones(len(info), bool)
        if self._train and not data.keep_negatives:
            keep &= info[:, 6] + info[:, 7] > 0
        if self._train and data.skip_crowd_only:
            keep &= ~((info[:, 6] == 0) & (info[:, 7] > 0))
        return np.nonzero(keep)[0].astype(np.int64)

    def _tfds_count(self) -> int:
        data = self.config.data
        total = self.metadata.get('num_images', -1)
        if total is None or total < 0:
            raw = tfds_adapter.raw_dataset(data, self.split, process_index=0, process_count=1,
                                           seed=0, shuffle_files=False)
            raw = raw.filter(tfds_adapter.count_filter(data, self._train))
            total = int(raw.reduce(np.int64(0), lambda n, _: n + 1).numpy())
        return int(total)

    # --- the tf.data graph --------------------------------------------------------------

    def _canvas_for_step(self, step):
        canvases = tf.constant(self._canvases)
        if len(self._canvases) == 1:
            return canvases[0]
        u = tf.random.stateless_uniform([1], seed=tf.stack([tf.constant(self._keys[2], tf.int64),
                                                            tf.cast(step, tf.int64)]))
        idx = tf.searchsorted(tf.constant(self._cdf), u, side='right')[0]
        return tf.gather(canvases, tf.minimum(idx, len(self._canvases) - 1))

    def _read_record(self, record) -> bytes:
        """py_function body: record index → serialized example; b'' → padding element."""
        i = int(record)
        if i < 0:
            return b''
        for attempt in range(_MAX_READ_ATTEMPTS):
            try:
                return self._source.read(i)
            except (DataError, OSError, ValueError) as e:
                self.stats['read_failures'] += 1
                if i not in self._failed_records:
                    self._failed_records.add(i)
                    log.warning('record %d of the %s split cannot be used, %s: %s', i, self.split,
                                'replaced by another record' if self._train else
                                'replaced by a padding element (image_id -1)', e)
                if not self._train:
                    return b''
                i = int(self._eligible[(i * 7919 + attempt + 1) % len(self._eligible)])
        return b''

    def _static_shapes(self, ds):
        if len(self._canvases) != 1:
            return ds
        h, w = (int(v) for v in self._canvases[0])

        def fix(el):
            return {**el, 'images': tf.ensure_shape(el['images'], [h, w, 3])}
        return ds.map(fix)

    def _element_fn(self, parse: bool):
        options = self._options
        num_keypoints = options.num_keypoints
        with_masks = options.with_masks

        def to_element(data, step, position, seed_key):
            canvas = self._canvas_for_step(step)
            seed = tf.stack([tf.constant(seed_key, tf.int64), tf.cast(position, tf.int64)])

            def real():
                parsed = example.parse_example(data, with_masks=with_masks,
                                               num_keypoints=num_keypoints) if parse else data
                return transforms.preprocess(parsed, canvas, seed, options)

            is_real = tf.strings.length(data) > 0 if parse else data['image_id'] >= 0
            return tf.cond(is_real, real, lambda: transforms.padding_element(canvas, options))
        return to_element

    def _random_access_dataset(self, start_step: int):
        b, gb, p = self.batch_size, self.global_batch_size, self.process_index
        n = len(self._eligible)
        eligible = tf.constant(self._eligible)
        shuffle_key = tf.constant(self._keys[0], tf.int64)
        end = np.iinfo(np.int64).max if self.repeat else self.num_batches * b
        ds = tf.data.Dataset.range(start_step * b, end)
        shuffle = self.shuffle

        def locate(k):
            step, j = k // b, k % b
            g = step * gb + p * b + j
            if shuffle:   # epoch g // n: a full permutation of the n records
                index = tf.random.experimental.index_shuffle(
                    g % n, seed=tf.stack([shuffle_key, g // n]), max_index=n - 1)
            else:
                index = g % n
            record = tf.gather(eligible, index)
            if not self.repeat:   # one pass: positions past the end are padding
                record = tf.where(g < n, record, tf.constant(-1, tf.int64))
            return step, g, record

        def read(step, g, record):
            data = tf.py_function(self._read_record, [record], tf.string)
            data.set_shape([])
            return data, step, g

        to_element = self._element_fn(parse=True)
        npc = self._parallel_calls()
        ds = ds.map(locate)
        ds = ds.map(read, num_parallel_calls=npc)
        ds = ds.map(lambda data, step, g: to_element(data, step, g, self._keys[1]),
                    num_parallel_calls=npc)
        return ds

    def _tfds_dataset(self, start_step: int):
        data = self.config.data
        b = self.batch_size
        raw = tfds_adapter.raw_dataset(data, self.split, process_index=self.process_index,
                                       process_count=self.process_count, seed=self._keys[0],
                                       shuffle_files=self.shuffle)
        raw = raw.filter(tfds_adapter.count_filter(data, self._train))
        if self.shuffle:
            raw = raw.shuffle(int(data.shuffle_buffer), seed=self._keys[0],
                              reshuffle_each_iteration=True)
        if self.repeat:
            raw = raw.repeat()
        start = start_step * b
        raw = raw.skip(start)     # before decoding: resuming reads but does not decode
        ids = self.metadata['category_ids']
        parsed = raw.map(lambda ex: tfds_adapter.to_parsed(ex, ids),
                         num_parallel_calls=self._parallel_calls())
        seed_key = _derive_keys(self.seed, self.process_index + 1)[1]
        if not self.repeat:
            template = {k: v for k, v in parsed.element_spec.items()}
            pad = tf.data.Dataset.range(1).map(
                lambda _: {k: tf.zeros([d if d is not None else 0 for d in s.shape], s.dtype)
                           if k != 'image_id' else tf.constant(-1, tf.int64)
                           for k, s in template.items()}).repeat()
            parsed = parsed.concatenate(pad).take(max(self.num_batches * b - start, 0))
        ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, np.iinfo(np.int64).max), parsed)
        to_element = self._element_fn(parse=False)
        return ds.map(lambda k, ex: to_element(ex, k // b, k, seed_key),
                      num_parallel_calls=self._parallel_calls())

    def _parallel_calls(self) -> int:
        n = int(getattr(self.config.data, 'num_parallel_calls', -1))
        return tf.data.AUTOTUNE if n <= 0 else n

    def tf_dataset(self, start_step: int = 0):
        """The batched tf.data.Dataset from a step (tensors, with the private '_num_dropped')."""
        data = self.config.data
        if self._source is not None:
            ds = self._random_access_dataset(start_step)
        else:
            ds = self._tfds_dataset(start_step)
        if self._train:
            ds = ds.ignore_errors(log_warning=True)
        ds = self._static_shapes(ds)
        ds = ds.batch(self.batch_size, drop_remainder=True)
        prefetch = int(getattr(data, 'prefetch_batches', -1))
        ds = ds.prefetch(tf.data.AUTOTUNE if prefetch < 0 else prefetch)
        options = tf.data.Options()
        # A 'val' pass keeps its order always (cheap, and evaluation output is then reproducible).
        options.deterministic = bool(data.deterministic) or not self._train
        options.experimental_optimization.map_parallelization = True
        return ds.with_options(options)

    # --- iteration and state --------------------------------------------------------------

    def __iter__(self) -> 'InputPipeline':
        if self._finished:                    # a completed one-pass ('val') run starts over
            self._step, self._iterator, self._finished = 0, None, False
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.tf_dataset(self._step))
        try:
            batch = next(self._iterator)
        except StopIteration:                 # end of a 'val' pass
            self._finished = True
            raise
        out = {k: v.numpy() for k, v in batch.items()}
        dropped = out.pop('_num_dropped')
        if dropped.any():
            first = self.stats['instances_dropped'] == 0
            self.stats['instances_dropped'] += int(dropped.sum())
            self.stats['images_with_dropped_instances'] += int((dropped > 0).sum())
            ids = out['image_id'][dropped > 0].tolist()
            (log.warning if first else log.info)(
                'more than data.max_instances=%d instances: kept the largest, dropped %s in images '
                '%s (%d dropped so far)', self._options.max_instances,
                dropped[dropped > 0].tolist(), ids, self.stats['instances_dropped'])
        self._step += 1
        return out

    def close(self) -> None:
        """Stops the background tf.data work (also at exit); iterating again restarts it."""
        self._iterator = None

    def __enter__(self) -> 'InputPipeline':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def step(self) -> int:
        """Batches handed out so far (the position `get_state` saves)."""
        return self._step

    def get_state(self) -> dict:
        """The position as a small JSON-able dict (store it with the model checkpoint)."""
        return {'version': _STATE_VERSION, 'step': self._step, 'split': self.split,
                'seed': self.seed, 'global_batch_size': self.global_batch_size,
                'process_index': self.process_index, 'process_count': self.process_count,
                'source': self.config.data.source, 'num_records': self._num_records()}

    def set_state(self, state: dict) -> None:
        """Continues after the batch where `state` was taken (rebuilds the tf.data iterator)."""
        for key in ('split', 'seed', 'global_batch_size', 'source', 'num_records'):
            mine = self.get_state()[key]
            if state.get(key) != mine:
                raise ValueError(f'iterator state has {key}={state.get(key)!r}, this pipeline '
                                 f'{mine!r}: it would not resume at the same example')
        if self._source is None and state.get('process_count') != self.process_count:
            log.warning('tfds pipeline resumed with %d processes instead of %s: each host '
                        'reads another part of the split, positions are approximate',
                        self.process_count, state.get('process_count'))
        self._step = int(state['step'])
        self._iterator = None
        self._finished = False

    def save(self, path: str) -> None:
        """Writes `get_state()` as JSON to `path` (one file per host: put the host in the name)."""
        from mrcnn_jax.data import files
        files.write_bytes(path, json.dumps(self.get_state()).encode())

    def restore(self, path: str) -> None:
        from mrcnn_jax.data import files
        self.set_state(json.loads(files.read_bytes(path).decode()))

    def _num_records(self) -> int:
        return len(self._eligible) if self._source is not None else int(self._tfds_total or -1)

    def batch_spec(self) -> dict:
        """{name: (shape, numpy dtype)} of a batch; H and W are None with several buckets."""
        spec = self.tf_dataset(0).element_spec
        return {k: (tuple(s.shape), s.dtype.as_numpy_dtype) for k, s in spec.items()
                if not k.startswith('_')}

    @property
    def source(self):
        """The random-access source (sources.py), None for tfds."""
        return self._source


def build_dataset(config, split: str = 'train', *, process_index: int | None = None,
                  process_count: int | None = None, seed: int | None = None,
                  batch_size: int | None = None, shuffle: bool | None = None,
                  repeat: bool | None = None) -> InputPipeline:
    """This host's input pipeline for a split (module docstring).

    Args:
        config: the full ConfigDict (reads `data`, `model.mask_on`, `model.num_classes`,
            `train.batch_size` / `eval.batch_size`).
        split: 'train' (shuffled, flipped, multi-scale, repeating) or 'val' (one ordered pass,
            min_size[-1], no flip, padded to full batches).
        process_index, process_count: this host and the number of hosts (default: from jax).
        seed: default `config.seed`.
        batch_size: the global batch (default: train.batch_size or eval.batch_size); each host
            gets batch_size // process_count.
        shuffle, repeat: default True for 'train', False for 'val'.
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    train = split == 'train'
    if batch_size is None:
        batch_size = config.train.batch_size if train else config.eval.batch_size
    return InputPipeline(config, split, process_index=process_index, process_count=process_count,
                         seed=config.seed if seed is None else seed,
                         global_batch_size=int(batch_size),
                         shuffle=train if shuffle is None else shuffle,
                         repeat=train if repeat is None else repeat)
