"""Training targets (mrcnn_jax/training/targets.py) against torchvision's reference pieces.

  * `match` vs torchvision's `Matcher` (0.7 / 0.3 with low-quality matches, 0.5 / 0.5 without) on
    random IoU matrices with ties, padded / crowd / degenerate GT rows, invalid candidates, and
    images without usable GT (all background);
  * `sample_balanced`: counts, order, eligibility, no duplicates, per-key randomness, uniformity;
  * `anchor_targets` / `roi_targets`: labels and encoded targets vs torchvision's Matcher and
    `BoxCoder.encode`; degenerate and crowd GT take no part;
  * `mask_targets`: exact on constructed cases, and close to torchvision's
    `project_masks_on_boxes` (RoIAlign of the full mask) on real COCO masks, through the input
    pipeline's box-cropped 112 x 112 masks.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.training import targets as tgt

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')
from torchvision.models.detection._utils import BoxCoder, Matcher  # noqa: E402
from torchvision.models.detection.roi_heads import project_masks_on_boxes  # noqa: E402


# Jitted once per shape (eager calls would compile every op separately).
_match = jax.jit(tgt.match, static_argnames=('fg_thresh', 'bg_thresh', 'allow_low_quality'))
_sample = jax.jit(tgt.sample_balanced, static_argnames=('num', 'positive_fraction'))
_anchor_targets = jax.jit(tgt.anchor_targets)
_roi_targets = jax.jit(tgt.roi_targets)
_mask_targets = jax.jit(tgt.mask_targets, static_argnames=('resolution', 'soft'))


def _tv_match(iou: np.ndarray, fg: float, bg: float, low_quality: bool) -> np.ndarray:
    return Matcher(fg, bg, low_quality)(torch.from_numpy(iou.copy())).numpy()


def _random_iou(rng, g, n, levels=None):
    """[g, n] IoU-like values in [0, 1); `levels` quantizes them (creates ties)."""
    iou = rng.uniform(0, 1, (g, n)).astype(np.float32) ** 2
    iou[rng.uniform(size=(g, n)) < 0.5] = 0.0
    if levels:
        iou = np.floor(iou * levels) / levels
    return iou.astype(np.float32)


def _random_boxes(rng, n, size=200.0, min_wh=4.0, max_wh=80.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# match

@pytest.mark.parametrize('fg,bg,low_quality', [(0.7, 0.3, True), (0.5, 0.5, False)])
@pytest.mark.parametrize('levels', [None, 10])
def test_match_equals_torchvision_matcher(fg, bg, low_quality, levels):
    rng = np.random.default_rng(0)
    for g, n in [(1, 30), (5, 200), (12, 500)]:
        iou = _random_iou(rng, g, n, levels)
        iou[:, 0] = iou[:, 1]       # ties across candidates for a GT's best
        iou[0, 3] = iou[1 % g, 3]   # and across GT for a candidate
        ours = np.asarray(_match(iou, np.ones(g, bool), np.ones(n, bool), fg, bg, low_quality))
        np.testing.assert_array_equal(ours, _tv_match(iou, fg, bg, low_quality))
        assert (ours >= 0).any() and (ours == tgt.BELOW_LOW).any()
        if fg != bg:
            assert (ours == tgt.BETWEEN).any()


def test_match_ties_take_the_first_gt():
    iou = np.asarray([[0.8, 0.2, 0.5], [0.8, 0.2, 0.5], [0.1, 0.2, 0.5]], np.float32)
    ours = np.asarray(_match(iou, np.ones(3, bool), np.ones(3, bool), 0.7, 0.3, True))
    np.testing.assert_array_equal(ours, _tv_match(iou, 0.7, 0.3, True))
    np.testing.assert_array_equal(ours, [0, tgt.BELOW_LOW, 0])   # candidate 2: GT 2's best, matched to GT 0


def test_low_quality_matches_restore_every_tied_best_candidate():
    # GT 0's best IoU 0.4 is shared by candidates 1 and 2 (both below fg): both become positive.
    iou = np.asarray([[0.1, 0.4, 0.4, 0.0], [0.0, 0.0, 0.2, 0.25]], np.float32)
    ours = np.asarray(_match(iou, np.ones(2, bool), np.ones(4, bool), 0.7, 0.3, True))
    np.testing.assert_array_equal(ours, _tv_match(iou, 0.7, 0.3, True))
    np.testing.assert_array_equal(ours, [tgt.BELOW_LOW, 0, 0, 1])


@pytest.mark.parametrize('fg,bg,low_quality', [(0.7, 0.3, True), (0.5, 0.5, False)])
def test_match_ignores_padded_crowd_and_degenerate_gt(fg, bg, low_quality):
    """Unusable GT rows (padding, crowd, zero-size boxes) may hold any IoU; the result is
    torchvision's Matcher on the usable rows only, indices mapped back."""
    rng = np.random.default_rng(1)
    g, n = 10, 300
    boxes = _random_boxes(rng, g)
    valid = np.ones(g, bool)
    crowd = np.zeros(g, bool)
    valid[[7, 8, 9]] = False            # padding rows
    crowd[2] = True
    boxes[4, 2] = boxes[4, 0]           # zero width
    boxes[5, 3] = boxes[5, 1]           # zero height
    ok = np.asarray(tgt.usable_gt(jnp.asarray(boxes), jnp.asarray(valid), jnp.asarray(crowd)))
    np.testing.assert_array_equal(np.flatnonzero(ok), [0, 1, 3, 6])
    iou = _random_iou(rng, g, n)
    iou[~ok] = 0.99                      # would win everything if they took part
    ours = np.asarray(_match(iou, ok, np.ones(n, bool), fg, bg, low_quality))
    ref = _tv_match(iou[ok], fg, bg, low_quality)
    kept = np.flatnonzero(ok)
    np.testing.assert_array_equal(ours, np.where(ref >= 0, kept[np.maximum(ref, 0)], ref))


