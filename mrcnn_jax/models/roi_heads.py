"""RoI heads: box head + predictor, mask head, and inference postprocessing.

Modules take pooled RoI features; `postprocess_detections` is a pure function of their outputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.models.layers import conv, conv_kernel_init
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.nms import nms


def _torch_linear_init():
    # torch.nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class BoxHead(nn.Module):
    """TwoMLPHead (fc6, fc7 with ReLU) + FastRCNNPredictor (cls_score, class-specific bbox_pred).

    pooled [B, R, S, S, C] -> class_logits [B, R, K] float32, box_deltas [B, R, K, 4] float32.
    fc6 consumes the RoI features flattened in (y, x, c) order; the torchvision converter
    permutes its (c, y, x)-ordered fc6 weights accordingly.
    """
    num_classes: int
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: jnp.ndarray):
        b, r = pooled.shape[:2]
        x = pooled.reshape(b, r, -1).astype(self.dtype)
        x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, kernel_init=_torch_linear_init(), name='fc6')(x))
        x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, kernel_init=_torch_linear_init(), name='fc7')(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01),
                          name='cls_score')(x)
        deltas = nn.Dense(self.num_classes * 4, dtype=self.dtype, kernel_init=nn.initializers.normal(0.001),
                          name='bbox_pred')(x)
        return logits.astype(jnp.float32), deltas.astype(jnp.float32).reshape(b, r, self.num_classes, 4)


class MaskHead(nn.Module):
    """MaskRCNNHeads (4 x conv3x3 256 + ReLU) + MaskRCNNPredictor (2x2 stride-2 deconv + ReLU,
    1x1 per-class logits).

    pooled [B, R, S, S, C], classes [B, R] int -> mask logits [B, R, 2S, 2S] float32 of each RoI's
    class channel only (the per-class 1x1 conv is evaluated for that one class).
    """
    num_classes: int
    num_convs: int = 4
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled: jnp.ndarray, classes: jnp.ndarray):
        b, r, s = pooled.shape[:3]
        x = pooled.reshape((b * r,) + pooled.shape[2:]).astype(self.dtype)
        for i in range(self.num_convs):
            x = nn.relu(conv(self.channels, 3, bias=True, dtype=self.dtype, name=f'mask_fcn{i + 1}')(x))
        # ConvTranspose2d(k=2, s=2): each input pixel writes a disjoint 2x2 output block,
        # y[2i+u, 2j+v, o] = sum_c x[i, j, c] W[u, v, c, o] + b[o]; exact as an einsum. Everything
        # after it (bias, ReLU, the class's 1x1 logits) is per pixel, so it stays in the dot's own
        # [n, i, j, u, v, o] order and only the one-channel logits are interleaved to (2i+u, 2j+v):
        # a transpose of 1/channels of the data, forward and backward (the 256-channel transpose
        # was ~1 s of a CPU train step).
        c = x.shape[-1]
        wt = self.param('conv5_mask_kernel', conv_kernel_init('fan_out'), (2, 2, c, self.channels))
        bt = self.param('conv5_mask_bias', nn.initializers.zeros, (self.channels,))
        x = jnp.einsum('nhwc,uvco->nhwuvo', x, wt.astype(self.dtype)) + bt.astype(self.dtype)
        x = nn.relu(x)
        wl = self.param('mask_fcn_logits_kernel', conv_kernel_init('fan_out'), (self.channels, self.num_classes))
        bl = self.param('mask_fcn_logits_bias', nn.initializers.zeros, (self.num_classes,))
        cls = classes.reshape(b * r).astype(jnp.int32)
        w_sel = jnp.take(wl, cls, axis=1).T.astype(self.dtype)             # [BR, channels]
        logits = jnp.einsum('nhwuvc,nc->nhwuv', x, w_sel).astype(jnp.float32)
        logits = logits + jnp.take(bl, cls)[:, None, None, None, None]
        return logits.transpose(0, 1, 3, 2, 4).reshape(b, r, 2 * s, 2 * s)


def postprocess_detections(
    class_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    image_hw: jnp.ndarray,
    *,
    box_weights: Sequence[float],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    pre_nms_candidates: int,
    min_size: float = 1e-2,
) -> dict[str, jnp.ndarray]:
    """torchvision's `RoIHeads.postprocess_detections` with static shapes.

    Softmax, per-class decode (weights 10, 10, 5, 5), clip, drop background, keep
    score > score_thresh and sides >= min_size, per-class NMS, top detections_per_img.

    Static-shape note: torchvision runs NMS on every (proposal, class) pair above the
    threshold. We first keep the `pre_nms_candidates` best pairs. Greedy NMS only ever lets a
    box be suppressed by a higher-scoring one, so the result equals torchvision's whenever its
    last kept detection ranks within those candidates (true unless > pre_nms_candidates pairs
    outscore it, i.e. thousands of heavily-suppressed boxes).

    class_logits [B, R, K]; box_deltas [B, R, K, 4]; proposals [B, R, 4]; proposal_valid [B, R];
    image_hw [B, 2]. Returns {'boxes' [B, D, 4], 'scores' [B, D], 'labels' [B, D] int32,
    'valid' [B, D] bool}, sorted by score, D = detections_per_img; invalid rows are zero.
    """
    b, r, k = class_logits.shape
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    boxes = box_ops.decode_boxes(box_deltas, proposals[:, :, None, :], box_weights)   # [B, R, K, 4]
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, None, :])
    boxes = boxes[:, :, 1:].reshape(b, r * (k - 1), 4)
    scores = scores[:, :, 1:].reshape(b, r * (k - 1))
    labels = jnp.broadcast_to(jnp.arange(1, k, dtype=jnp.int32), (b, r, k - 1)).reshape(b, r * (k - 1))
    valid = jnp.repeat(proposal_valid, k - 1, axis=1)
    valid = valid & (scores > score_thresh) & box_ops.nonsmall_boxes(boxes, min_size)

    n = min(pre_nms_candidates, r * (k - 1))
    _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), n)
    boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
    scores = jnp.take_along_axis(scores, idx, axis=1)
    labels = jnp.take_along_axis(labels, idx, axis=1)
    valid = jnp.take_along_axis(valid, idx, axis=1)

    keep, keep_valid = jax.vmap(
        lambda bx, s, v, l: nms(bx, s, v, nms_thresh, detections_per_img, idxs=l))(boxes, scores, valid, labels)
    out_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1)
    out = {
        'boxes': jnp.where(keep_valid[..., None], out_boxes, 0.0),
        'scores': jnp.where(keep_valid, jnp.take_along_axis(scores, keep, axis=1), 0.0),
        'labels': jnp.where(keep_valid, jnp.take_along_axis(labels, keep, axis=1), 0),
        'valid': keep_valid,
    }
    return out
