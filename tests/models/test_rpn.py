"""`select_proposals` (mrcnn_jax/models/rpn.py) against torchvision's own
`RegionProposalNetwork.filter_proposals`, on the same inputs.

torchvision decodes every anchor with its RPN BoxCoder (weights 1, 1, 1, 1; dw, dh clamped at
log(1000/16)), then `filter_proposals` takes the `pre_nms_top_n` best objectness *logits* per
level, applies the sigmoid, clips each image's boxes to its own size, removes boxes with a side
< min_size, runs NMS per level (batched_nms on level ids) and keeps the `post_nms_top_n` best
per image. We give `select_proposals` the same per-level logits, deltas and anchors and compare
count, order, scores and boxes image by image.

Inputs are in a trained network's regime: a padded batch of two images of different valid sizes,
torchvision's anchors on five levels of different sizes (including the P6 stride quirk), logits
with no ties that cluster on a few "objects" (so NMS suppresses a lot, and suppresses differently
per level than across levels), small deltas, boxes partly outside their image, and boxes that the
min-size filter removes (anchors that lie in the other image's padding, shrunken boxes). Each
case asserts first that every one of those steps changes the result, so the comparison cannot
pass by luck.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

import jax  # noqa: E402
from torchvision.models.detection import _utils as det_utils  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead  # noqa: E402
from torchvision.ops import boxes as box_ops  # noqa: E402

from mrcnn_jax.models.rpn import select_proposals  # noqa: E402
from references import align_ties  # noqa: E402

PADDED_HW = (128, 160)
IMAGE_HW = [(128, 150), (101, 160)]      # valid sizes in the padded batch
GRIDS = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]   # strides 4..32, then P6: 128 // 2, 160 // 3
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5


def _anchors():
    """torchvision's anchors for the padded batch: [N, 4] (the same for both images), per-level counts."""
    images = ImageList(torch.zeros(len(IMAGE_HW), 3, *PADDED_HW), IMAGE_HW)
    feats = [torch.zeros(len(IMAGE_HW), 1, h, w) for h, w in GRIDS]
    anchors = AnchorGenerator(SIZES, RATIOS)(images, feats)
    counts = [h * w * len(RATIOS[0]) for h, w in GRIDS]
    assert all(torch.equal(a, anchors[0]) for a in anchors)
    return anchors[0].numpy(), counts


def _inputs(seed: int = 0):
    """objectness [B, N] logits, deltas [B, N, 4], anchors [N, 4], per-level counts."""
    anchors, counts = _anchors()
    rng = np.random.default_rng(seed)
    n = len(anchors)
    logits, deltas = [], []
    for h, w in IMAGE_HW:
        # Desirability: high near a few object boxes, plus noise; the logits are an evenly spaced
        # grid over (-4, 4) assigned in that order, so no two logits (or sigmoids) tie.
        xy = rng.uniform([0, 0], [w - 20, h - 20], (6, 2))
        objects = np.concatenate([xy, xy + rng.uniform(20, 90, (6, 2))], 1).astype(np.float32)
        iou = box_ops.box_iou(torch.from_numpy(anchors), torch.from_numpy(objects)).numpy().max(1)
        order = np.argsort(3 * iou + rng.normal(0, 0.7, n), kind='stable')
        lg = np.empty(n, np.float32)
        lg[order] = np.linspace(-4, 4, n, dtype=np.float32)
        logits.append(lg)
        d = np.concatenate([rng.normal(0, 0.1, (n, 2)), rng.normal(0, 0.2, (n, 2))], 1)
        shrink = rng.random(n) < 0.05           # ~1/30 of the anchor's side: tiny boxes
        d[shrink, 2 + rng.integers(0, 2, shrink.sum())] = -3.5
        deltas.append(d.astype(np.float32))
    return np.stack(logits), np.stack(deltas), anchors, counts


def _torchvision(logits, deltas, anchors, counts, *, pre_nms_topk, post_nms_topk, nms_thresh, min_size):
    """filter_proposals as RegionProposalNetwork.forward calls it in eval mode."""
    rpn = RegionProposalNetwork(
        AnchorGenerator(SIZES, RATIOS), RPNHead(8, 3), 0.7, 0.3, 256, 0.5,
        pre_nms_top_n={'training': 1, 'testing': pre_nms_topk},
        post_nms_top_n={'training': 1, 'testing': post_nms_topk},
        nms_thresh=nms_thresh, score_thresh=0.0).eval()
    rpn.min_size = min_size                   # torchvision hard-codes 1e-3 in __init__
    b = len(IMAGE_HW)
    t_anchors = [torch.from_numpy(anchors)] * b
    # concat_box_prediction_layers' layout: [B * N, 4], image-major, then level, then (y, x, a).
    proposals = rpn.box_coder.decode(torch.from_numpy(deltas).reshape(-1, 4), t_anchors).view(b, -1, 4)
    assert rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert rpn.box_coder.bbox_xform_clip == np.log(1000.0 / 16)
    with torch.no_grad():
        boxes, scores = rpn.filter_proposals(proposals, torch.from_numpy(logits), IMAGE_HW, counts)
    return rpn, proposals, [x.numpy() for x in boxes], [x.numpy() for x in scores]


