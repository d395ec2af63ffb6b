"""A stand-in for a Keypoint R-CNN `Predictor` in evaluation, CLI and drawing tests: it predicts
each image's ground truth (boxes, category ids, keypoints), so the evaluation and drawing paths
run without compiling a model, and their expected numbers are known (AP 1)."""

from __future__ import annotations

import json
import types

import numpy as np


class GroundTruthPredictor:
    """Predictor-like: `predict_iter((image_id, image), ...)` yields (image_id, prediction) as
    `Predictor` does, from a COCO json's annotations; unknown keys (file paths) get the
    annotations of `default_image_id`. Keypoints: the annotation's (x, y) with visibility 1, or
    `num_keypoints` random points for annotations without keypoints."""

    def __init__(self, config, annotations_json: str, *, num_keypoints: int | None = None,
                 default_image_id: int = 1):
        self.config = config
        self.conventions = types.SimpleNamespace(mask_paste='padded_resize', keypoint_offset=0.0)
        self.label_ids = np.arange(config.model.num_classes)
        self.class_names = ['__background__'] + [f'class{i}' for i in range(1, config.model.num_classes)]
        self.batch_size = 1
        self.paste = False
        data = json.load(open(annotations_json))
        self.k = num_keypoints or config.model.num_keypoints
        self.default_image_id = default_image_id
        self.by_image = {im['id']: [] for im in data['images']}
        for a in data['annotations']:
            self.by_image[a['image_id']].append(a)

    def prediction(self, image_id) -> dict:
        anns = self.by_image.get(image_id, self.by_image[self.default_image_id])
        rng = np.random.default_rng(0)
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)],
                           np.float32).reshape(-1, 4)
        keypoints = []
        for a in anns:
            if a.get('keypoints'):
                kps = np.asarray(a['keypoints'], np.float32).reshape(-1, 3)
            else:
                kps = rng.uniform(0, 50, (self.k, 3)).astype(np.float32)
            keypoints.append(np.concatenate([kps[:, :2], np.ones((len(kps), 1), np.float32)], 1))
        n = len(anns)
        return {'boxes': boxes, 'scores': np.linspace(1.0, 0.5, n, dtype=np.float32),
                'labels': np.asarray([a['category_id'] for a in anns], np.int64),
                'keypoints': np.asarray(keypoints, np.float32).reshape(n, -1, 3),
                'keypoints_scores': np.full((n, self.k), 3.0, np.float32)}

    def predict_iter(self, items, on_error=None):
        for key, _image in items:
            yield key, self.prediction(key)

    def __call__(self, image):
        return self.prediction(self.default_image_id)
