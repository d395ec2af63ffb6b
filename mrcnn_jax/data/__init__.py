"""Input side: COCO-format data → fixed-shape numpy batches (see docs/DESIGN.md, "Data flow").

Modules, in the order data flows through them:
    validation   DataError and the SkipLog that counts (or, with strict=True, refuses) bad input
    images       image files → RGB uint8 / bytes TensorFlow can decode (EXIF, CMYK, 16-bit, ...)
    coco         COCO instances json → validated per-image records; segmentation → masks
    metadata     category mapping and dataset facts that travel with a dataset
    example      one image record as a tf.train.Example (encode without TF, parse with TF)
    tfrecord     sharded, parallel TFRecord writer; random-access reader by record offset
    sources      random-access record sources: COCO json + images, TFRecords
    tfds_adapter tfds 'coco/2017' (boxes only) as a stream of parsed examples
    transforms   per-example TF ops: flip, resize rule, normalize, pad, GT selection and mask crops
    pipeline     build_dataset(): sharding, shuffling, batching, iterator state
    synthetic    a generated shapes dataset in COCO format (demo and tests)
    synthetic_keypoints  generated stick figures in COCO person-keypoint format (keypoint demo)
    ground_truth evaluation images and pycocotools ground truth of a split
    drawing      batch → annotated PNGs (the `data show` command)
    cli          `mrcnn-jax data to-tfrecord | show`

`data/` imports no JAX model code; it imports `jax` only for `jax.process_index()`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types

# Lines TensorFlow's C++ start-up writes to stderr whatever TF_CPP_MIN_LOG_LEVEL says (absl is
# not initialized yet when its libraries load): information, not warnings.
TF_STARTUP_NOISE = (
    'All log messages before absl::InitializeLog() is called are written to STDERR',
    'oneDNN custom operations are on',
)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _filtered_stderr(noise=TF_STARTUP_NOISE):
    """Routes file descriptor 2 (where C++ libraries write) through a pipe for the block and
    passes on, as they arrive, the lines that contain none of `noise`: real warnings and errors
    still show, also when the block aborts the process."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):   # no real stderr (e.g. captured by a test)
        yield
        return
    with _STDERR_LOCK:
        sys.stderr.flush()
        saved = os.dup(fd)
        read_end, write_end = os.pipe()

        def forward():
            with os.fdopen(read_end, 'rb') as pipe:
                for line in pipe:
                    if not any(n.encode() in line for n in noise):
                        os.write(saved, line)
        reader = threading.Thread(target=forward, name='stderr-filter', daemon=True)
        reader.start()
        os.dup2(write_end, fd)
        os.close(write_end)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)          # closes the pipe's last write end: the reader drains and ends
            reader.join()
            os.close(saved)


def tensorflow_on_cpu() -> types.ModuleType:
    """Imports TensorFlow with every GPU hidden from it and returns the module.

    tf.data runs on the host; without this, TensorFlow would reserve accelerator memory on a GPU
    host that JAX needs. Call it before anything else touches TensorFlow devices. In a process that
    also imports torch, import torch first (importing tensorflow first segfaults with triton).
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if 'tensorflow' in sys.modules:
        import tensorflow as tf
    else:
        with _filtered_stderr():
            import tensorflow as tf
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # devices already initialized: someone used TF before us; nothing to do
        pass
    return tf
