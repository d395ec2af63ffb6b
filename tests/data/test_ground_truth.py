"""Evaluation images and ground truth of a split, for every source."""

import numpy as np

from mrcnn_jax.data import ground_truth

from .helpers import small_config


def test_eval_images_same_from_json_and_tfrecords(tiny_tfrecords, shared_data):
    d = shared_data / 'coco_train2017_tiny'
    pattern = tiny_tfrecords.shard_paths[0].replace('-00000-of-', '-*-of-')
    records = small_config('tfrecord', val_tfrecords=pattern)
    json_cfg = small_config('coco_json', val_annotations=str(d / 'annotations.json'),
                            val_images=str(d / 'images'))
    from_json = {i: (im, name) for i, im, name in ground_truth.eval_images(json_cfg)}
    from_records = {i: (im, name) for i, im, name in ground_truth.eval_images(records)}
    assert from_json.keys() == from_records.keys() and len(from_json) == 6
    gt = ground_truth.coco_ground_truth(records)
    assert sorted(gt.getImgIds()) == sorted(from_json) and len(gt.getAnnIds()) == 136
    for image_id, (image, name) in from_json.items():
        assert image.dtype == np.uint8 and image.shape == (gt.imgs[image_id]['height'],
                                                           gt.imgs[image_id]['width'], 3)
        np.testing.assert_array_equal(image, from_records[image_id][0])
        assert name == from_records[image_id][1] == gt.imgs[image_id]['file_name']
    part = [i for i, _, _ in ground_truth.eval_images(json_cfg, process_index=1, process_count=2)]
    assert len(part) == 3 and set(part) < from_json.keys()


def test_synthetic_ground_truth(synthetic_config):
    gt = ground_truth.coco_ground_truth(synthetic_config, 'val')
    assert len(gt.getImgIds()) == 5 and sorted(gt.getCatIds()) == [1, 2, 3, 4]
    assert ground_truth.ground_truth_path(synthetic_config, 'val').endswith('annotations_val.json')