def test_match_invalid_candidates_are_ignored():
    rng = np.random.default_rng(2)
    iou = _random_iou(rng, 4, 100)
    cand_ok = rng.uniform(size=100) < 0.7
    iou[:, ~cand_ok] = 0.95             # e.g. anchors outside the padded image
    ours = np.asarray(_match(iou, np.ones(4, bool), cand_ok, 0.7, 0.3, True))
    assert (ours[~cand_ok] == tgt.BETWEEN).all()
    # A GT's best IoU (for low-quality matches) is taken over valid candidates only.
    np.testing.assert_array_equal(ours[cand_ok], _tv_match(iou[:, cand_ok], 0.7, 0.3, True))


@pytest.mark.parametrize('low_quality', [True, False])
def test_match_without_usable_gt_is_all_background(low_quality):
    """torchvision's empty-target branch: every candidate is background (not ignored)."""
    iou = _random_iou(np.random.default_rng(3), 3, 50) + 0.5
    ours = np.asarray(_match(iou, np.zeros(3, bool), np.ones(50, bool), 0.7, 0.3, low_quality))
    assert (ours == tgt.BELOW_LOW).all()


def test_match_gt_without_overlap_adds_no_low_quality_matches():
    """Documented deviation: torchvision restores every candidate tied at a GT's best IoU even
    when that best is 0 (all non-overlapping candidates become foreground); we require > 0."""
    iou = np.asarray([[0.8, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    ours = np.asarray(_match(iou, np.ones(2, bool), np.ones(4, bool), 0.7, 0.3, True))
    np.testing.assert_array_equal(ours, [0, tgt.BELOW_LOW, tgt.BELOW_LOW, tgt.BELOW_LOW])
    np.testing.assert_array_equal(_tv_match(iou, 0.7, 0.3, True), [0, 0, 0, 0])


def test_match_nan_iou_is_no_overlap():
    iou = np.asarray([[np.nan, 0.9, 0.1]], np.float32)    # 0/0 of two empty boxes
    ours = np.asarray(_match(iou, np.ones(1, bool), np.ones(3, bool), 0.7, 0.3, True))
    np.testing.assert_array_equal(ours, [tgt.BELOW_LOW, 0, tgt.BELOW_LOW])


# ---------------------------------------------------------------------------------------------
# sample_balanced

def _check_sample(idx, is_pos, w, positive, negative, num, fraction):
    idx, is_pos, w = map(np.asarray, (idx, is_pos, w))
    assert idx.shape == is_pos.shape == w.shape == (num,)
    assert idx.dtype == np.int32 and w.dtype == np.float32
    valid = w > 0
    n_valid, n_pos = int(valid.sum()), int(is_pos.sum())
    assert (w[valid] == 1).all()
    assert not (is_pos & ~valid).any()
    # Order: positives, then negatives, then padding.
    assert is_pos[:n_pos].all() and valid[:n_valid].all() and not valid[n_valid:].any()
    assert len(np.unique(idx[valid])) == n_valid, 'duplicates'
    assert positive[idx[:n_pos]].all()
    assert negative[idx[n_pos:n_valid]].all()
    max_pos = int(num * fraction)
    assert n_pos == min(max_pos, positive.sum())
    assert n_valid - n_pos == min(num - n_pos, negative.sum())
    return idx[:n_pos], idx[n_pos:n_valid]


@pytest.mark.parametrize('num_pos,num_neg', [(500, 500), (10, 500), (0, 500), (10, 20), (0, 0), (300, 3)])
def test_sample_balanced_counts_order_eligibility(num_pos, num_neg):
    rng = np.random.default_rng(num_pos + num_neg)
    n = 1200
    perm = rng.permutation(n)
    positive = np.zeros(n, bool)
    negative = np.zeros(n, bool)
    positive[perm[:num_pos]] = True
    negative[perm[num_pos:num_pos + num_neg]] = True     # the rest: ignored
    for num, fraction in [(256, 0.5), (512, 0.25)]:
        out = _sample(jax.random.PRNGKey(7), jnp.asarray(positive), jnp.asarray(negative),
                                  num, fraction)
        _check_sample(*out, positive, negative, num, fraction)


def test_sample_balanced_fewer_candidates_than_num():
    positive = np.asarray([1, 0, 0, 1, 0, 0], bool)
    negative = np.asarray([0, 1, 1, 0, 0, 1], bool)
    out = _sample(jax.random.PRNGKey(0), jnp.asarray(positive), jnp.asarray(negative), 16, 0.5)
    pos, neg = _check_sample(*out, positive, negative, 16, 0.5)
    assert sorted(pos) == [0, 3] and sorted(neg) == [1, 2, 5]


def test_sample_balanced_keys():
    rng = np.random.default_rng(0)
    positive = rng.uniform(size=2000) < 0.2
    negative = ~positive & (rng.uniform(size=2000) < 0.8)
    fn = jax.jit(lambda k: tgt.sample_balanced(k, positive, negative, 256, 0.5))
    a, b = fn(jax.random.PRNGKey(1)), fn(jax.random.PRNGKey(2))
    again = fn(jax.random.PRNGKey(1))
    for x, y in zip(a, again):
        np.testing.assert_array_equal(x, y)
    assert set(np.asarray(a[0][:128]).tolist()) != set(np.asarray(b[0][:128]).tolist())
    assert set(np.asarray(a[0][128:]).tolist()) != set(np.asarray(b[0][128:]).tolist())
    # vmapped over a batch with one key per image (as the loss does): different samples.
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    idx = np.asarray(jax.vmap(lambda k: tgt.sample_balanced(k, positive, negative, 256, 0.5)[0])(keys))
    assert set(idx[0].tolist()) != set(idx[1].tolist())


def test_sample_balanced_is_uniform():
    """Each eligible positive (negative) is chosen with the same probability."""
    n = 60
    positive = np.arange(n) < 20
    negative = np.arange(n) >= 30
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    idx, _, w = jax.vmap(lambda k: tgt.sample_balanced(k, positive, negative, 16, 0.25))(keys)
    idx, w = np.asarray(idx), np.asarray(w)
    counts = np.bincount(idx[w > 0], minlength=n) / len(keys)
    np.testing.assert_allclose(counts[:20], 4 / 20, atol=0.04)      # 4 of 20 positives
    np.testing.assert_allclose(counts[30:], 12 / 30, atol=0.05)     # 12 of 30 negatives
    assert (counts[20:30] == 0).all()


# ---------------------------------------------------------------------------------------------
# anchor and RoI targets

def _image_boxes(seed):
    """(rng, 3000 candidate boxes: random ones and GT boxes jittered by ~10%, 8 GT boxes)."""
    rng = np.random.default_rng(seed)
    gt = _random_boxes(rng, 8, 200, 20, 60)
    near = np.repeat(gt, 25, 0)
    wh = near[:, 2:] - near[:, :2]
    near = near + rng.normal(0, 0.1, near.shape) * np.concatenate([wh, wh], 1)
    cands = np.concatenate([_random_boxes(rng, 3000 - len(near), 256, 8, 128), near]).astype(np.float32)
    return rng, cands[rng.permutation(len(cands))], gt


def test_anchor_targets_vs_torchvision():
    _, anchors, gt = _image_boxes(0)
    gt_ok = np.ones(len(gt), bool)
    gt_ok[6:] = False                          # padding
    t = _anchor_targets(jax.random.PRNGKey(0), anchors, np.ones(len(anchors), bool), gt, gt_ok)
    idx, labels, w, targets = map(np.asarray, t)
    iou = box_ops.pairwise_iou(jnp.asarray(gt[:6]), jnp.asarray(anchors))
    ref = _tv_match(np.asarray(iou), 0.7, 0.3, True)
    pos = (labels == 1) & (w > 0)
    neg = (labels == 0) & (w > 0)
    assert pos.sum() >= 10 and w.sum() == 256
    assert (ref[idx[pos]] >= 0).all() and (ref[idx[neg]] == Matcher.BELOW_LOW_THRESHOLD).all()
    if pos.sum() < 128:
        assert pos.sum() == (ref >= 0).sum()
    enc = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(torch.from_numpy(gt[ref[idx[pos]]]),
                                                        torch.from_numpy(anchors[idx[pos]])).numpy()
    np.testing.assert_allclose(targets[pos], enc, rtol=1e-5, atol=1e-5)
    assert (targets[~pos] == 0).all()


def test_roi_targets_vs_torchvision():
    _, props, gt = _image_boxes(1)
    props = props[:1500]
    p = len(props)
    prop_ok = np.ones(p, bool)
    prop_ok[1000:1200] = False                # padding proposal slots
    classes = np.asarray([3, 1, 7, 7, 2, 5, 0, 0], np.int32)
    gt_ok = classes > 0
    key = jax.random.PRNGKey(1)
    t = _roi_targets(key, props, prop_ok, gt, classes, gt_ok)
    rois, labels, w, targets, matched, indices = map(np.asarray, t)
    cands = np.concatenate([props[prop_ok], gt[gt_ok]])
    cand_index = np.concatenate([np.flatnonzero(prop_ok), p + np.flatnonzero(gt_ok)])
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt[gt_ok]), jnp.asarray(cands)))
    ref = _tv_match(iou, 0.5, 0.5, False)
    ref_of = dict(zip(cand_index.tolist(), ref.tolist()))
    all_cands = np.concatenate([props, gt])
    np.testing.assert_array_equal(rois, all_cands[indices])
    valid = w > 0
    pos = valid & (labels > 0)
    assert valid.sum() == 512 and 20 <= pos.sum() <= 128
    assert all(i in ref_of for i in indices[valid]), 'sampled an invalid candidate'
    m = np.asarray([ref_of[i] for i in indices[valid]])
    np.testing.assert_array_equal(labels[valid], np.where(m >= 0, classes[gt_ok][np.maximum(m, 0)], 0))
    np.testing.assert_array_equal(matched[pos], np.flatnonzero(gt_ok)[m[pos[valid]]])
    assert (indices[pos] >= p).sum() == gt_ok.sum(), 'every GT box is a positive candidate'
    assert pos.sum() == (ref >= 0).sum()       # fewer than 128: all positives are taken
    enc = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(torch.from_numpy(gt[matched[pos]]),
                                                          torch.from_numpy(rois[pos])).numpy()
    np.testing.assert_allclose(targets[pos], enc, rtol=1e-5, atol=1e-4)
    assert (targets[~pos] == 0).all()


