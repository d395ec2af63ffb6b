"""What COCO keypoint evaluation needs besides detections: OKS sigmas per dataset, and ground
truth that pycocotools' `iouType='keypoints'` can read.

OKS (object keypoint similarity) scores a detection's keypoints against a ground-truth
instance: exp(-d_i^2 / (2 s^2 (2 sigma_i)^2)) averaged over the labelled keypoints i, s^2 the
instance's area. Each keypoint's sigma states how precisely it can be placed, relative to the
instance's size, so the sigmas belong to the dataset (`oks_sigmas`):
    * `data.keypoint_oks_sigmas` when set (one per keypoint);
    * COCO's 17 person sigmas (pycocotools' defaults) for COCO's keypoint names, or for 17
      keypoints without names;
    * the synthetic stick figures' (`data/synthetic_keypoints.py` documents the choice: COCO's
      per joint, the shoulders' 0.079 for the head);
    * a dataset whose keypoints all carry COCO names: COCO's sigma of each name;
    * otherwise the mean of COCO's 17 sigmas for every keypoint (0.0669), said in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

# pycocotools' COCOeval Params.kpt_oks_sigmas, in COCO_PERSON_KEYPOINTS order.
COCO_PERSON_OKS_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062,
                          0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089)
UNKNOWN_KEYPOINT_SIGMA = float(np.mean(COCO_PERSON_OKS_SIGMAS))


def oks_sigmas(keypoint_names: Sequence[str], configured: Sequence[float] = ()) -> np.ndarray:
    """[K] float64 OKS sigmas of a dataset's keypoints (module docstring: which ones).

    keypoint_names: the dataset's K names (from its categories; 'keypoint_<i>' when it has
    none); configured: `data.keypoint_oks_sigmas`, () for the rule above.
    """
    from mrcnn_jax.data import coco, synthetic_keypoints
    names = tuple(keypoint_names)
    k = len(names)
    if len(configured):
        if len(configured) != k:
            raise ValueError(f'data.keypoint_oks_sigmas has {len(configured)} values for {k} '
                             f'keypoints {list(names)}')
        return np.asarray(configured, np.float64)
    if names == synthetic_keypoints.KEYPOINT_NAMES:
        return np.asarray(synthetic_keypoints.OKS_SIGMAS, np.float64)
    coco_sigma = dict(zip(coco.COCO_PERSON_KEYPOINTS, COCO_PERSON_OKS_SIGMAS))
    if k == len(COCO_PERSON_OKS_SIGMAS) and all(n == f'keypoint_{i}' for i, n in enumerate(names)):
        return np.asarray(COCO_PERSON_OKS_SIGMAS, np.float64)
    if k and all(n in coco_sigma for n in names):
        return np.asarray([coco_sigma[n] for n in names], np.float64)
    log.warning('no OKS sigmas known for the keypoints %s: keypoint AP uses %.4f (the mean of '
                "COCO's) for each; set data.keypoint_oks_sigmas to the dataset's own", list(names),
                UNKNOWN_KEYPOINT_SIGMA)
    return np.full(k, UNKNOWN_KEYPOINT_SIGMA, np.float64)


def keypoint_names(coco_gt) -> tuple[str, ...]:
    """The keypoint names of a ground truth (pycocotools COCO): the first category that lists
    some, else 'keypoint_<i>' for the K of its annotations, else ()."""
    for cat in coco_gt.dataset.get('categories', []):
        if cat.get('keypoints'):
            return tuple(str(n) for n in cat['keypoints'])
    counts = {len(a['keypoints']) // 3 for a in coco_gt.dataset.get('annotations', [])
              if a.get('keypoints')}
    return tuple(f'keypoint_{i}' for i in range(max(counts))) if counts else ()


def ground_truth_problem(coco_gt, num_keypoints: int) -> str | None:
    """Why a keypoint model's keypoints cannot be scored on this ground truth, or None when they
    can: no annotation with labelled keypoints, or another number of keypoints."""
    annotations = coco_gt.dataset.get('annotations', [])
    labelled = [a for a in annotations if a.get('keypoints') and any(
        v > 0 for v in a['keypoints'][2::3])]
    if not labelled:
        return 'the annotations have no keypoints'
    names = keypoint_names(coco_gt)
    if len(names) != num_keypoints:
        return (f'the annotations have {len(names)} keypoints per instance, the model predicts '
                f'{num_keypoints}')
    return None


def prepare_ground_truth(coco_gt) -> None:
    """Fills in, in place, what pycocotools' keypoint evaluation reads from every annotation of
    an evaluated category: 'keypoints' (zeros where an annotation has none, e.g. a non-person
    instance of an instances json) and 'num_keypoints' (the labelled ones, where missing).
    Instances with num_keypoints 0 are ignored by the keypoint metric; the bbox and segm
    metrics do not read either field."""
    k = len(keypoint_names(coco_gt))
    for ann in coco_gt.dataset.get('annotations', []):
        kps = ann.get('keypoints')
        if not kps or len(kps) != 3 * k:
            ann['keypoints'] = [0.0] * (3 * k)
            ann['num_keypoints'] = 0
        elif 'num_keypoints' not in ann:
            ann['num_keypoints'] = int(sum(v > 0 for v in kps[2::3]))
