"""The hand-written tf.train.Example encoding against TensorFlow's own protobuf, and parsing."""

import numpy as np
import tensorflow as tf

from mrcnn_jax.data import coco, example, images


def _instances(n: int, h: int = 4, w: int = 5) -> coco.Instances:
    rng = np.random.default_rng(0)
    return coco.Instances(
        boxes=rng.uniform(0, 4, (n, 4)).astype(np.float32),
        category_ids=np.asarray([1, 90, 3][:n], np.int64),
        is_crowd=np.asarray([False, True, False][:n]),
        areas=rng.uniform(1, 9, n).astype(np.float32),
        ids=np.asarray([7, -3, 2**40][:n], np.int64),       # negative and large ids survive
        masks=(rng.random((n, h, w)) > 0.5).astype(np.uint8),
        keypoints=rng.uniform(0, 4, (n, 2, 3)).astype(np.float32))


def test_encoding_matches_tensorflow_protobuf():
    image = images.EncodedImage(b'\xff\xd8fake', 'jpeg', 4, 5, reencoded=False)
    inst = _instances(3)
    ours = tf.train.Example.FromString(example.encode_example(image, 123, 'a/b.jpg', inst))
    f = tf.train.Feature
    theirs = tf.train.Example(features=tf.train.Features(feature={
        'image/encoded': f(bytes_list=tf.train.BytesList(value=[image.data])),
        'image/format': f(bytes_list=tf.train.BytesList(value=[b'jpeg'])),
        'image/id': f(int64_list=tf.train.Int64List(value=[123])),
        'image/height': f(int64_list=tf.train.Int64List(value=[4])),
        'image/width': f(int64_list=tf.train.Int64List(value=[5])),
        'image/file_name': f(bytes_list=tf.train.BytesList(value=[b'a/b.jpg'])),
        'objects/bbox': f(float_list=tf.train.FloatList(value=inst.boxes.ravel())),
        'objects/category_id': f(int64_list=tf.train.Int64List(value=inst.category_ids)),
        'objects/is_crowd': f(int64_list=tf.train.Int64List(value=[0, 1, 0])),
        'objects/area': f(float_list=tf.train.FloatList(value=inst.areas)),
        'objects/id': f(int64_list=tf.train.Int64List(value=inst.ids)),
        'objects/mask': f(bytes_list=tf.train.BytesList(
            value=[example.encode_mask_png(m) for m in inst.masks])),
        'objects/keypoints': f(float_list=tf.train.FloatList(value=inst.keypoints.ravel())),
    }))
    assert ours == theirs


def test_parse_example_round_trip_including_negative_image():
    image = images.EncodedImage(b'x', 'png', 4, 5, reencoded=False)
    for n in (3, 0):
        inst = _instances(n)
        parsed = example.parse_example(
            tf.constant(example.encode_example(image, 9, 'f.png', inst)), with_masks=True,
            num_keypoints=2)
        assert parsed['boxes'].shape == (n, 4)
        np.testing.assert_array_equal(parsed['boxes'].numpy(), inst.boxes)
        np.testing.assert_array_equal(parsed['category_ids'].numpy(), inst.category_ids)
        np.testing.assert_array_equal(parsed['is_crowd'].numpy(), inst.is_crowd)
        np.testing.assert_array_equal(parsed['keypoints'].numpy(), inst.keypoints)
        masks = [tf.io.decode_png(s)[..., 0].numpy() for s in parsed['masks_png'].numpy()]
        np.testing.assert_array_equal(np.asarray(masks).reshape(n, 4, 5), inst.masks)
        assert int(parsed['image_id']) == 9
