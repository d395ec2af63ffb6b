"""Keypoint R-CNN's pieces against torchvision's functions on shared inputs: the head (forward and
backward), the static-shape `heatmaps_to_keypoints` (small and large boxes, flat and tied maps,
under jit), the heatmap targets and the loss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torchvision.models.detection import roi_heads as tv_roi_heads  # noqa: E402
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor  # noqa: E402

from mrcnn_jax.models.heads.keypoint import KeypointRCNNHead, heatmaps_to_keypoints  # noqa: E402
from mrcnn_jax.training.losses import keypoint_head_loss  # noqa: E402
from mrcnn_jax.training.targets import keypoint_targets  # noqa: E402


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_head_forward_and_backward_match_torchvision():
    torch.manual_seed(0)
    head, pred = KeypointRCNNHeads(32, [16, 16]), KeypointRCNNPredictor(16, 5)
    x = torch.randn(6, 32, 14, 14, requires_grad=True)
    out = pred(head(x))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ours = KeypointRCNNHead(num_keypoints=5, num_convs=2, channels=16)
    conv = lambda c: {'kernel': c.weight.detach().numpy().transpose(2, 3, 1, 0), 'bias': c.bias.detach().numpy()}  # noqa: E731
    params = {'conv_fcn1': conv(head[0]), 'conv_fcn2': conv(head[2]),
              'score_lowres_kernel': pred.kps_score_lowres.weight.detach().numpy().transpose(2, 3, 0, 1),
              'score_lowres_bias': pred.kps_score_lowres.bias.detach().numpy()}
    xj = jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))[None]
    y = ours.apply({'params': params}, xj)
    assert y.shape == (1, 6, 5, 56, 56)
    assert _rel(y[0], out.detach().numpy()) < 1e-5
    gp, gx = jax.grad(lambda p, v: jnp.sum(ours.apply({'params': p}, v) * g.numpy()[None]), (0, 1))(params, xj)
    assert _rel(np.asarray(gx[0]).transpose(0, 3, 1, 2), x.grad.numpy()) < 1e-5
    assert _rel(gp['conv_fcn1']['kernel'], head[0].weight.grad.numpy().transpose(2, 3, 1, 0)) < 1e-5
    assert _rel(gp['score_lowres_kernel'], pred.kps_score_lowres.weight.grad.numpy().transpose(2, 3, 0, 1)) < 1e-5


def _peaked_maps(rng, n, k):
    """Heatmaps like a trained head's: a smooth random field plus one peak per keypoint."""
    yy, xx = np.mgrid[:56, :56]
    maps = rng.normal(0, 0.5, (n, k, 56, 56))
    centre = rng.uniform(0, 56, (n, k, 2, 1, 1))
    width = rng.uniform(1.5, 5, (n, k, 1, 1))
    maps += 6 * np.exp(-((yy - centre[:, :, 0]) ** 2 + (xx - centre[:, :, 1]) ** 2) / (2 * width ** 2))
    return maps.astype(np.float32)


@pytest.mark.parametrize('sizes', [(0.3, 40), (60, 500)], ids=['small_boxes', 'large_boxes'])
def test_heatmaps_to_keypoints_matches_torchvision(sizes):
    rng = np.random.default_rng(0)
    n, k = 12, 17
    maps = _peaked_maps(rng, n, k)
    maps[0] = 0.0                          # flat: every pixel ties, the first one wins
    maps[1] = np.round(maps[1])            # plateaus of equal values
    wh = rng.uniform(*sizes, (n, 2))
    xy = rng.uniform(0, 20, (n, 2))
    rois = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    rois[2, 2:] = rois[2, :2] + np.floor(wh[2]) + 1e-4     # a side just above an integer
    ref_xy, ref_score = tv_roi_heads.heatmaps_to_keypoints(torch.from_numpy(maps), torch.from_numpy(rois))
    xy_ours, score, _ = jax.jit(lambda m, r: heatmaps_to_keypoints(m, r, (544, 544)))(maps, rois)
    np.testing.assert_allclose(np.asarray(xy_ours), ref_xy.numpy()[..., :2], atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(score), ref_score.numpy(), atol=1e-4, rtol=0)


def test_keypoint_targets_and_loss_match_torchvision():
    rng = np.random.default_rng(1)
    r, k = 40, 17
    x1y1 = rng.uniform(0, 50, (r, 2))
    rois = np.concatenate([x1y1, x1y1 + rng.uniform(5, 80, (r, 2))], 1).astype(np.float32)
    wh = rois[:, None, 2:] - rois[:, None, :2]
    kxy = rois[:, None, :2] + rng.uniform(-0.2, 1.2, (r, k, 2)) * wh
    kxy[:, 0, 0], kxy[:, 1, 1] = rois[:, 2], rois[:, 3]          # exactly on the right / bottom edge
    vis = rng.choice([0, 1, 2], (r, k), p=[0.2, 0.3, 0.5])
    kps = np.concatenate([kxy, vis[..., None]], -1).astype(np.float32)
    ref_idx, ref_valid = tv_roi_heads.keypoints_to_heatmap(torch.from_numpy(kps), torch.from_numpy(rois), 56)
    idx, valid = keypoint_targets(jnp.asarray(rois), jnp.asarray(kps), 56)
    np.testing.assert_array_equal(np.asarray(valid), ref_valid.numpy().astype(bool))
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], ref_idx.numpy()[ref_valid.numpy() > 0])
    assert 0.3 < np.asarray(valid).mean() < 0.9

    logits = rng.normal(0, 2, (r, k, 56, 56)).astype(np.float32)
    ref = tv_roi_heads.keypointrcnn_loss(torch.from_numpy(logits), [torch.from_numpy(rois)], [torch.from_numpy(kps)],
                                         [torch.arange(r)])
    ours = keypoint_head_loss(jnp.asarray(logits)[None], idx[None], valid[None])
    assert abs(float(ours) - float(ref)) / float(ref) < 1e-6
    # no valid keypoint: zero, as torchvision's `keypoint_logits.sum() * 0`
    assert float(keypoint_head_loss(jnp.asarray(logits)[None], idx[None], jnp.zeros_like(valid)[None])) == 0.0
