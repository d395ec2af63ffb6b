"""Loss parity with torchvision's Mask R-CNN in train mode: same weights, images, targets, samples.

torchvision (ResNet-18 FPN with narrower box / mask heads, FrozenBN, random but calibrated weights:
tests/tv_reference.py, plus mask logits scaled to a trained head's range) runs
`model(images, targets)` in train mode on two real photos (640 x 480 -> 320 x 426, padded to
320 x 448: our canvas). Our loss function (`make_loss_fn(..., with_targets=True)`) runs first on
torchvision's own normalized input tensor; then torchvision's randomness is replaced by our choices:
  * `rpn.fg_bg_sampler` and `roi_heads.fg_bg_sampler` select the anchors / RoIs we sampled (anchor
    order is the same in both; our RoI candidates [P proposal slots, G GT slots] map onto
    torchvision's [proposals, GT] by matching proposal boxes, after asserting the two proposal
    sets are equal). The fake samplers also assert that torchvision labels every index we chose
    as we did (positive with the same class / negative), i.e. that the two matchers agree;
  * `roi_heads.project_masks_on_boxes` returns our mask targets: ours are sampled from box-cropped
    112 x 112 GT masks by design, torchvision's from the full mask (tests/training/test_targets.py
    compares the two); here we test the loss *function*.
Our GT additionally holds a crowd box, a zero-width box and padding rows, which torchvision never
sees: they must not change any loss.
The model also carries Keypoint R-CNN's branch (torchvision's keypoint RoI pool, head and
predictor on the same RoIHeads, which runs both branches): every GT instance has 17 keypoints,
some unlabelled (v = 0), some outside the box and some exactly on its right or bottom edge
(`keypoints_to_heatmap`'s boundary rule), and `loss_keypoint` is compared like the others,
targets included (torchvision computes its own heatmap targets from the same positive RoIs).
Asserted: every loss term within 1e-4 relative, and gradients of parameters across the network
(backbone layer4, FPN, RPN head, box head, predictor, mask head) within 1e-3 relative to the
largest entry, in the converted (Flax) layout. The comparison is checked to be non-degenerate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

import flax  # noqa: E402
import jax  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.models.detection import roi_heads as tv_roi_heads  # noqa: E402

from mrcnn_jax.convert.torchvision import (  # noqa: E402
    _expected_torch_keys, convert_state_dict, model_config_from_state_dict)
from mrcnn_jax.models.mask_rcnn import MaskRCNN, build_model  # noqa: E402
from mrcnn_jax.training.losses import LossSettings, make_loss_fn  # noqa: E402
from tv_reference import build_torchvision_maskrcnn, image_to_tensor  # noqa: E402

PHOTOS = ('000000000110.jpg', '000000000397.jpg')   # both 640 x 480, 24 and 7 instances, 6-7 classes
MIN_SIZE, MAX_SIZE = 320, 512
MAX_INSTANCES = 32
MASK_SIZE = 112
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_KEYS = (
    'backbone.body.layer4.1.conv2.weight',
    'backbone.body.layer2.0.conv1.weight',
    'backbone.fpn.inner_blocks.3.0.weight',
    'backbone.fpn.layer_blocks.0.0.weight',
    'rpn.head.conv.0.0.weight',
    'rpn.head.cls_logits.weight',
    'rpn.head.bbox_pred.weight',
    'roi_heads.box_head.fc6.weight',
    'roi_heads.box_head.fc7.bias',
    'roi_heads.box_predictor.cls_score.weight',
    'roi_heads.box_predictor.bbox_pred.weight',
    'roi_heads.mask_head.0.0.weight',
    'roi_heads.mask_predictor.conv5_mask.weight',
    'roi_heads.mask_predictor.mask_fcn_logits.weight',
    # The keypoint head's convs are not compared here: their pre-activations reach |z| ~ 200 on
    # this network and ~10 of them lie within 1e-4 of zero (measured with hooks), within the
    # float32 rounding of ours vs torchvision's sums, so their ReLUs may flip and move those
    # convs' gradients by ~2e-3 of the largest entry. The head's backward is compared exactly on
    # shared inputs in tests/models/test_keypoint_head.py; its last layer is compared here.
    'roi_heads.keypoint_predictor.kps_score_lowres.weight',
)
NUM_KEYPOINTS = 17


def _keypoints(boxes, seed):
    """[n, 17, 3] GT keypoints (x, y, v) for boxes [n, 4]: mostly inside the box, 15% outside it,
    20% unlabelled (v = 0), one per instance exactly on the box's right and one on its bottom edge."""
    rng = np.random.default_rng(seed)
    n = len(boxes)
    u = rng.uniform(-0.15, 1.15, (n, NUM_KEYPOINTS, 2))
    wh = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    xy = boxes[:, None, :2] + u * wh
    xy[:, 0, 0] = boxes[:, 2]
    xy[:, 1, 1] = boxes[:, 3]
    v = rng.choice([0, 1, 2], size=(n, NUM_KEYPOINTS), p=[0.2, 0.3, 0.5]).astype(np.float32)
    return np.concatenate([xy, v[..., None]], axis=-1).astype(np.float32)


