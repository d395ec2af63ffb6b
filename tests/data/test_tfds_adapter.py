"""The tfds 'coco/2017' source with tfds.testing.mock_data: same batch structure, boxes only."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mrcnn_jax.data import coco, pipeline

from .helpers import photo, small_config

NUM_EXAMPLES = 5


def _examples():
    """Consistent examples: every `objects` field has the same length (mock_data draws each
    field's length independently, which no real dataset does)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(NUM_EXAMPLES):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        n = 0 if i == 2 else int(rng.integers(1, 5))             # one negative image
        y1, x1 = rng.uniform(0, 0.5, n), rng.uniform(0, 0.5, n)
        bbox = np.stack([y1, x1, y1 + rng.uniform(0.1, 0.5, n), x1 + rng.uniform(0.1, 0.5, n)], 1)
        out.append({
            'image': photo(h, w, seed=i),
            'image/filename': f'{i:012d}.jpg',
            'image/id': 1000 + i,
            'objects': {
                'area': rng.integers(10, 500, n),
                'bbox': bbox.astype(np.float32).reshape(n, 4),
                'id': np.arange(n) + 10 * i,
                'is_crowd': np.arange(n) == 1,
                'label': rng.integers(0, 80, n),
            },
        })
    return out


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    features = self.info.features
    serialized = [features.serialize_example(ex) for ex in _examples()]
    return tf.data.Dataset.from_tensor_slices(serialized).map(
        lambda s: features.deserialize_example(s, decoders=decoders))


@pytest.fixture()
def tfds_config(tmp_path):
    c = small_config('tfds', canvas=(128, 128), tfds_data_dir=str(tmp_path))
    c.model.mask_on = False
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, as_dataset_fn=_as_dataset,
                                data_dir=str(tmp_path)):
        yield c


def test_tfds_val_batches_match_the_examples(tfds_config):
    ds = pipeline.build_dataset(tfds_config, 'val', process_index=0, process_count=1)
    assert ds.metadata['category_ids'] == [c[0] for c in coco.COCO_CATEGORIES]
    assert ds.metadata['has_masks'] is False
    batches = list(ds)
    assert ds.num_batches == 3 and len(batches) == 3
    ids = [int(i) for b in batches for i in b['image_id']]
    assert ids == [1000, 1001, 1002, 1003, 1004, -1]
    examples = _examples()
    for b in batches:
        for i, image_id in enumerate(b['image_id']):
            if image_id < 0:
                continue
            ex = examples[image_id - 1000]
            h, w = ex['image'].shape[:2]
            info = b['image_info'][i]
            assert info[:2].tolist() == [h, w]
            ymin, xmin, ymax, xmax = ex['objects']['bbox'].T
            boxes = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], 1) * info[[5, 4, 5, 4]]
            n = len(ex['objects']['label'])
            np.testing.assert_allclose(b['gt_boxes'][i, :n], boxes, rtol=1e-5, atol=1e-3)
            # tfds label l is COCO's l-th category: contiguous index l + 1
            np.testing.assert_array_equal(b['gt_classes'][i, :n], ex['objects']['label'] + 1)
            np.testing.assert_array_equal(b['gt_is_crowd'][i, :n], ex['objects']['is_crowd'])
            assert b['gt_valid'][i].sum() == n


def test_tfds_batch_structure_equals_json_source(tfds_config, synthetic_config):
    tfds_batch = next(pipeline.build_dataset(tfds_config, 'train', process_index=0,
                                             process_count=1))
    synthetic_config.model.mask_on = False
    json_batch = next(pipeline.build_dataset(synthetic_config, 'train', process_index=0,
                                             process_count=1))
    assert {k: (v.shape, v.dtype) for k, v in tfds_batch.items()} == \
        {k: (v.shape, v.dtype) for k, v in json_batch.items()}
    assert 'gt_masks' not in tfds_batch


def test_tfds_resume(tfds_config):
    ds = pipeline.build_dataset(tfds_config, 'train', process_index=0, process_count=1)
    first = [next(ds) for _ in range(4)]
    state = {**ds.get_state(), 'step': 1}
    resumed = pipeline.build_dataset(tfds_config, 'train', process_index=0, process_count=1)
    resumed.set_state(state)
    for expected in first[1:]:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_mask_model_on_tfds_is_refused(tfds_config):
    tfds_config.model.mask_on = True
    with pytest.raises(ValueError, match=r"no instance masks \(tfds coco/2017 has boxes only\)"):
        pipeline.build_dataset(tfds_config, 'train', process_index=0, process_count=1)