def test_degenerate_gt_is_not_matched():
    """A zero-width GT over many anchors: the targets equal those without it."""
    _, anchors, gt = _image_boxes(2)
    gt_deg = gt.copy()
    gt_deg[0, 2] = gt_deg[0, 0]
    valid = np.ones(len(gt), bool)
    crowd = np.zeros(len(gt), bool)
    ok = np.asarray(tgt.usable_gt(gt_deg, valid, crowd))
    assert not ok[0] and ok[1:].all()
    key = jax.random.PRNGKey(0)
    a = _anchor_targets(key, anchors, np.ones(len(anchors), bool), gt_deg, ok)
    b = _anchor_targets(key, anchors, np.ones(len(anchors), bool), gt[1:], ok[1:])   # without it
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert float(np.asarray(a.labels).sum()) > 0
    r = _roi_targets(key, anchors[:1000], np.ones(1000, bool), gt_deg, np.arange(1, 9), ok)
    assert not (np.asarray(r.indices)[np.asarray(r.weights) > 0] == 1000).any(), 'degenerate GT sampled'
    assert not ((np.asarray(r.matched_gt) == 0) & (np.asarray(r.labels) > 0)).any()


@pytest.mark.parametrize('case', ['all_crowd', 'no_gt'])
def test_no_usable_gt_gives_no_positives(case):
    _, anchors, gt = _image_boxes(3)
    valid = np.full(len(gt), case == 'all_crowd')
    crowd = np.full(len(gt), case == 'all_crowd')
    ok = tgt.usable_gt(gt, valid, crowd)
    assert not np.asarray(ok).any()
    a = _anchor_targets(jax.random.PRNGKey(0), anchors, np.ones(len(anchors), bool), gt, ok)
    assert float(np.asarray(a.labels).sum()) == 0 and float(np.asarray(a.weights).sum()) == 256
    assert np.isfinite(np.asarray(a.box_targets)).all() and (np.asarray(a.box_targets) == 0).all()
    r = _roi_targets(jax.random.PRNGKey(0), anchors[:1000], np.ones(1000, bool), gt,
                        np.arange(1, 9), ok)
    assert (np.asarray(r.labels) == 0).all() and float(np.asarray(r.weights).sum()) == 512
    assert (np.asarray(r.indices)[np.asarray(r.weights) > 0] < 1000).all(), 'GT boxes are no candidates'
    assert np.isfinite(np.asarray(r.box_targets)).all()


