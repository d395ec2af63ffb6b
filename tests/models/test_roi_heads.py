"""`postprocess_detections` (mrcnn_jax/models/roi_heads.py) against torchvision's own
`RoIHeads.postprocess_detections`, on the same inputs.

torchvision decodes every (proposal, class) pair with its box-head BoxCoder (weights 10, 10, 5, 5;
dw, dh clamped at log(1000/16)), takes the softmax over classes, clips to each image, drops the
background column, keeps scores > score_thresh and boxes with both sides >= 1e-2, runs NMS per
class (batched_nms on labels) and keeps the `detections_per_img` best. Our function gets the same
logits, deltas and proposals, padded to a common R with a validity mask (the padding rows hold
attractive boxes and logits, so they must be ignored), and must give the same count, order,
labels, scores and boxes per image.

Inputs are in a trained network's regime: two images of different sizes and different numbers
of proposals, proposals clustered on a few objects (NMS matters, and matters per class), class
scores spread over (0, 1) with no near-ties, a few classes competing on the same box, boxes
partly outside the image, boxes decoded wholly outside it (clipped to zero width: the min-size
filter removes them) and tiny proposals with size deltas beyond the clamp. Each case first
asserts that these steps change the result.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

import jax  # noqa: E402
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402
from torchvision.ops import boxes as box_ops  # noqa: E402

from mrcnn_jax.models.roi_heads import postprocess_detections  # noqa: E402
from references import align_ties  # noqa: E402

IMAGE_HW = [(120, 160), (150, 104)]
NUM_PROPOSALS = [150, 113]
R = 160                      # padded proposal count
K = 12                       # 11 classes + background
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _jitter(rng, box, n, scale):
    wh = box[2:] - box[:2]
    return box + rng.normal(0, scale, (n, 4)) * np.concatenate([wh, wh])


def _image_inputs(rng, h, w, n):
    """proposals [n, 4], class_logits [n, K], box_deltas [n, K, 4] for one image."""
    xy = rng.uniform([0, 0], [w - 30, h - 30], (6, 2))
    objects = np.concatenate([xy, xy + rng.uniform(25, 80, (6, 2))], 1)
    obj_class = rng.choice(np.arange(1, K), 6, replace=False)
    near = int(0.6 * n)
    which = rng.integers(0, 6, near)
    props = np.concatenate([_jitter(rng, objects[j], 1, 0.12) for j in which]
                           + [np.sort(rng.uniform(0, [w, h, w, h], (n - near, 4)).reshape(-1, 2, 2), 1)
                              .transpose(0, 2, 1).reshape(-1, 4)])
    props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
    props[:, :2] -= 4                             # some proposals reach outside the image
    logits = rng.normal(0, 1.5, (n, K))
    logits[:, 0] += 1.0
    logits[np.arange(near), obj_class[which]] += rng.uniform(1, 6, near)
    # A second class competes on some object boxes (per-class NMS keeps both).
    rival = np.arange(0, near, 3)
    logits[rival, obj_class[(which[rival] + 1) % 6]] += rng.uniform(1, 4, len(rival))
    deltas = np.concatenate([rng.normal(0, 1, (n, K, 2)), rng.normal(0, 1, (n, K, 2))], -1)
    # Shifted wholly right of the image by 3 widths (dx / 10 = 3): clipped to zero width.
    out = np.arange(near, near + 6)
    deltas[out, :, 0] = 30.0
    logits[out, 1 + out % (K - 1)] += 8
    # Tiny proposals in the middle with size deltas beyond the clamp: 62.5 x 1.5 px, not the image.
    tiny = np.arange(near + 6, near + 10)
    props[tiny] = [w / 2 - 0.75, h / 2 - 0.75, w / 2 + 0.75, h / 2 + 0.75]
    deltas[tiny, :, 2:] = 30.0                    # / 5 = 6 > log(1000 / 16) = 4.135
    logits[tiny, 1 + tiny % (K - 1)] += 8
    return props.astype(np.float32), logits.astype(np.float32), deltas.astype(np.float32)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    per_image = [_image_inputs(rng, h, w, n) for (h, w), n in zip(IMAGE_HW, NUM_PROPOSALS)]
    b = len(IMAGE_HW)
    proposals = np.zeros((b, R, 4), np.float32)
    logits = np.zeros((b, R, K), np.float32)
    deltas = np.zeros((b, R, K, 4), np.float32)
    valid = np.zeros((b, R), bool)
    # Padding rows: a confident, well-placed box each, which a missing validity mask would keep.
    proposals[:] = [10, 10, 60, 60]
    logits[:, :, 5] = 10.0
    for i, ((p, lg, d), n) in enumerate(zip(per_image, NUM_PROPOSALS)):
        proposals[i, :n], logits[i, :n], deltas[i, :n], valid[i, :n] = p, lg, d, True
    return proposals, logits, deltas, valid


def _torchvision(proposals, logits, deltas, valid, *, score_thresh, nms_thresh, detections_per_img):
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, nms_thresh,
                     detections_per_img)
    assert heads.box_coder.weights == BOX_WEIGHTS                  # torchvision's default
    assert heads.box_coder.bbox_xform_clip == np.log(1000.0 / 16)
    v = [torch.from_numpy(m) for m in valid]
    t_logits = torch.cat([torch.from_numpy(lg)[m] for lg, m in zip(logits, v)])
    t_deltas = torch.cat([torch.from_numpy(d)[m].reshape(-1, K * 4) for d, m in zip(deltas, v)])
    props = [torch.from_numpy(p)[m] for p, m in zip(proposals, v)]
    with torch.no_grad():
        boxes, scores, labels = heads.postprocess_detections(t_logits, t_deltas, props, IMAGE_HW)
    return heads, props, t_logits, t_deltas, [(b.numpy(), s.numpy(), lb.numpy())
                                              for b, s, lb in zip(boxes, scores, labels)]


def _assert_not_degenerate(heads, props, logits, deltas, score_thresh, nms_thresh, detections_per_img):
    """Each step of postprocess_detections changes something, and no two candidates nearly tie."""
    boxes = heads.box_coder.decode(deltas, props)
    scores = torch.softmax(logits, -1)
    start, truncated = 0, []
    for i, (p, hw) in enumerate(zip(props, IMAGE_HW)):
        sl = slice(start, start + len(p))
        start += len(p)
        raw = boxes[sl, 1:].reshape(-1, 4)
        s = scores[sl, 1:].reshape(-1)
        lab = torch.arange(1, K).repeat(len(p))
        cand = s > score_thresh
        assert float(s[cand].max() - s[cand].min()) > 0.5, 'scores do not spread'
        gaps = np.diff(np.sort(s[cand].numpy()))
        assert gaps.min() > 1e-6, f'image {i}: candidate scores tie within {gaps.min():.1e}'
        outside = (raw[:, 0] < 0) | (raw[:, 1] < 0) | (raw[:, 2] > hw[1]) | (raw[:, 3] > hw[0])
        assert bool((outside & cand).any()), 'no candidate reaches outside its image'
        clipped = box_ops.clip_boxes_to_image(raw, hw)
        keep = box_ops.remove_small_boxes(clipped[cand], 1e-2)
        assert len(keep) < int(cand.sum()), f'image {i}: the min-size filter removes nothing'
        b, sc, lb = clipped[cand][keep], s[cand][keep], lab[cand][keep]
        per_class = box_ops.batched_nms(b, sc, lb, nms_thresh)
        assert len(per_class) < 0.8 * len(b), f'image {i}: NMS suppresses little'
        assert len(box_ops.nms(b, sc, nms_thresh)) < len(per_class), 'class-agnostic NMS would agree'
        assert len(set(lb[per_class[:detections_per_img]].tolist())) >= 4, 'too few classes detected'
        truncated.append(len(per_class) > detections_per_img)
    return truncated


CASES = {
    # torchvision's COCO inference settings; detections_per_img truncates
    'tv_defaults': dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=100),
    # fewer detections than detections_per_img survive (padded rows)
    'padded_output': dict(score_thresh=0.2, nms_thresh=0.3, detections_per_img=100),
}


@pytest.mark.parametrize('case', list(CASES))
def test_postprocess_detections_matches_torchvision(case):
    kw = CASES[case]
    proposals, logits, deltas, valid = _inputs()
    heads, props, t_logits, t_deltas, ref = _torchvision(proposals, logits, deltas, valid, **kw)
    truncated = _assert_not_degenerate(heads, props, t_logits, t_deltas, kw['score_thresh'], kw['nms_thresh'],
                                       kw['detections_per_img'])
    assert all(truncated) if case == 'tv_defaults' else not any(truncated)

    fn = jax.jit(functools.partial(postprocess_detections, box_weights=BOX_WEIGHTS, pre_nms_candidates=4096,
                                   min_size=1e-2, **kw))
    out = jax.tree_util.tree_map(np.asarray, fn(logits, deltas, proposals, valid, np.asarray(IMAGE_HW, np.float32)))
    d = kw['detections_per_img']
    assert out['boxes'].shape == (2, d, 4) and out['labels'].shape == out['valid'].shape == (2, d)

    for i, (tv_boxes, tv_scores, tv_labels) in enumerate(ref):
        n = len(tv_scores)
        assert out['valid'][i].sum() == n, f'image {i}: {out["valid"][i].sum()} detections vs torchvision {n}'
        assert out['valid'][i, :n].all(), 'valid rows come first'
        # Candidates never tie within 1e-6 (asserted above): the order must be torchvision's.
        perm = align_ties(out['scores'][i, :n], tv_scores, out['boxes'][i, :n], tv_boxes, tie=1e-6)
        np.testing.assert_array_equal(perm, np.arange(n))
        np.testing.assert_array_equal(out['labels'][i, :n], tv_labels)
        np.testing.assert_allclose(out['scores'][i, :n], tv_scores, atol=1e-6, rtol=0)
        np.testing.assert_allclose(out['boxes'][i, :n], tv_boxes, atol=1e-4, rtol=0)
        pad = ~out['valid'][i]
        assert (out['scores'][i, pad] == 0).all() and (out['labels'][i, pad] == 0).all()
        assert (out['boxes'][i, pad] == 0).all()

    # The clamped tiny proposals are detected at 62.5 x their 1.5 px, not clipped to the image.
    widths = out['boxes'][..., 2] - out['boxes'][..., 0]
    assert np.isclose(widths[out['valid']], 1.5 * 1000 / 16, rtol=1e-4).sum() >= 2