def _assert_not_degenerate(rpn, proposals, logits, counts, min_size, nms_thresh, post_nms_topk):
    """Every step of filter_proposals changes something for these inputs."""
    obj = torch.from_numpy(logits)
    top = rpn._get_top_n_idx(obj, counts)
    levels = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    truncated = []
    for i, (h, w) in enumerate(IMAGE_HW):
        raw = proposals[i, top[i]]
        assert bool(((raw[:, 0] < 0) | (raw[:, 1] < 0) | (raw[:, 2] > w) | (raw[:, 3] > h)).any()), \
            'no candidate box reaches outside its image'
        boxes = box_ops.clip_boxes_to_image(raw, (h, w))
        keep = box_ops.remove_small_boxes(boxes, min_size)
        assert len(keep) < len(boxes), f'image {i}: min_size {min_size} removes nothing'
        boxes, scores, lvl = boxes[keep], torch.sigmoid(obj[i, top[i]][keep]), levels[top[i]][keep]
        per_level = box_ops.batched_nms(boxes, scores, lvl, nms_thresh)
        assert len(per_level) < 0.8 * len(boxes), f'image {i}: NMS suppresses little'
        assert len(box_ops.nms(boxes, scores, nms_thresh)) < len(per_level), \
            f'image {i}: NMS across levels would keep the same boxes'
        truncated.append(len(per_level) > post_nms_topk)
    return truncated


CASES = {
    # torchvision's test-time NMS threshold and min size; post-NMS top-k truncates
    'tv_defaults': dict(pre_nms_topk=300, post_nms_topk=200, nms_thresh=0.7, min_size=1e-3),
    # fewer proposals survive than post_nms_topk (padded rows); a min size that removes tiny boxes
    'padded_output': dict(pre_nms_topk=150, post_nms_topk=1000, nms_thresh=0.5, min_size=2.0),
}


@pytest.mark.parametrize('case', list(CASES))
def test_select_proposals_matches_torchvision_filter_proposals(case):
    kw = CASES[case]
    logits, deltas, anchors, counts = _inputs()
    rpn, proposals, tv_boxes, tv_scores = _torchvision(logits, deltas, anchors, counts, **kw)
    truncated = _assert_not_degenerate(rpn, proposals, logits, counts, kw['min_size'], kw['nms_thresh'],
                                       kw['post_nms_topk'])
    assert all(truncated) if case == 'tv_defaults' else not any(truncated)

    ends = np.cumsum(counts)
    starts = ends - np.asarray(counts)
    per_level = [slice(int(s), int(e)) for s, e in zip(starts, ends)]
    fn = jax.jit(functools.partial(select_proposals, **kw))
    boxes, scores, valid = jax.tree_util.tree_map(np.asarray, fn(
        [logits[:, sl] for sl in per_level], [deltas[:, sl] for sl in per_level],
        [anchors[None, sl] for sl in per_level], [np.ones((1, sl.stop - sl.start), bool) for sl in per_level],
        np.asarray(IMAGE_HW, np.float32)))
    assert boxes.shape == (2, kw['post_nms_topk'], 4) and scores.shape == valid.shape == (2, kw['post_nms_topk'])

    for i in range(len(IMAGE_HW)):
        n = len(tv_scores[i])
        assert valid[i].sum() == n, f'image {i}: {valid[i].sum()} proposals vs torchvision {n}'
        assert valid[i, :n].all(), 'valid rows come first'
        # No two logits tie (see _inputs), so the order must match; align_ties would only allow
        # swaps of rows within 1e-6 of each other.
        perm = align_ties(scores[i, :n], tv_scores[i], boxes[i, :n], tv_boxes[i], tie=1e-6)
        np.testing.assert_array_equal(perm, np.arange(n))
        np.testing.assert_allclose(scores[i, :n], tv_scores[i], atol=1e-6, rtol=0)
        np.testing.assert_allclose(boxes[i, :n], tv_boxes[i], atol=1e-4, rtol=0)
        assert (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all(), 'padding rows are zero'


def test_rpn_decode_has_unit_weights_and_the_clamp():
    """Inside select_proposals, decoding is torchvision's RPN BoxCoder((1, 1, 1, 1)) with dw, dh
    clamped at log(1000/16). After clipping to a small image the clamp is invisible, so this
    compares boxes far inside a huge image, with size deltas beyond the clamp."""
    rng = np.random.default_rng(1)
    m = 64
    ctr = rng.uniform(30000, 70000, (m, 2))
    half = rng.uniform(5, 20, (m, 2))
    anchors = np.concatenate([ctr - half, ctr + half], 1).astype(np.float32)
    deltas = np.concatenate([rng.normal(0, 0.1, (m, 2)), rng.normal(0, 0.2, (m, 2))], 1).astype(np.float32)
    deltas[:16, 2:] = rng.uniform(4.5, 8, (16, 2))          # beyond log(1000/16) = 4.135
    logits = np.linspace(-2, 2, m, dtype=np.float32)[rng.permutation(m)]
    coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))      # RegionProposalNetwork's
    ref = coder.decode(torch.from_numpy(deltas), [torch.from_numpy(anchors)]).view(-1, 4).numpy()
    np.testing.assert_allclose(ref[:16, 2] - ref[:16, 0], (anchors[:16, 2] - anchors[:16, 0]) * 1000 / 16,
                               rtol=1e-4)
    boxes, scores, valid = select_proposals(
        [logits[None]], [deltas[None]], [anchors[None]], [np.ones((1, m), bool)],
        np.asarray([[1e5, 1e5]], np.float32), pre_nms_topk=m, post_nms_topk=m, nms_thresh=1.0, min_size=0.0)
    assert np.asarray(valid).all()
    order = np.argsort(-logits, kind='stable')
    np.testing.assert_allclose(np.asarray(boxes)[0], ref[order], rtol=0, atol=0.02)   # ulp(7e4) = 0.008
    np.testing.assert_allclose(np.asarray(scores)[0], 1 / (1 + np.exp(-logits[order])), rtol=0, atol=1e-6)