# ---------------------------------------------------------------------------------------------
# mask targets

@pytest.mark.parametrize('soft', [True, False])
def test_mask_targets_full_box_mask(soft):
    """A GT mask that fills its box: 1 at RoI cells whose centre lies in the GT box, 0 elsewhere."""
    res = 28
    gt_box = np.asarray([[10.3, 20.1, 50.7, 44.9]], np.float32)
    rois = np.asarray([[0.0, 0.0, 64.0, 64.0], [30.0, 25.0, 80.0, 40.0], [12.0, 22.0, 48.0, 42.0]],
                      np.float32)
    out = np.asarray(_mask_targets(rois, np.repeat(gt_box, 3, 0), np.ones((3, 16, 16), np.uint8), res, soft))
    for r, roi in enumerate(rois):
        t = (np.arange(res) + 0.5) / res
        xs = roi[0] + t * (roi[2] - roi[0])
        ys = roi[1] + t * (roi[3] - roi[1])
        inside = ((ys[:, None] > gt_box[0, 1]) & (ys[:, None] < gt_box[0, 3])
                  & (xs[None, :] > gt_box[0, 0]) & (xs[None, :] < gt_box[0, 2]))
        np.testing.assert_array_equal(out[r], inside.astype(np.float32))
    assert out[2].all()


