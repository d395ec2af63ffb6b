"""Bad keypoint input: counts that differ from the dataset's or the config's (a counted skip, or a
DataError naming the annotation when strict), bad visibility flags, keypoints outside the image
or the box, instances without a labelled keypoint; and configs that cannot train keypoints."""

import json

import numpy as np
import pytest

from mrcnn_jax.data import coco, pipeline, validation
from mrcnn_jax.data.validation import DataError, SkipLog

from .helpers import small_config

NAMES = ['nose', 'left_eye', 'right_eye']


def _write(tmp_path, anns, names=NAMES, name='kp.json'):
    cat = {'id': 1, 'name': 'person'}
    if names:
        cat.update(keypoints=names, skeleton=[[1, 2], [1, 3], [9, 1]])     # [9, 1]: out of range
    path = tmp_path / name
    path.write_text(json.dumps({
        'images': [{'id': 1, 'file_name': 'a.png', 'height': 60, 'width': 80}],
        'annotations': anns, 'categories': [cat]}))
    return str(path)


def _ann(i, kps, bbox=(10, 10, 40, 30)):
    return {'id': i, 'image_id': 1, 'category_id': 1, 'bbox': list(bbox), 'iscrowd': 0,
            'area': 1200.0, 'keypoints': kps}


GOOD = [20, 20, 2, 15, 18, 1, 25, 18, 2]


def test_keypoint_counts_that_differ_are_counted_skips_or_strict_errors(tmp_path):
    anns = [_ann(1, GOOD), _ann(2, GOOD[:6]), _ann(3, GOOD + [1, 1, 2]),
            _ann(4, [20, 20, 3, 15, 18, 1, 25, 18, 2]),          # visibility 3
            _ann(5, [20, 20, 2, 15, 'x', 1, 25, 18, 2]),         # not a number
            _ann(6, [])]                                         # no keypoints: a box instance
    path = _write(tmp_path, anns)
    ds = coco.load_coco_json(path)
    assert [a.id for a in ds.annotations[1]] == [1, 6] and ds.annotations[1][1].keypoints is None
    assert ds.skips.instances == {validation.BAD_KEYPOINTS: 4}
    messages = ds.skips.examples[validation.BAD_KEYPOINTS]
    assert any('annotation id 2: 2 keypoints, expected 3' in m for m in messages)
    assert any('annotation id 4' in m and 'visibility flags must be 0, 1 or 2' in m for m in messages)
    assert ds.keypoint_skeleton == ((0, 1), (0, 2))                      # 0-based, bad pair dropped
    with pytest.raises(DataError, match=r"annotation id 2: 2 keypoints, expected 3 \(the "
                                        r"categories' keypoint names\).*strict"):
        coco.load_coco_json(path, strict=True)


def test_without_names_the_config_count_decides_else_the_largest(tmp_path):
    anns = [_ann(1, GOOD), _ann(2, GOOD[:6]), _ann(3, GOOD[:6])]
    path = _write(tmp_path, anns, names=None)
    by_config = coco.load_coco_json(path, num_keypoints=2)
    assert [a.id for a in by_config.annotations[1]] == [2, 3]
    assert by_config.keypoint_names == ('keypoint_0', 'keypoint_1')
    assert any('expected 2 (data.num_keypoints)' in m
               for m in by_config.skips.examples[validation.BAD_KEYPOINTS])
    largest = coco.load_coco_json(path)
    assert [a.id for a in largest.annotations[1]] == [1] and len(largest.keypoint_names) == 3
    assert largest.skips.instances == {validation.BAD_KEYPOINTS: 2}
    with pytest.raises(DataError, match='annotation id 2: 2 keypoints, expected 3'):
        coco.load_coco_json(path, strict=True)


