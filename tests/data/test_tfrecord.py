"""TFRecord writer: round trip of the real COCO subset, bad inputs counted or refused, the index."""

import json

import numpy as np
import pytest

from mrcnn_jax.data import example, tfrecord
from mrcnn_jax.data.validation import DataError

from .helpers import make_bad_dataset


def test_tiny_conversion_records_index_metadata(tiny_tfrecords, shared_data):
    r = tiny_tfrecords
    raw = json.load(open(shared_data / 'coco_train2017_tiny' / 'annotations.json'))
    assert r.num_images_written == 6 and r.num_instances_written == 136
    assert r.skips.num_skipped_images == 0 and r.skips.num_skipped_instances == 0
    records = tfrecord.open_tfrecords(r.shard_paths[0].replace('-00000-of-', '-*-of-'))
    assert sorted(records.index[:, 3].tolist()) == sorted(im['id'] for im in raw['images'])
    assert records.index[:, 7].sum() == 1 and records.index[:, 6:8].sum() == 136
    assert records.metadata['category_ids'] == sorted(c['id'] for c in raw['categories'])
    assert sum(s['num_records'] for s in records.metadata['shards']) == 6
    sizes = {im['id']: (im['height'], im['width']) for im in raw['images']}
    for i in range(6):
        fields = example.read_example_numpy(tfrecord.read_record(records, i))
        image_id = int(fields['image/id'][0])
        assert image_id == records.index[i, 3]
        assert (int(fields['image/height'][0]), int(fields['image/width'][0])) == sizes[image_id]
        original = (shared_data / 'coco_train2017_tiny' / 'images' /
                    fields['image/file_name'][0].decode()).read_bytes()
        assert fields['image/encoded'][0] == original        # plain JPEGs keep their bytes
        n = len(fields['objects/category_id'])
        assert len(fields['objects/mask']) == n and fields['objects/bbox'].shape == (4 * n,)
    gt = json.load(open(r.ground_truth_path))
    assert len(gt['images']) == 6 and len(gt['annotations']) == 136


def test_bad_inputs_are_skipped_and_summarized(tmp_path):
    ann, images_dir, expected = make_bad_dataset(tmp_path / 'src')
    r = tfrecord.convert(ann, images_dir, str(tmp_path / 'out'), num_shards=3, num_workers=0,
                         progress=False)
    assert r.num_images_in_json == 10 and r.num_images_written == len(expected['written'])
    assert dict(r.skips.images) == expected['skipped_images']
    assert dict(r.skips.instances) == expected['skipped_instances']
    assert r.skips.notes['box_clipped_to_image'] == 1 and r.skips.notes['image_reencoded'] == 4
    text = r.format()
    assert 'unreadable_image: 2' in text and 'corrupt.jpg' in text and 'missing.jpg' in text
    assert r.metadata['conversion']['skipped_images'] == expected['skipped_images']
    records = tfrecord.open_tfrecords(str(tmp_path / 'out' / 'annotations-*.tfrecord'))
    assert (records.index[:, 4:6] == [60, 80]).all()       # EXIF-rotated image stored upright


def test_strict_conversion_fails_naming_the_file(tmp_path):
    ann, images_dir, _ = make_bad_dataset(tmp_path / 'src')
    data = json.load(open(ann))
    data['images'] = [im for im in data['images'] if im['file_name'] != 'missing.jpg']
    ids = {im['id'] for im in data['images']}
    data['annotations'] = [a for a in data['annotations']                     # json-level ok
                           if a['id'] < 900 and a['image_id'] in ids]
    json.dump(data, open(ann, 'w'))
    with pytest.raises(DataError, match=r'(corrupt|truncated|mismatch)\.jpg.*strict mode'):
        tfrecord.convert(ann, images_dir, str(tmp_path / 'out'), num_workers=0, strict=True,
                         progress=False)
    data['annotations'].append({'id': 5, 'image_id': 1, 'category_id': 42, 'bbox': [1, 1, 2, 2]})
    json.dump(data, open(ann, 'w'))
    with pytest.raises(DataError, match='annotation id 5: category_id 42'):
        tfrecord.convert(ann, images_dir, str(tmp_path / 'out'), num_workers=0, strict=True,
                         progress=False)


def test_open_tfrecords_errors(tmp_path, tiny_tfrecords):
    with pytest.raises(DataError, match='no TFRecord files match'):
        tfrecord.open_tfrecords(str(tmp_path / 'nothing-*.tfrecord'))
    (tmp_path / 'foreign-00000-of-00001.tfrecord').write_bytes(b'')
    with pytest.raises(DataError, match='metadata written by to-tfrecord'):
        tfrecord.open_tfrecords(str(tmp_path / 'foreign-*.tfrecord'))


def test_index_offsets_match_tensorflow_reader(tiny_tfrecords):
    import tensorflow as tf
    records = tfrecord.open_tfrecords(
        tiny_tfrecords.shard_paths[0].replace('-00000-of-', '-*-of-'))
    by_tf = [r.numpy() for r in tf.data.TFRecordDataset(records.shard_paths)]
    ours = [tfrecord.read_record(records, i)
            for i in np.lexsort((records.index[:, 1], records.index[:, 0]))]
    assert by_tf == ours