def _load_photo(shared_data, name):
    """(image uint8 [H, W, 3], boxes [n, 4] xyxy, category ids [n], masks [n, H, W] uint8)."""
    from mrcnn_jax.data.coco import segmentation_to_mask
    root = shared_data / 'coco128_seg'
    ann = json.loads((root / 'annotations.json').read_text())
    entry = next(i for i in ann['images'] if i['file_name'] == name)
    h, w = entry['height'], entry['width']
    objs = [a for a in ann['annotations'] if a['image_id'] == entry['id'] and not a['iscrowd']]
    boxes = np.asarray([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]
                        for a in objs], np.float32)
    classes = np.asarray([a['category_id'] for a in objs], np.int64)
    masks = np.stack([segmentation_to_mask(a['segmentation'], h, w) for a in objs])
    image = np.asarray(Image.open(root / 'images' / name).convert('RGB'))
    return image, boxes, classes, masks


def _crop_masks(masks, boxes, size):
    """The input pipeline's M x M box-cropped GT masks (mrcnn_jax/data/transforms.py)."""
    from mrcnn_jax.data.transforms import mask_targets
    return np.asarray(mask_targets(masks, boxes, size))


def _match_proposals(ours, ours_scores, theirs, theirs_scores):
    """Index of torchvision's proposal for each of our valid proposals (a permutation: rows whose
    scores tie within float32 noise may come in either order)."""
    assert len(ours) == len(theirs), f'{len(ours)} valid proposals vs torchvision {len(theirs)}'
    err = np.abs(ours[:, None, :] - theirs[None, :, :]).max(-1)
    perm = err.argmin(1)
    worst = err[np.arange(len(ours)), perm].max()
    assert worst < 2e-3, f'a proposal differs from torchvision by {worst:.2e} px'
    assert len(np.unique(perm)) == len(perm), 'proposals do not map one to one'
    np.testing.assert_allclose(ours_scores, theirs_scores[perm], atol=1e-5, rtol=0)
    return perm


class _FixedSampler:
    """Stands in for BalancedPositiveNegativeSampler: returns the given indices, after checking
    that torchvision labelled them as we did."""

    def __init__(self, name, pos, neg, pos_labels=None, num_pos_max=None):
        self.name, self.pos, self.neg = name, pos, neg
        self.pos_labels, self.num_pos_max = pos_labels, num_pos_max
        self.calls = 0

    def __call__(self, labels):
        self.calls += 1
        pos_masks, neg_masks = [], []
        for i, lab in enumerate(labels):
            lab = lab.numpy()
            pos, neg = self.pos[i](), self.neg[i]()
            expected = 1 if self.pos_labels is None else self.pos_labels[i]
            np.testing.assert_array_equal(lab[pos], expected, err_msg=f'{self.name}: image {i} positives')
            np.testing.assert_array_equal(lab[neg], 0, err_msg=f'{self.name}: image {i} negatives')
            if len(pos) < self.num_pos_max:   # we took every positive: the eligible sets agree
                assert (lab >= 1).sum() == len(pos), f'{self.name}: image {i}: torchvision has ' \
                    f'{(lab >= 1).sum()} positives, we have {len(pos)}'
            pm = torch.zeros(len(lab), dtype=torch.uint8)
            nm = torch.zeros(len(lab), dtype=torch.uint8)
            pm[torch.as_tensor(pos, dtype=torch.long)] = 1
            nm[torch.as_tensor(neg, dtype=torch.long)] = 1
            assert not (pm & nm).any()
            pos_masks.append(pm)
            neg_masks.append(nm)
        return pos_masks, neg_masks


