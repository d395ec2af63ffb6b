"""Dataset metadata: the category mapping and the facts a pipeline needs, as a small JSON dict.

    {
      'category_ids':   [1, 2, 3, ...],        # sorted; class index i (1..K) <-> category_ids[i-1]
      'category_names': ['person', ...],
      'num_classes': 80,                       # K; class indices are 1..K, 0 is background/padding
      'has_masks': True,
      'keypoint_names': [...],                 # [] when the dataset has no keypoints
      'keypoint_flip_map': [0, 2, 1, ...],     # index of each keypoint's mirror image
      'keypoint_skeleton': [[0, 1], ...],      # 0-based index pairs drawn as lines ([] if none)
      'num_images': 5000, 'num_instances': 36781,
      'source': 'tfrecord' | 'coco_json' | 'tfds' | 'synthetic',
      ...                                      # source-specific extras (shards, summary, ...)
    }

It is written beside TFRecords (`<prefix>.metadata.json`) and is `.metadata` of every dataset
built by `pipeline.build_dataset`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from mrcnn_jax.data import files


def keypoint_flip_map(names: Sequence[str]) -> list[int]:
    """For each keypoint, the index of its mirror image: 'left_x' <-> 'right_x', others fixed."""
    index = {n: i for i, n in enumerate(names)}
    flip = []
    for i, n in enumerate(names):
        if n.startswith('left_'):
            flip.append(index.get('right_' + n[len('left_'):], i))
        elif n.startswith('right_'):
            flip.append(index.get('left_' + n[len('right_'):], i))
        else:
            flip.append(i)
    return flip


def default_keypoint_skeleton(num_keypoints: int, keypoint_names: Sequence[str] = ()) -> list[list[int]]:
    """The skeleton (0-based index pairs) to draw when a dataset or model names none: the synthetic
    figures' for their 13 keypoint names, COCO's person skeleton for 17 keypoints, else none."""
    from mrcnn_jax.data import coco, synthetic_keypoints
    if tuple(keypoint_names) == synthetic_keypoints.KEYPOINT_NAMES:
        return [list(p) for p in synthetic_keypoints.SKELETON]
    if num_keypoints == len(coco.COCO_PERSON_KEYPOINTS) and (
            not keypoint_names or tuple(keypoint_names) == coco.COCO_PERSON_KEYPOINTS):
        return [[a - 1, b - 1] for a, b in coco.COCO_PERSON_SKELETON]
    return []


def make_metadata(category_ids: Sequence[int], category_names: Sequence[str], *,
                  has_masks: bool, keypoint_names: Sequence[str] = (),
                  keypoint_skeleton: Sequence[Sequence[int]] = (), num_images: int = -1,
                  num_instances: int = -1, source: str = '', **extra) -> dict:
    order = np.argsort(np.asarray(category_ids, np.int64), kind='stable')
    ids = [int(category_ids[i]) for i in order]
    if len(set(ids)) != len(ids):
        raise ValueError(f'duplicate category ids: {ids}')
    return {
        'category_ids': ids,
        'category_names': [str(category_names[i]) for i in order],
        'num_classes': len(ids),
        'has_masks': bool(has_masks),
        'keypoint_names': list(keypoint_names),
        'keypoint_flip_map': keypoint_flip_map(list(keypoint_names)),
        'keypoint_skeleton': [[int(a), int(b)] for a, b in keypoint_skeleton],
        'num_images': int(num_images),
        'num_instances': int(num_instances),
        'source': source,
        **extra,
    }


def category_index_table(metadata: dict) -> np.ndarray:
    """[max_id + 1] int32 table: category id → contiguous index 1..K (0 for ids not in the set)."""
    ids = metadata['category_ids']
    table = np.zeros(max(ids, default=0) + 1, np.int32)
    table[np.asarray(ids, np.int64)] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return table


def index_to_category_id(metadata: dict, index: int | np.ndarray) -> int | np.ndarray:
    """Contiguous class index (1..K) → category id; index 0 (background) → 0."""
    table = np.asarray([0] + list(metadata['category_ids']), np.int64)
    out = table[np.asarray(index)]
    return int(out) if np.ndim(out) == 0 else out


def write_metadata(metadata: dict, path: str) -> None:
    files.write_bytes(path, json.dumps(metadata, indent=1, sort_keys=True).encode('utf-8'))


def read_metadata(path: str) -> dict:
    return json.loads(files.read_bytes(path).decode('utf-8'))