def test_keypoints_outside_the_image_become_unlabelled_outside_the_box_stay(tmp_path):
    anns = [_ann(1, [20, 20, 2, -4, 18, 2, 25, 75, 1]),     # x < 0; y > H = 60
            _ann(2, [5, 5, 2, 70, 50, 2, 80, 60, 2]),       # outside the box (x, y < 10; x > 50), in the image
            _ann(3, [0, 0, 0, 30, 20, 0, 0, 0, 0])]         # nothing labelled
    ds = coco.load_coco_json(_write(tmp_path, anns))
    skips = SkipLog()
    inst = coco.build_instances(ds.annotations[1], 60, 80, with_masks=False, num_keypoints=3,
                                skips=skips)
    assert len(inst) == 3 and skips.num_skipped_instances == 0
    np.testing.assert_array_equal(inst.keypoints[0], [[20, 20, 2], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(inst.keypoints[1], np.reshape(anns[1]['keypoints'], (3, 3)))
    np.testing.assert_array_equal(inst.keypoints[2, :, 2], [0, 0, 0])
    assert skips.notes == {'keypoint_outside_image': 2, 'keypoint_outside_box': 3,
                           'no_labelled_keypoints': 1}


def test_bad_keypoints_through_the_pipeline(synthetic_root, tmp_path):
    ann = json.load(open(f'{synthetic_root}/annotations_train.json'))
    ann['categories'] = [dict(c, keypoints=NAMES) for c in ann['categories']]
    ann['images'] = ann['images'][:2]
    ann['annotations'] = [a for a in ann['annotations'] if a['image_id'] <= 2]
    first, second, third = ann['annotations'][:3]
    x, y, w, h = first['bbox']
    first['keypoints'] = [x + w / 2, y + h / 2, 2, -30, y, 2, x, y, 0]      # one outside the image
    second['keypoints'] = [0, 0, 0] * 3                                    # all unlabelled
    third['keypoints'] = [x, y, 2] * 2                                     # two keypoints: skipped
    path = tmp_path / 'kp.json'
    path.write_text(json.dumps(ann))
    c = small_config('coco_json', canvas=(128, 128), train_annotations=str(path),
                     train_images=f'{synthetic_root}/train', keypoints=True, num_keypoints=3,
                     flip_prob=0.0)
    c.model.num_classes = 5
    ds = pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=0, batch_size=2)
    assert ds.source.skips.instances == {validation.BAD_KEYPOINTS: 1}
    batches = [next(ds) for _ in range(2)]
    rows = {}
    for b in batches:
        for i, image_id in enumerate(b['image_id']):
            for n in np.nonzero(b['gt_valid'][i])[0]:
                box = tuple(np.round(b['gt_boxes'][i, n]).astype(int))
                rows[(int(image_id), box)] = b['gt_keypoints'][i, n]
    kept = [a for a in ann['annotations'] if a is not third]
    assert len(rows) == len(kept)                     # every other instance is there
    def row(a):
        x, y, w, h = a['bbox']
        return rows[(a['image_id'], tuple(np.round([x, y, x + w, y + h]).astype(int)))]
    np.testing.assert_allclose(row(first), [[x + w / 2, y + h / 2, 2], [0, 0, 0], [0, 0, 0]], atol=1e-4)
    np.testing.assert_array_equal(row(second), np.zeros((3, 3)))
    c.data.strict = True
    with pytest.raises(DataError, match=f"annotation id {third['id']}: 2 keypoints, expected 3"):
        pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=0, batch_size=2)


@pytest.mark.parametrize('change, match', [
    (dict(data_num=5), r'data.num_keypoints=5 but the dataset has 3 keypoints'),
    (dict(keypoints=False), r'model.keypoint_on=True learns from keypoints: set data.keypoints=True'),
    (dict(model_num=17), r'data.num_keypoints=3 but model.num_keypoints=17'),
])
def test_configs_that_cannot_train_keypoints_are_clear_errors(change, match):
    c = small_config('coco_json', keypoints=change.get('keypoints', True),
                     num_keypoints=change.get('data_num', 3))
    c.model.num_classes = 2
    c.model.keypoint_on = True
    c.model.num_keypoints = change.get('model_num', change.get('data_num', 3))
    meta = {'keypoint_names': NAMES, 'has_masks': True, 'num_classes': 1, 'category_ids': [1]}
    with pytest.raises(ValueError, match=match):
        pipeline._check_config(c, meta)