def _grad_state_dict(model):
    """torch grads as a state_dict (zeros for buffers and frozen parameters)."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: (grads[k] if k in grads else torch.zeros_like(v)).detach().numpy()
            for k, v in model.state_dict().items()}


@pytest.fixture(scope='module')
def setup(shared_data):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    photos = [_load_photo(shared_data, name) for name in PHOTOS]
    # Narrower heads than torchvision's (fc 1024, mask 4 x 256) keep the test fast on 2 cores; the
    # converter reads head sizes off the weights.
    torch.manual_seed(0)
    heads = dict(box_head=TwoMLPHead(256 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, 91),
                 mask_head=MaskRCNNHeads(256, [64, 64], 1), mask_predictor=MaskRCNNPredictor(64, 64, 91))
    tv = build_torchvision_maskrcnn(seed=0, depth=18, num_classes=None, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                    calibration_images=[photos[0][0]], **heads)
    _calibrate_mask_logits(tv, photos[0], std=2.0)
    _add_keypoint_branch(tv, photos[0], std=2.0)
    return photos, tv


@torch.no_grad()
def _add_keypoint_branch(model, photo, std):
    """torchvision's keypoint RoI pool, head (narrowed: 2 x 64) and predictor on the model's
    RoIHeads, with heatmap logits of a trained head's spread."""
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign
    torch.manual_seed(1)
    rh = model.roi_heads
    rh.keypoint_roi_pool = MultiScaleRoIAlign(['0', '1', '2', '3'], 14, 2)
    rh.keypoint_head = KeypointRCNNHeads(256, [64, 64])
    rh.keypoint_predictor = KeypointRCNNPredictor(64, NUM_KEYPOINTS)
    image, boxes, _, _ = photo
    model.eval()
    il, t = model.transform([image_to_tensor(image)], [{'boxes': torch.from_numpy(boxes)}])
    feats = model.backbone(il.tensors)
    x = rh.keypoint_predictor(rh.keypoint_head(rh.keypoint_roi_pool(feats, [t[0]['boxes']], il.image_sizes)))
    layer = rh.keypoint_predictor.kps_score_lowres
    layer.weight.mul_(std / x.std())
    layer.bias.zero_()


@torch.no_grad()
def _calibrate_mask_logits(model, photo, std):
    """Scale the per-class mask logits to a trained head's range (random weights give logits of
    ~15: a saturated sigmoid whose BCE gradient is just the sign of the error)."""
    image, boxes, _, _ = photo
    model.eval()
    il, t = model.transform([image_to_tensor(image)], [{'boxes': torch.from_numpy(boxes)}])
    feats = model.backbone(il.tensors)
    rh = model.roi_heads
    x = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, [t[0]['boxes']], il.image_sizes)))
    layer = rh.mask_predictor.mask_fcn_logits
    layer.weight.mul_(std / x.std())
    layer.bias.zero_()


