"""Fixtures for the input-pipeline tests: a small synthetic dataset and TFRecords of the
real-photo sets (session-scoped: generated / converted once)."""

from __future__ import annotations

import os

import pytest

from .helpers import small_config

_DATA_TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    # pycocotools 2.0.x under numpy 2 warns once per decoded mask: hundreds of identical lines.
    quiet = pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
    for item in items:
        if str(item.path).startswith(_DATA_TESTS):
            item.add_marker(quiet)


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory) -> str:
    """A 128-px synthetic dataset: 12 train, 5 val images."""
    from mrcnn_jax.data import synthetic
    root = str(tmp_path_factory.mktemp('synthetic'))
    c = small_config()
    c.data.synthetic_dir = root
    c.data.synthetic_num_train = 12
    c.data.synthetic_num_val = 5
    c.data.synthetic_image_size = 128
    synthetic.ensure_synthetic(c)
    return root


@pytest.fixture()
def synthetic_config(synthetic_root):
    c = small_config('synthetic', canvas=(128, 128))
    c.data.synthetic_dir = synthetic_root
    c.data.synthetic_num_train = 12
    c.data.synthetic_num_val = 5
    c.data.synthetic_image_size = 128
    return c


@pytest.fixture(scope='session')
def tiny_tfrecords(shared_data, tmp_path_factory):
    """coco_train2017_tiny (6 images, polygons + 1 crowd RLE) as TFRecords."""
    from mrcnn_jax.data import tfrecord
    d = shared_data / 'coco_train2017_tiny'
    out = tmp_path_factory.mktemp('tiny_tfrecords')
    return tfrecord.convert(str(d / 'annotations.json'), str(d / 'images'), str(out),
                            num_shards=2, prefix='tiny', num_workers=0, progress=False)


@pytest.fixture(scope='session')
def coco128_tfrecords(shared_data, tmp_path_factory):
    """coco128_seg (128 images, 2 negatives) as TFRecords."""
    from mrcnn_jax.data import tfrecord
    d = shared_data / 'coco128_seg'
    out = tmp_path_factory.mktemp('coco128_tfrecords')
    return tfrecord.convert(str(d / 'annotations.json'), str(d / 'images'), str(out),
                            num_shards=4, prefix='coco128', num_workers=0, progress=False)
