"""Helpers of the Detectron2 loss-parity test (test_detectron2_loss_parity.py): its data path on
real photos (with synthetic keypoints on the people for Keypoint R-CNN), our batch on the same
tensor, proposal matching between the two sides, the sampler that replays our choices inside
Detectron2, and our loss functions on Detectron2's own predictions."""

from __future__ import annotations

import copy
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
NUM_KEYPOINTS = 17


def _load_photo(shared_data, name):
    """(image uint8 RGB [H, W, 3], annotations of the image as in the COCO json)."""
    root = shared_data / 'coco128_seg'
    ann = json.loads((root / 'annotations.json').read_text())
    entry = next(i for i in ann['images'] if i['file_name'] == name)
    objs = [a for a in ann['annotations'] if a['image_id'] == entry['id'] and not a['iscrowd']]
    image = np.asarray(Image.open(root / 'images' / name).convert('RGB'))
    assert image.shape[:2] == (entry['height'], entry['width'])
    return image, objs


def _with_keypoints(objs, seed):
    """Copies of the objects (people) with COCO keypoints [x, y, v] * 17 in original pixels on
    their boxes: mostly inside, 15% outside the box (Detectron2's data path unlabels those
    outside the image), 20% unlabelled (v = 0), one on the box's right edge and one on its bottom
    edge (x + w as BoxMode computes the corner, in float32: the GT box's own RoI is sampled, and
    `keypoints_to_heatmap` puts x == x2 in the last cell); the last object's all unlabelled
    (its RoIs leave Detectron2's keypoint head: `select_proposals_with_visible_keypoints`)."""
    rng = np.random.default_rng(seed)
    out = []
    for j, a in enumerate(objs):
        x, y, w, h = (np.float32(v) for v in a['bbox'])
        xy = np.stack([x + rng.uniform(-0.15, 1.15, NUM_KEYPOINTS) * w,
                       y + rng.uniform(-0.15, 1.15, NUM_KEYPOINTS) * h], axis=1).astype(np.float64)
        xy[0, 0], xy[1, 1] = x + w, y + h
        v = rng.choice([0.0, 1.0, 2.0], size=NUM_KEYPOINTS, p=[0.2, 0.3, 0.5])
        if j == len(objs) - 1:
            v[:] = 0
        kps = np.concatenate([xy, v[:, None]], axis=1)
        out.append({**a, 'keypoints': [float(c) for c in kps.ravel()]})
    return out