def _our_batch(photos, image_list, tv_targets):
    """Our padded batch on torchvision's input tensor (the canvas), with the same GT plus a crowd
    box, a zero-width box and padding rows that torchvision never sees."""
    canvas = image_list.tensors.permute(0, 2, 3, 1).numpy()
    bsz = len(photos)
    gt_boxes = np.zeros((bsz, MAX_INSTANCES, 4), np.float32)
    gt_classes = np.zeros((bsz, MAX_INSTANCES), np.int32)
    gt_crowd = np.zeros((bsz, MAX_INSTANCES), bool)
    gt_valid = np.zeros((bsz, MAX_INSTANCES), bool)
    gt_masks = np.zeros((bsz, MAX_INSTANCES, MASK_SIZE, MASK_SIZE), np.uint8)
    gt_keypoints = np.zeros((bsz, MAX_INSTANCES, NUM_KEYPOINTS, 3), np.float32)
    info = np.zeros((bsz, 6), np.float32)
    for i, ((image, boxes, classes, masks), t) in enumerate(zip(photos, tv_targets)):
        n = len(boxes)
        gt_boxes[i, :n] = t['boxes'].numpy()
        gt_classes[i, :n] = classes
        gt_valid[i, :n] = True
        gt_masks[i, :n] = _crop_masks(masks, boxes, MASK_SIZE)
        gt_keypoints[i, :n] = t['keypoints'].numpy()
        gt_keypoints[i, n:n + 2] = (150, 100, 2)     # labelled keypoints on the crowd / zero-width rows
        gt_boxes[i, n] = (40, 30, 300, 250)          # crowd: torchvision's references drop it
        gt_classes[i, n], gt_crowd[i, n], gt_valid[i, n] = 1, True, True
        gt_boxes[i, n + 1] = (100, 60, 100, 200)     # zero width: filtered before matching
        gt_classes[i, n + 1], gt_valid[i, n + 1] = 3, True
        gt_masks[i, n:n + 2] = 1
        h, w = image.shape[:2]
        rh, rw = image_list.image_sizes[i]
        info[i] = (h, w, rh, rw, rh / h, rw / w)
    return {'images': canvas, 'image_info': info, 'gt_boxes': gt_boxes, 'gt_classes': gt_classes,
            'gt_is_crowd': gt_crowd, 'gt_valid': gt_valid, 'gt_masks': gt_masks, 'gt_keypoints': gt_keypoints}


def _our_losses(tv, batch):
    """Converted model, its variables, and our loss terms, targets and gradients (params)."""
    sd = {k: v.detach().numpy() for k, v in tv.state_dict().items()}
    cfg = model_config_from_state_dict(sd)
    assert cfg.backbone.depth == 18 and cfg.num_classes == 91
    model = build_model(cfg)
    variables = convert_state_dict(sd, cfg)
    loss_fn = make_loss_fn(model, LossSettings.from_config(cfg), with_targets=True)

    def objective(params, batch):
        return loss_fn({'params': params, 'frozen': variables['frozen']}, batch, jax.random.PRNGKey(0))

    (_, aux), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(variables['params'], batch)
    aux, grads = jax.tree_util.tree_map(np.asarray, (aux, grads))
    return cfg, model, variables, aux, grads


