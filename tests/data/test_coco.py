"""COCO json validation: clear errors for broken files, counted skips (or strict errors) for bad
annotations, box clipping, segmentation decoding."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mrcnn_jax.data import coco, validation
from mrcnn_jax.data.validation import DataError, SkipLog


def _write(tmp_path, content, name='ann.json') -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _dataset(annotations, images=None):
    return {'images': images or [{'id': 1, 'file_name': 'a.jpg', 'height': 50, 'width': 80}],
            'annotations': annotations,
            'categories': [{'id': 3, 'name': 'car'}, {'id': 1, 'name': 'person'}]}


def _ann(i, **kw):
    a = {'id': i, 'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 20, 20], 'iscrowd': 0,
         'area': 400.0, 'segmentation': [[10, 10, 30, 10, 30, 30, 10, 30]]}
    a.update(kw)
    return a


def test_malformed_json_names_file_and_position(tmp_path):
    path = _write(tmp_path, '{"images": [}', 'broken.json')
    with pytest.raises(DataError, match=r'broken.json: malformed JSON.*line 1 column'):
        coco.load_coco_json(path)


@pytest.mark.parametrize('content, match', [
    ({'annotations': [], 'categories': []}, "missing 'images'"),
    ([1, 2], 'top level must be an object'),
    ({'images': [{'id': 1}], 'categories': []}, 'image entry without integer id or file_name'),
    ({'images': [], 'categories': [{'id': 1}, {'id': 1}]}, 'duplicate category id 1'),
])
def test_broken_structure_is_an_error(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        coco.load_coco_json(_write(tmp_path, content))


def test_bad_annotations_are_counted_and_named(tmp_path):
    anns = [_ann(1),
            _ann(2, category_id=77),                      # unknown category
            _ann(3, image_id=999),                        # points at a missing image
            _ann(4, bbox=[5, 5, 0, 10]),                  # zero area
            _ann(5, bbox=[5, 5, 'x', 10]),                # malformed
            _ann(6, segmentation=[[1, 2, 3]]),            # odd polygon
            _ann(7, bbox=[1, 2, float('nan'), 4]),        # non-finite
            {'image_id': 1}]                              # no id
    ds = coco.load_coco_json(_write(tmp_path, _dataset(anns)))
    assert [a.id for a in ds.annotations[1]] == [1]
    assert ds.skips.instances == {validation.UNKNOWN_CATEGORY: 1, validation.UNKNOWN_IMAGE_ID: 1,
                                  validation.ZERO_AREA_BOX: 1, validation.MALFORMED_ANNOTATION: 3,
                                  validation.BAD_SEGMENTATION: 1}
    assert any('annotation id 2' in m and '77' in m
               for m in ds.skips.examples[validation.UNKNOWN_CATEGORY])
    assert 'unknown_category_id: 1' in ds.skips.format()
    assert ds.category_ids == [1, 3] and ds.category_names == ['person', 'car']


@pytest.mark.parametrize('bad, match', [
    (_ann(2, category_id=77), 'annotation id 2: category_id 77'),
    (_ann(3, image_id=999), 'annotation id 3: image_id 999'),
    (_ann(4, bbox=[5, 5, 0, 10]), 'annotation id 4: bbox'),
])
def test_strict_turns_skips_into_errors(tmp_path, bad, match):
    path = _write(tmp_path, _dataset([_ann(1), bad]))
    with pytest.raises(DataError, match=match):
        coco.load_coco_json(path, strict=True)


def test_boxes_are_clipped_and_outside_boxes_skipped():
    anns = [coco.Annotation(1, 1, 1, (-5.0, 10.0, 20.0, 50.0), False, -1.0, None, None),
            coco.Annotation(2, 1, 1, (100.0, 10.0, 20.0, 20.0), False, -1.0, None, None)]
    skips = SkipLog()
    inst = coco.build_instances(anns, 40, 80, with_masks=False, num_keypoints=0, skips=skips)
    np.testing.assert_allclose(inst.boxes, [[0, 10, 15, 40]])
    assert inst.areas[0] == 15 * 30                  # no json area: box area of the clipped box
    assert skips.instances == {validation.BOX_OUTSIDE_IMAGE: 1}
    assert skips.notes['box_clipped_to_image'] == 1
    with pytest.raises(DataError, match='annotation id 2'):
        coco.build_instances(anns, 40, 80, with_masks=False, num_keypoints=0,
                             skips=SkipLog(strict=True))


def test_segmentations_decode_like_pycocotools():
    h, w = 30, 40
    poly = [[5, 5, 30, 5, 30, 20, 5, 20], [32, 22, 38, 22, 35, 28]]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, h, w)))
    np.testing.assert_array_equal(coco.segmentation_to_mask(poly, h, w), expected)
    rle = mask_utils.encode(np.asfortranarray(expected))
    compressed = {'size': [h, w], 'counts': rle['counts'].decode()}
    np.testing.assert_array_equal(coco.segmentation_to_mask(compressed, h, w), expected)
    flat = expected.ravel(order='F')
    runs, counts, value = 0, [], 0
    for v in flat:                                    # uncompressed RLE, as COCO crowd regions
        if v != value:
            counts.append(runs)
            runs, value = 0, v
        runs += 1
    counts.append(runs)
    np.testing.assert_array_equal(
        coco.segmentation_to_mask({'size': [h, w], 'counts': counts}, h, w), expected)
    # a 2-point "polygon" is dropped, not read as a box (pycocotools' 4-number quirk)
    assert coco.segmentation_to_mask([[1, 1, 10, 10]], h, w).sum() == 0
    with pytest.raises(ValueError, match='RLE size'):
        coco.segmentation_to_mask(compressed, h + 1, w)


def test_real_coco_json_with_crowd_rle(shared_data):
    ds = coco.load_coco_json(str(shared_data / 'coco_train2017_tiny' / 'annotations.json'),
                             strict=True)
    assert len(ds.images) == 6 and ds.num_instances == 136
    crowd = [a for anns in ds.annotations.values() for a in anns if a.is_crowd]
    assert len(crowd) == 1 and isinstance(crowd[0].segmentation, dict)
    entry = next(e for e in ds.images if e.id == crowd[0].image_id)
    inst = coco.build_instances(ds.annotations[entry.id], entry.height, entry.width,
                                with_masks=True, num_keypoints=0, skips=SkipLog(strict=True))
    k = int(np.nonzero(inst.is_crowd)[0][0])
    assert inst.masks[k].sum() == pytest.approx(crowd[0].area, rel=0.01)