def _detectron2_inputs(d2cfg, photos, class_of):
    """Detectron2's DatasetMapper on each photo (training, no flip): the resized CHW BGR image and
    its Instances (gt_boxes, 0-based gt_classes, gt_masks as BitMasks with a mask head,
    gt_keypoints with a keypoint head)."""
    resize = T.ResizeShortestEdge(d2cfg.INPUT.MIN_SIZE_TRAIN, d2cfg.INPUT.MAX_SIZE_TRAIN, 'choice')
    inputs = []
    for image, objs in photos:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        aug = T.AugInput(bgr)
        tfms = T.AugmentationList([resize])(aug)     # a TransformList, as DatasetMapper's
        annos = [d2_utils.transform_instance_annotations(
            {'bbox': a['bbox'], 'bbox_mode': BoxMode.XYWH_ABS, 'category_id': class_of[a['category_id']],
             **({'segmentation': a['segmentation']} if d2cfg.MODEL.MASK_ON else {}),
             **({'keypoints': a['keypoints']} if d2cfg.MODEL.KEYPOINT_ON else {})},
            tfms, aug.image.shape[:2]) for a in objs]
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
    crowd box, a zero-width box and padding rows that Detectron2 never sees (with labelled
    keypoints, where the instances have keypoints)."""
    from mrcnn_jax.data.coco import segmentation_to_mask
    bsz = len(photos)
    gt_boxes = np.zeros((bsz, MAX_INSTANCES, 4), np.float32)
    gt_classes = np.zeros((bsz, MAX_INSTANCES), np.int32)
    gt_crowd = np.zeros((bsz, MAX_INSTANCES), bool)
    gt_valid = np.zeros((bsz, MAX_INSTANCES), bool)
    gt_masks = np.zeros((bsz, MAX_INSTANCES, MASK_SIZE, MASK_SIZE), np.uint8)
    gt_keypoints = np.zeros((bsz, MAX_INSTANCES, NUM_KEYPOINTS, 3), np.float32)
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
        if inst.has('gt_keypoints'):     # Detectron2's, in the resized frame
            gt_keypoints[i, :n] = inst.gt_keypoints.tensor.numpy()
            gt_keypoints[i, n:n + 2] = (150, 100, 2)
        rh, rw = inst.image_size
        info[i] = (h, w, rh, rw, rh / h, rw / w)
    batch = {'images': canvas, 'image_info': info, 'gt_boxes': gt_boxes, 'gt_classes': gt_classes,
             'gt_is_crowd': gt_crowd, 'gt_valid': gt_valid, 'gt_masks': gt_masks}
    if inputs[0]['instances'].has('gt_keypoints'):
        batch['gt_keypoints'] = gt_keypoints
    return batch


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


def _loss_terms(cfg, seen, tg, batch, **overrides):
    """Our loss functions (training/losses.py; training/targets.py for soft mask targets) on
    Detectron2's own predictions with our sampled targets (which the test shows to be Detectron2's),
    under cfg's conventions with `overrides`: what each convention is worth on this data."""
    import jax

    from mrcnn_jax.training import losses, targets
    from mrcnn_jax.training.losses import LossSettings
    if overrides:
        cfg = copy.deepcopy(cfg)
        cfg.conventions.update(overrides)
    s = LossSettings.from_config(cfg)
    at, rt = tg['anchors'], tg['rois']
    obj, loc = losses.rpn_losses(*seen['rpn'], at, loss_type=s.rpn_box_loss.kind, beta=s.rpn_box_loss.beta,
                                 normalizer=s.rpn_normalizer)
    # Box head: Detectron2's rows are each image's sampled RoIs in our order; background last.
    bsz, slots = rt.labels.shape
    k = cfg.num_classes
    scores, deltas = seen['cls'].numpy(), seen['deltas'].numpy()
    n = (rt.weights > 0).sum(1)
    assert n.sum() == len(scores) and all((rt.weights[i, :n[i]] > 0).all() for i in range(bsz))
    start = np.concatenate([[0], np.cumsum(n)])
    logits = np.zeros((bsz, slots, k), np.float32)
    agnostic = deltas.shape[1] == 4                          # Cascade's stages
    box_deltas = np.zeros((bsz, slots, 1 if agnostic else k, 4), np.float32)
    for i in range(bsz):
        rows = slice(start[i], start[i + 1])
        logits[i, :n[i]] = np.concatenate([scores[rows, -1:], scores[rows, :-1]], axis=1)
        box_deltas[i, :n[i], 0 if agnostic else 1:] = deltas[rows].reshape(n[i], -1, 4)
    cls, box = losses.box_head_losses(logits, box_deltas, rt, loss_type=s.box_loss.kind, beta=s.box_loss.beta)
    out = {'loss_rpn_cls': float(obj), 'loss_rpn_loc': float(loc), 'loss_cls': float(cls), 'loss_box_reg': float(box)}
    if 'mask' not in seen:
        return out
    # Mask head: Detectron2's logits of the positives (first in the sample), at their GT class.
    weights = tg['mask_weights']
    r = weights.shape[1]
    npos = (weights > 0).sum(1)
    assert all(weights[i, :npos[i]].all() for i in range(bsz))
    m = seen['mask'].numpy()
    start = np.concatenate([[0], np.cumsum(npos)])
    mask_logits = np.zeros((bsz, r) + m.shape[-2:], np.float32)
    for i in range(bsz):
        mask_logits[i, :npos[i]] = m[start[i]:start[i + 1]][np.arange(npos[i]), rt.labels[i, :npos[i]] - 1]
    mt = tg['mask_targets']
    if s.soft_mask_targets:
        # Recomputed. (Hard targets are taken as computed: on a GT box's own RoI, 28 cells on a
        # 112-cell crop sample midway between crop cells, so edge pixels are exact 0.5 ties that
        # float rounding decides, e.g. differently in this eager call than under jit.)
        mgt = rt.matched_gt[:, :r]
        gt_boxes = np.take_along_axis(batch['gt_boxes'], mgt[..., None], axis=1)
        gt_masks = np.take_along_axis(batch['gt_masks'], mgt[:, :, None, None], axis=1)
        mt = jax.vmap(lambda ro, gb, gm: targets.mask_targets(ro, gb, gm, s.mask_resolution, soft=True))(
            rt.rois[:, :r], gt_boxes, gt_masks)
    mask, dlogits = jax.value_and_grad(losses.mask_head_loss)(mask_logits, mt, weights)
    # The mask predictor's (1 x 1 conv, Detectron2's [K, C] layout) weight gradient, from the
    # logits' gradient and the predictor's input.
    feats = seen['mask_in'].numpy()
    dlogits = np.asarray(dlogits)
    predictor_grad = np.zeros((k - 1, feats.shape[1]), np.float64)
    for i in range(bsz):
        for j in range(npos[i]):
            predictor_grad[rt.labels[i, j] - 1] += np.einsum('yx,cyx->c', dlogits[i, j], feats[start[i] + j])
    return {**out, 'loss_mask': float(mask), 'mask_predictor_grad': predictor_grad}


def _check_keypoint_rois(seen, tg, batch):
    """Detectron2's keypoint head trains on the positive RoIs that keep a visible keypoint inside
    them (`select_proposals_with_visible_keypoints`), ours on every positive with a target mask:
    the RoIs without a valid keypoint add nothing to either loss. So Detectron2's RoIs must be our
    positives with a valid keypoint, in order. Not degenerate: many valid keypoints, labelled ones
    outside their RoI, positives that Detectron2's selection drops, heatmap logits of O(1)."""
    rt, valid = tg['rois'], tg['keypoint_valid']             # valid [B, R, K]
    r = valid.shape[1]
    positive = (rt.labels[:, :r] > 0) & (rt.weights[:, :r] > 0)
    keep = valid.any(-1)
    assert not (keep & ~positive).any()
    for i, theirs in enumerate(seen['keypoint_rois']):
        assert len(theirs) == keep[i].sum(), \
            f'image {i}: Detectron2 trains its keypoint head on {len(theirs)} RoIs, we on {keep[i].sum()}'
        np.testing.assert_allclose(theirs, rt.rois[i, :r][keep[i]], atol=2e-3, rtol=0)
    gt = np.take_along_axis(batch['gt_keypoints'], rt.matched_gt[:, :r, None, None], axis=1)
    labelled = (gt[..., 2] > 0) & positive[..., None]
    assert valid.sum() >= 100 and (labelled & ~valid).sum() >= 20, (valid.sum(), (labelled & ~valid).sum())
    assert (positive & ~keep).any(), 'no positive RoI without a visible keypoint'
    std = float(seen['keypoint'].std())
    assert 0.5 < std < 10, f'heatmap logits degenerate: std {std:.2f}'