def test_mask_targets_roi_equal_to_gt_box_is_the_crop():
    rng = np.random.default_rng(0)
    crops = rng.uniform(size=(4, 28, 28)).astype(np.float32)
    boxes = _random_boxes(rng, 4)
    out = np.asarray(_mask_targets(boxes, boxes, crops, 28, soft=True))
    np.testing.assert_allclose(out, crops, atol=5e-5)
    # A crop at twice the resolution: each target cell is the mean of a 2 x 2 block's centre,
    # i.e. the bilinear value halfway between the four crop cells.
    crops2 = rng.uniform(size=(4, 56, 56)).astype(np.float32)
    out = np.asarray(_mask_targets(boxes, boxes, crops2, 28, soft=True))
    np.testing.assert_allclose(out, crops2.reshape(4, 28, 2, 28, 2).mean((2, 4)), atol=5e-5)
    binary = np.asarray(_mask_targets(boxes, boxes, crops2, 28, soft=False))
    np.testing.assert_array_equal(binary, (out >= 0.5).astype(np.float32))


def test_mask_targets_have_no_gradient():
    boxes = _random_boxes(np.random.default_rng(1), 2)
    g = jax.grad(lambda c: tgt.mask_targets(boxes, boxes, c).sum())(jnp.ones((2, 8, 8)))
    assert (np.asarray(g) == 0).all()


