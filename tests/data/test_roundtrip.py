"""json → TFRecord → batch on real COCO photos (../shared/data), against pycocotools."""

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_jax.data import pipeline

from .helpers import iou, reference_mask_target, small_config


def _tfrecord_config(result, canvas, **data):
    pattern = result.shard_paths[0].replace('-00000-of-', '-*-of-')
    return small_config('tfrecord', canvas=canvas, train_tfrecords=pattern, val_tfrecords=pattern,
                        max_instances=64, mask_size=56, **data)


def _check_against_annotations(batches, ann_path, mask_size):
    """Boxes = clipped annotation × scale (1e-3); mask crops vs pycocotools decode; crowd flags."""
    gt = COCO(ann_path)
    table = {cid: i + 1 for i, cid in enumerate(sorted(gt.getCatIds()))}
    shapes = {(k, v.shape, v.dtype) for k, v in batches[0].items()}
    seen, ious, pil_ious, crowd = [], [], [], 0
    for batch in batches:
        assert {(k, v.shape, v.dtype) for k, v in batch.items()} == shapes
        for i, image_id in enumerate(batch['image_id'].tolist()):
            if image_id < 0:
                continue
            seen.append(image_id)
            info = batch['image_info'][i]
            img = gt.imgs[image_id]
            assert info[:2].tolist() == [img['height'], img['width']]
            anns = gt.imgToAnns[image_id]
            valid = batch['gt_valid'][i]
            assert valid.sum() == len(anns)
            for r, a in enumerate(anns):
                x, y, w, h = a['bbox']
                box = np.clip([x, y, x + w, y + h], 0, [img['width'], img['height']] * 2)
                np.testing.assert_allclose(batch['gt_boxes'][i, r],
                                           box * info[[5, 4, 5, 4]], atol=1e-3, rtol=1e-6)
                assert batch['gt_classes'][i, r] == table[a['category_id']]
                assert batch['gt_is_crowd'][i, r] == bool(a['iscrowd'])
                crowd += a['iscrowd']
                mask = gt.annToMask(a)
                ours = batch['gt_masks'][i, r]
                ious.append(iou(ours, reference_mask_target(mask, box, mask_size)))
                x1, y1, x2, y2 = np.round(box).astype(int)
                if min(x2 - x1, y2 - y1) >= 24:              # crop + PIL resize, another method
                    crop = Image.fromarray(mask[y1:y2, x1:x2] * 255).resize(
                        (mask_size, mask_size), Image.BILINEAR)
                    pil_ious.append(iou(ours, np.asarray(crop) >= 128))
    ious, pil_ious = np.asarray(ious), np.asarray(pil_ious)
    assert (ious > 0.9).mean() > 0.99 and ious.mean() > 0.98
    assert (pil_ious > 0.9).mean() > 0.95
    return seen, crowd


def test_tiny_coco_round_trip_at_1024(tiny_tfrecords, shared_data):
    c = _tfrecord_config(tiny_tfrecords, (1024, 1024))
    c.data.min_size, c.data.max_size = (800,), 1024
    ds = pipeline.build_dataset(c, 'val', process_index=0, process_count=1)
    batches = list(ds)
    assert len(batches) == 3 and batches[0]['images'].shape == (2, 1024, 1024, 3)
    seen, crowd = _check_against_annotations(
        batches, str(shared_data / 'coco_train2017_tiny' / 'annotations.json'), 56)
    assert len(seen) == 6 and crowd == 1
    assert ds.metadata['category_ids'][:3] == [1, 2, 3] and ds.metadata['num_classes'] == 80


def test_coco128_round_trip_keeps_negatives(coco128_tfrecords, shared_data):
    c = _tfrecord_config(coco128_tfrecords, (384, 384))
    c.eval.batch_size = 8
    batches = list(pipeline.build_dataset(c, 'val', process_index=0, process_count=1))
    ann = str(shared_data / 'coco128_seg' / 'annotations.json')
    seen, _ = _check_against_annotations(batches, ann, 56)
    assert len(seen) == 128
    negatives = [b['gt_valid'][i].any() for b in batches for i, im in enumerate(b['image_id'])
                 if im in (250, 508)]
    assert negatives == [False, False]
    c.data.keep_negatives = False
    ds = pipeline.build_dataset(c, 'train', process_index=0, process_count=1)
    assert len(ds.source.info) == 128 and ds.get_state()['num_records'] == 126


def test_json_source_equals_tfrecord_source(tiny_tfrecords, shared_data):
    d = shared_data / 'coco_train2017_tiny'
    c = _tfrecord_config(tiny_tfrecords, (512, 512))
    c.data.max_size = 512
    from_records = list(pipeline.build_dataset(c, 'val', process_index=0, process_count=1))
    c.data.source = 'coco_json'
    c.data.val_annotations, c.data.val_images = str(d / 'annotations.json'), str(d / 'images')
    from_json = list(pipeline.build_dataset(c, 'val', process_index=0, process_count=1))
    by_id = lambda batches: {int(i): {k: v[n] for k, v in b.items()}          # noqa: E731
                             for b in batches for n, i in enumerate(b['image_id'])}
    a, b = by_id(from_records), by_id(from_json)
    assert a.keys() == b.keys()
    for image_id in a:
        for key in a[image_id]:
            np.testing.assert_array_equal(a[image_id][key], b[image_id][key], err_msg=key)


def test_flip_consistency_on_real_photos(tiny_tfrecords):
    c = _tfrecord_config(tiny_tfrecords, (512, 512), flip_prob=0.0)
    c.data.max_size = 512
    plain = next(pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=5))
    c.data.flip_prob = 1.0
    flip = next(pipeline.build_dataset(c, 'train', process_index=0, process_count=1, seed=5))
    np.testing.assert_array_equal(plain['image_id'], flip['image_id'])
    for i in range(2):
        h, w = (int(v) for v in plain['image_info'][i, 2:4])
        np.testing.assert_allclose(flip['images'][i, :h, :w],
                                   plain['images'][i, :h, :w][:, ::-1], atol=1e-4)
        valid = plain['gt_valid'][i]
        b, bf = plain['gt_boxes'][i][valid], flip['gt_boxes'][i][valid]
        np.testing.assert_allclose(bf[:, [0, 2]], w - b[:, [2, 0]], atol=1e-3)
        np.testing.assert_allclose(bf[:, [1, 3]], b[:, [1, 3]], atol=1e-6)
        np.testing.assert_array_equal(flip['gt_masks'][i], plain['gt_masks'][i][:, :, ::-1])