def test_loss_parity_with_torchvision(setup, monkeypatch):
    photos, tv = setup
    tv.train()    # FrozenBN stays frozen; the transform picks min_size from (MIN_SIZE,)
    images = [image_to_tensor(p[0]) for p in photos]
    targets = [{'boxes': torch.from_numpy(b), 'labels': torch.from_numpy(c), 'masks': torch.from_numpy(m),
                'keypoints': torch.from_numpy(_keypoints(b, seed=i))} for i, (_, b, c, m) in enumerate(photos)]
    with torch.no_grad():
        image_list, tv_targets = tv.transform(images, [dict(t) for t in targets])
    bsz, _, ch, cw = image_list.tensors.shape
    assert [tuple(s) for s in image_list.image_sizes] == [(320, 426)] * 2 and (ch, cw) == (320, 448)
    batch = _our_batch(photos, image_list, tv_targets)

    cfg, model, variables, aux, grads = _our_losses(tv, batch)
    ours = {k: float(v) for k, v in aux['losses'].items()}
    tg = aux['targets']
    at, rt = tg['anchors'], tg['rois']

    # torchvision's anchors and proposals, recorded during its forward: anchors must equal ours
    # (so that anchor indices carry over), proposals too (so that RoI indices can be mapped).
    record = {}
    filter_proposals = tv.rpn.filter_proposals

    def recording_filter_proposals(*args, **kwargs):
        out = filter_proposals(*args, **kwargs)
        record['proposals'] = [(b.detach().numpy(), s.detach().numpy()) for b, s in zip(*out)]
        return out

    monkeypatch.setattr(tv.rpn, 'filter_proposals', recording_filter_proposals)
    hooks = [tv.rpn.anchor_generator.register_forward_hook(
        lambda m, a, out: record.__setitem__('anchors', [x.detach().numpy() for x in out]))]
    level_shapes = [np.zeros((1, -(-ch // 2 ** l), -(-cw // 2 ** l), 1), np.float32) for l in range(2, 7)]
    our_anchors = np.concatenate([np.broadcast_to(a, (bsz,) + a.shape[1:]) for a in model.apply(
        variables, level_shapes, batch['image_info'], method=MaskRCNN.anchors)[0]], axis=1)

    def anchor_index(i, which):
        """Our sampled anchors of image i (`which`: a mask over the sample), once the anchors are
        known to be the same."""
        np.testing.assert_array_equal(our_anchors[i], record['anchors'][i])
        return at.indices[i][which]

    p_slots = tg['proposals'].shape[1]
    maps = {}

    def roi_index(i):
        """torchvision's index (into [proposals; GT]) of each of our sampled RoIs of image i."""
        if i not in maps:
            tv_boxes, tv_scores = record['proposals'][i]
            ok = tg['proposal_ok'][i]
            assert ok[:ok.sum()].all(), 'valid proposals come first'
            perm = _match_proposals(tg['proposals'][i][ok], tg['proposal_scores'][i][ok], tv_boxes, tv_scores)
            n_gt = len(photos[i][1])
            cand = np.full(p_slots + MAX_INSTANCES, -1)       # our [P proposal slots; G GT slots]
            cand[:ok.sum()] = perm
            cand[p_slots:p_slots + n_gt] = len(tv_boxes) + np.arange(n_gt)
            maps[i] = cand[rt.indices[i]]
            assert (maps[i][rt.weights[i] > 0] >= 0).all(), 'a sampled RoI has no torchvision counterpart'
        return maps[i]

    def mask_slots(i):
        """Our positive RoI slots in torchvision's order of mask RoIs (it keeps sampled RoIs in
        index order)."""
        pos = np.flatnonzero((rt.weights[i] > 0) & (rt.labels[i] > 0))
        slots = pos[np.argsort(roi_index(i)[pos], kind='stable')]
        assert slots.max() < tg['mask_targets'].shape[1]
        return slots

    rpn_pos, rpn_neg, roi_pos, roi_neg, roi_pos_labels = [], [], [], [], []
    for i in range(bsz):
        w = at.weights[i] > 0
        rpn_pos.append(lambda i=i, pos=w & (at.labels[i] > 0): anchor_index(i, pos))
        rpn_neg.append(lambda i=i, neg=w & (at.labels[i] == 0): anchor_index(i, neg))
        w = rt.weights[i] > 0
        pos = w & (rt.labels[i] > 0)
        roi_pos.append(lambda i=i, pos=pos: roi_index(i)[pos])
        roi_neg.append(lambda i=i, neg=w & (rt.labels[i] == 0): roi_index(i)[neg])
        roi_pos_labels.append(rt.labels[i][pos])
    rp, r = cfg.rpn, cfg.roi
    rpn_sampler = _FixedSampler('rpn', rpn_pos, rpn_neg,
                                num_pos_max=int(rp.batch_size_per_image * rp.positive_fraction))
    roi_sampler = _FixedSampler('roi_heads', roi_pos, roi_neg, roi_pos_labels,
                                num_pos_max=int(r.batch_size_per_image * r.positive_fraction))
    mask_calls = []

    def project_masks_on_boxes(gt_masks, boxes, matched_idxs, size):
        i = len(mask_calls)
        mask_calls.append(i)
        slots = mask_slots(i)
        np.testing.assert_allclose(boxes.detach().numpy(), rt.rois[i][slots], atol=2e-3, rtol=0)
        np.testing.assert_array_equal(matched_idxs.numpy(), rt.matched_gt[i][slots])
        assert size == tg['mask_targets'].shape[-1]
        return torch.from_numpy(tg['mask_targets'][i][slots])

    monkeypatch.setattr(tv.rpn, 'fg_bg_sampler', rpn_sampler)
    monkeypatch.setattr(tv.roi_heads, 'fg_bg_sampler', roi_sampler)
    monkeypatch.setattr(tv_roi_heads, 'project_masks_on_boxes', project_masks_on_boxes)
    seen = {}
    hooks += [tv.roi_heads.box_predictor.register_forward_hook(
                  lambda m, a, out: seen.__setitem__('cls', out[0].detach())),
              tv.roi_heads.mask_predictor.register_forward_hook(
                  lambda m, a, out: seen.__setitem__('mask', out.detach())),
              tv.roi_heads.keypoint_predictor.register_forward_hook(
                  lambda m, a, out: seen.__setitem__('keypoint', out.detach()))]
    tv.zero_grad()
    try:
        theirs_t = tv(images, [dict(t) for t in targets])
        sum(theirs_t.values()).backward()
    finally:
        for h in hooks:
            h.remove()
    assert rpn_sampler.calls == 1 and roi_sampler.calls == 1 and len(mask_calls) == bsz and len(maps) == bsz
    theirs = {k: float(v.detach()) for k, v in theirs_t.items()}

    # Not degenerate: positives in both samplers (the second image below the RPN's 128 and both
    # below the RoI head's 128, so that the eligible sets were compared in full), several
    # classes, scores and mask logits away from saturation.
    num_pos_anchors = (at.labels * at.weights).sum(1)
    num_pos_rois = ((rt.labels > 0) * rt.weights).sum(1)
    assert num_pos_anchors.min() >= 20 and num_pos_anchors.min() < 128, num_pos_anchors
    assert num_pos_rois.min() >= 20 and num_pos_rois.max() < 128, num_pos_rois
    assert len(set(np.concatenate(roi_pos_labels).tolist())) >= 6
    prob = float(torch.softmax(seen['cls'], -1).max(-1).values.mean())
    assert 0.2 < prob < 0.9, f'classifier saturated or uniform: mean top score {prob:.2f}'
    mask_std = float(seen['mask'].std())
    assert 0.5 < mask_std < 5, f'mask logits degenerate: std {mask_std:.2f}'
    kp_std = float(seen['keypoint'].std())
    assert 0.5 < kp_std < 5, f'heatmap logits degenerate: std {kp_std:.2f}'
    kv = tg['keypoint_valid']
    assert kv.sum() >= 200 and (~kv & (tg['mask_weights'][..., None] > 0)).sum() >= 50, \
        'keypoint targets degenerate: too few valid, or no invalid ones'

    # Every loss term.
    assert set(ours) == set(theirs)
    for k in theirs:
        assert theirs[k] > 1e-2, f'{k} is degenerate ({theirs[k]})'
        rel = abs(ours[k] - theirs[k]) / abs(theirs[k])
        assert rel < LOSS_RTOL, f'{k}: ours {ours[k]:.7g} vs torchvision {theirs[k]:.7g} (rel {rel:.1e})'

    # Gradients, in our layout (torch's converted as the weights are).
    tv_grads = flax.traverse_util.flatten_dict(convert_state_dict(_grad_state_dict(tv), cfg)['params'])
    our_grads = flax.traverse_util.flatten_dict(grads)
    table = _expected_torch_keys(cfg)
    for key in GRAD_KEYS:
        path = table[key][1:]
        g_tv, g_ours = tv_grads[path], our_grads[path]
        scale = np.abs(g_tv).max()
        assert scale > 0, f'{key}: zero gradient'
        rel = np.abs(g_ours - g_tv).max() / scale
        assert rel < GRAD_RTOL, f'{key}: gradient relative error {rel:.1e}'
    # Frozen stages (stem, layer1) get no gradient in either.
    for path in (('backbone', 'conv1', 'kernel'), ('backbone', 'layer1_0', 'conv1', 'kernel')):
        assert not our_grads[path].any() and not tv_grads[path].any()