@pytest.fixture(scope='module')
def real_masks(shared_data):
    """GT of two COCO photos in the frame torchvision trains in (320-px short side), with
    torchvision's resized full masks and the input pipeline's 112 x 112 box crops."""
    from PIL import Image
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from mrcnn_jax.data.coco import segmentation_to_mask
    from mrcnn_jax.data.transforms import mask_targets as crop_masks
    root = shared_data / 'coco128_seg'
    ann = json.loads((root / 'annotations.json').read_text())
    transform = GeneralizedRCNNTransform(320, 512, [0.0] * 3, [1.0] * 3).train()
    out = []
    for name in ('000000000110.jpg', '000000000397.jpg'):
        entry = next(i for i in ann['images'] if i['file_name'] == name)
        h, w = entry['height'], entry['width']
        objs = [a for a in ann['annotations'] if a['image_id'] == entry['id'] and not a['iscrowd']]
        boxes = np.asarray([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                             a['bbox'][1] + a['bbox'][3]] for a in objs], np.float32)
        masks = np.stack([segmentation_to_mask(a['segmentation'], h, w) for a in objs])
        image = np.array(Image.open(root / 'images' / name).convert('RGB'))
        image = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        target = {'boxes': torch.from_numpy(boxes), 'masks': torch.from_numpy(masks),
                  'labels': torch.ones(len(boxes), dtype=torch.int64)}
        _, t = transform([image], [target])
        crops = np.asarray(crop_masks(masks, boxes, 112))
        out.append((t[0]['boxes'].numpy(), t[0]['masks'], crops))
    return out


def test_mask_targets_approximate_torchvision_on_real_masks(real_masks):
    """Ours sample the 112 x 112 box crop; torchvision RoIAligns the full (nearest-resized) mask
    with aligned=False, i.e. half a pixel off and averaging 2 x 2 samples per cell. Proposal-like
    RoIs (GT boxes jittered to IoU >= 0.5) over all instances of two photos."""
    rng = np.random.default_rng(0)
    ious, diffs, areas = [], [], []
    for gt_boxes, full_masks, crops in real_masks:
        n = len(gt_boxes)
        for _ in range(4):
            wh = gt_boxes[:, 2:] - gt_boxes[:, :2]
            jitter = rng.uniform(-0.12, 0.12, (n, 4)) * np.concatenate([wh, wh], 1)
            rois = (gt_boxes + jitter).astype(np.float32)
            keep = np.diag(np.asarray(box_ops.pairwise_iou(rois, gt_boxes))) >= 0.5
            rois = rois[keep]
            idx = np.flatnonzero(keep)
            ours = np.asarray(_mask_targets(rois, gt_boxes[idx], crops[idx], 28, soft=True))
            theirs = project_masks_on_boxes(full_masks, torch.from_numpy(rois), torch.from_numpy(idx), 28)
            theirs = theirs.numpy()
            for a, b in zip(ours, theirs):
                a, b = a >= 0.5, b >= 0.5
                union = (a | b).sum()
                ious.append(1.0 if union == 0 else (a & b).sum() / union)
            diffs.append(np.abs(ours - theirs).mean((1, 2)))
            areas.append(np.prod(wh[idx], 1))
    ious, diffs, areas = np.asarray(ious), np.concatenate(diffs), np.concatenate(areas)
    assert len(ious) > 80
    big = areas >= 32 * 32                   # COCO medium and large objects
    assert ious[big].mean() > 0.95 and ious[big].min() > 0.85, (ious[big].mean(), ious[big].min())
    assert ious.mean() > 0.9, ious.mean()
    assert diffs.mean() < 0.05 and diffs[big].max() < 0.08, (diffs.mean(), diffs[big].max())
