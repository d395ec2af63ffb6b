"""Helpers of the Detectron2 loss-parity test (test_detectron2_loss_parity.py): its data path on
real photos, our batch on the same tensor, proposal matching between the two sides, and the
sampler that replays our choices inside Detectron2."""

from __future__ import annotations

import json

import numpy as np
import torch
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

MAX_INSTANCES = 32
MAX_TIES = 2            # proposals per image that float32 near-ties of NMS may give one side only
MASK_SIZE = 112


def _load_photo(shared_data, name):
    """(image uint8 RGB [H, W, 3], annotations of the image as in the COCO json)."""
    root = shared_data / 'coco128_seg'
    ann = json.loads((root / 'annotations.json').read_text())
    entry = next(i for i in ann['images'] if i['file_name'] == name)
    objs = [a for a in ann['annotations'] if a['image_id'] == entry['id'] and not a['iscrowd']]
    image = np.asarray(Image.open(root / 'images' / name).convert('RGB'))
    assert image.shape[:2] == (entry['height'], entry['width'])
    return image, objs


def _detectron2_inputs(d2cfg, photos, class_of):
    """Detectron2's DatasetMapper on each photo (training, no flip): the resized CHW BGR image and
    its Instances (gt_boxes, 0-based gt_classes, gt_masks as BitMasks)."""
    resize = T.ResizeShortestEdge(d2cfg.INPUT.MIN_SIZE_TRAIN, d2cfg.INPUT.MAX_SIZE_TRAIN, 'choice')
    inputs = []
    for image, objs in photos:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        aug = T.AugInput(bgr)
        tfms = resize(aug)
        annos = [d2_utils.transform_instance_annotations(
            {'bbox': a['bbox'], 'bbox_mode': BoxMode.XYWH_ABS, 'segmentation': a['segmentation'],
             'category_id': class_of[a['category_id']]}, tfms, aug.image.shape[:2]) for a in objs]
        inst = d2_utils.annotations_to_instances(annos, aug.image.shape[:2], mask_format='bitmask')
        inst = d2_utils.filter_empty_instances(inst)
        assert len(inst) == len(objs)
        inputs.append({'image': torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1))),
                       'height': image.shape[0], 'width': image.shape[1], 'instances': inst})
    return inputs


def _box_crops(masks, boxes, size):
    """The input pipeline's M x M box-cropped GT masks (mrcnn_jax/data/transforms.py)."""
    from mrcnn_jax.data.transforms import mask_targets
    return np.asarray(mask_targets(masks, boxes, size))


def _our_batch(photos, inputs, canvas, class_of):
    """Our padded batch on Detectron2's normalized, padded input tensor, with the same GT plus a
    crowd box, a zero-width box and padding rows that Detectron2 never sees."""
    from mrcnn_jax.data.coco import segmentation_to_mask
    bsz = len(photos)
    gt_boxes = np.zeros((bsz, MAX_INSTANCES, 4), np.float32)
    gt_classes = np.zeros((bsz, MAX_INSTANCES), np.int32)
    gt_crowd = np.zeros((bsz, MAX_INSTANCES), bool)
    gt_valid = np.zeros((bsz, MAX_INSTANCES), bool)
    gt_masks = np.zeros((bsz, MAX_INSTANCES, MASK_SIZE, MASK_SIZE), np.uint8)
    info = np.zeros((bsz, 6), np.float32)
    for i, ((image, objs), x) in enumerate(zip(photos, inputs)):
        h, w = image.shape[:2]
        inst = x['instances']
        n = len(inst)
        gt_boxes[i, :n] = inst.gt_boxes.tensor.numpy()
        gt_classes[i, :n] = inst.gt_classes.numpy() + 1
        np.testing.assert_array_equal(gt_classes[i, :n], [class_of[a['category_id']] + 1 for a in objs])
        gt_valid[i, :n] = True
        orig_boxes = np.asarray([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                                  a['bbox'][1] + a['bbox'][3]] for a in objs], np.float32)
        masks = np.stack([segmentation_to_mask(a['segmentation'], h, w) for a in objs])
        gt_masks[i, :n] = _box_crops(masks, orig_boxes, MASK_SIZE)
        gt_boxes[i, n] = (40, 30, 300, 250)          # crowd: Detectron2's data path drops it
        gt_classes[i, n], gt_crowd[i, n], gt_valid[i, n] = 1, True, True
        gt_boxes[i, n + 1] = (100, 60, 100, 200)     # zero width: filtered before matching
        gt_classes[i, n + 1], gt_valid[i, n + 1] = 3, True
        gt_masks[i, n:n + 2] = 1
        rh, rw = inst.image_size
        info[i] = (h, w, rh, rw, rh / h, rw / w)
    return {'images': canvas, 'image_info': info, 'gt_boxes': gt_boxes, 'gt_classes': gt_classes,
            'gt_is_crowd': gt_crowd, 'gt_valid': gt_valid, 'gt_masks': gt_masks}


def _iou(box, boxes):
    """IoU of one box with each of `boxes` (float64)."""
    box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64)
    wh = np.clip(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)


def _near_tie(boxes, scores, j, nms_thresh):
    """Whether proposal j overlaps a higher-scoring one by an IoU within float32 noise of the NMS
    threshold (kept on one side, suppressed on the other), or is one of the last MAX_TIES (moved
    into the top proposals in place of one suppressed)."""
    higher = scores > scores[j]
    if higher.sum() >= len(scores) - MAX_TIES:
        return True
    return bool(np.any(np.abs(_iou(boxes[j], boxes[higher]) - nms_thresh) < 1e-4))


