"""Category mapping and keypoint flip map."""

import numpy as np

from mrcnn_jax.data import coco, metadata


def test_category_mapping_sorted_by_id_and_back():
    meta = metadata.make_metadata([90, 1, 13], ['toothbrush', 'person', 'stop sign'],
                                  has_masks=True)
    assert meta['category_ids'] == [1, 13, 90]
    assert meta['category_names'] == ['person', 'stop sign', 'toothbrush']
    table = metadata.category_index_table(meta)
    assert table[1] == 1 and table[13] == 2 and table[90] == 3 and table[2] == 0
    np.testing.assert_array_equal(metadata.index_to_category_id(meta, np.array([0, 1, 2, 3])),
                                  [0, 1, 13, 90])


def test_coco_keypoint_flip_map():
    flip = metadata.keypoint_flip_map(coco.COCO_PERSON_KEYPOINTS)
    names = coco.COCO_PERSON_KEYPOINTS
    assert flip[0] == 0                                         # nose stays
    assert names[flip[names.index('left_eye')]] == 'right_eye'
    assert names[flip[names.index('right_ankle')]] == 'left_ankle'
    assert sorted(flip) == list(range(17)) and all(flip[f] == i for i, f in enumerate(flip))


def test_metadata_round_trips_through_json(tmp_path):
    meta = metadata.make_metadata([2, 1], ['b', 'a'], has_masks=False, source='x', extra=[1])
    path = str(tmp_path / 'm.json')
    metadata.write_metadata(meta, path)
    assert metadata.read_metadata(path) == meta