def _describe(boxes, scores, j, other) -> str:
    """Where proposal j stands: its score and rank, its largest IoU with a higher-scoring proposal
    of its side, and the closest box of the other side."""
    higher = scores > scores[j]
    iou = _iou(boxes[j], boxes[higher]).max(initial=0.0)
    near = np.abs(other - boxes[j]).max(-1).argmin()
    return (f'score {scores[j]:.6f}, rank {int(higher.sum())} of {len(scores)}, max IoU with a higher one '
            f'{iou:.5f}, closest other {other[near]}')


def _match_proposals(ours, ours_scores, theirs, theirs_scores, nms_thresh, score_atol=1e-5):
    """(Index of Detectron2's proposal for each of our valid proposals, Detectron2's proposals
    that are not ours). Rows whose scores tie within float32 noise may come in either order. Up to
    MAX_TIES proposals may be on one side only, where float32 noise decides an NMS comparison (an
    IoU within 1e-4 of the threshold: the boxes' noise is ~1e-4 px), directly or by its knock-on
    (see `explained` below); they map to -1. Matched proposals' probabilities agree within
    score_atol."""
    assert len(ours) == len(theirs), f'{len(ours)} valid proposals vs Detectron2 {len(theirs)}'
    err = np.abs(ours[:, None, :] - theirs[None, :, :]).max(-1)
    perm = err.argmin(1)
    ok = err[np.arange(len(ours)), perm] < 2e-3
    assert len(np.unique(perm[ok])) == ok.sum(), 'proposals do not map one to one'
    np.testing.assert_allclose(ours_scores[ok], theirs_scores[perm[ok]], atol=score_atol, rtol=0)
    only_ours = np.flatnonzero(~ok)
    only_theirs = np.setdiff1d(np.arange(len(theirs)), perm[ok])
    assert len(only_ours) <= MAX_TIES, f'{len(only_ours)} proposals differ from Detectron2\'s'
    # Why a proposal is on one side only: float32 noise decided an NMS comparison about it (an
    # IoU within 1e-4 of the threshold, `_near_tie`), or about a proposal of the other side that
    # it overlaps above the threshold with a lower score: where that one was kept it suppressed
    # this one (a near tie's knock-on), or two such overlapping proposals tie in score, and each
    # side kept the one its float32 scores rank first.
    def explained(j, boxes, scores, other_only, other_boxes, other_scores):
        if _near_tie(boxes, scores, j, nms_thresh):
            return True
        return any(_iou(boxes[j], other_boxes[i:i + 1])[0] > nms_thresh
                   and other_scores[i] >= scores[j] - score_atol for i in other_only)
    for j in only_ours:
        assert explained(j, ours, ours_scores, only_theirs, theirs, theirs_scores), \
            f'our proposal {ours[j]} is not Detectron2\'s ({_describe(ours, ours_scores, j, theirs)})'
    for j in only_theirs:
        assert explained(j, theirs, theirs_scores, only_ours, ours, ours_scores), \
            f'Detectron2\'s proposal {theirs[j]} is not ours ({_describe(theirs, theirs_scores, j, ours)})'
    return np.where(ok, perm, -1), only_theirs


class _FixedSubsample:
    """Stands in for `subsample_labels` (detectron2/modeling/sampling.py): returns the given
    indices of image i on its i-th call, after checking that Detectron2 labelled them as we did."""

    def __init__(self, name, pos, neg, pos_labels=None, unmapped=None):
        self.name, self.pos, self.neg, self.pos_labels = name, pos, neg, pos_labels
        self.unmapped = unmapped      # per image: Detectron2's candidates that we do not have
        self.calls = 0

    def __call__(self, labels, num_samples, positive_fraction, bg_label):
        i = self.calls
        self.calls += 1
        lab = labels.numpy()
        pos, neg = self.pos[i](), self.neg[i]()
        expected = 1 if self.pos_labels is None else self.pos_labels[i]
        np.testing.assert_array_equal(lab[pos], expected, err_msg=f'{self.name}: image {i} positives')
        np.testing.assert_array_equal(lab[neg], bg_label, err_msg=f'{self.name}: image {i} negatives')
        known = np.ones(len(lab), bool)
        if self.unmapped is not None:
            known[self.unmapped[i]()] = False
        n_pos = ((lab != -1) & (lab != bg_label) & known).sum()
        n_neg = ((lab == bg_label) & known).sum()
        if len(pos) < int(num_samples * positive_fraction):   # we took every positive
            assert n_pos == len(pos), f'{self.name}: image {i}: Detectron2 has {n_pos} positives, we {len(pos)}'
            if len(pos) + len(neg) < num_samples:               # and every negative
                assert n_neg == len(neg), f'{self.name}: image {i}: Detectron2 has {n_neg} negatives, we {len(neg)}'
        assert len(np.intersect1d(pos, neg)) == 0
        return torch.as_tensor(pos, dtype=torch.long), torch.as_tensor(neg, dtype=torch.long)


def _grad_state_dict(model):
    """torch grads as a state_dict (zeros for buffers and frozen parameters)."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: (grads[k] if k in grads else torch.zeros_like(v)).detach().numpy()
            for k, v in model.state_dict().items()}
