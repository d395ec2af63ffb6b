"""Keypoint branch: pooled RoI features -> one heatmap per keypoint, and heatmaps -> keypoints.

`KeypointRCNNHead` is torchvision's KeypointRCNNHeads + KeypointRCNNPredictor and Detectron2's
KRCNNConvDeconvUpsampleHead (the same network): n x (3x3 conv + ReLU), a 4x4 stride-2 transposed
conv (padding 1) to K channels, and a 2x bilinear upsample (align_corners=False): 14 x 14 RoI
features -> K heatmaps of 56 x 56 logits.

`heatmaps_to_keypoints` is both references' `heatmaps_to_keypoints` in static shapes: see its
docstring for the formulation and why it returns the references' keypoints.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax.models.layers import conv, conv_kernel_init
from mrcnn_jax.ops import conv as conv_ops


class KeypointRCNNHead(nn.Module):
    """pooled [B, R, S, S, C] -> heatmap logits [B, R, K, 4S, 4S] float32 (torch's N, K, H, W)."""
    num_keypoints: int
    num_convs: int = 8
    channels: int = 512
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, dtype: Any) -> 'KeypointRCNNHead':
        return cls(num_keypoints=cfg.num_keypoints, num_convs=cfg.roi.keypoint_head_convs,
                   channels=cfg.roi.keypoint_head_channels, dtype=dtype)

    @nn.compact
    def __call__(self, pooled: jnp.ndarray) -> jnp.ndarray:
        b, r = pooled.shape[:2]
        x = pooled.reshape((b * r,) + pooled.shape[2:]).astype(self.dtype)
        for i in range(self.num_convs):
            x = nn.relu(conv(self.channels, 3, bias=True, dtype=self.dtype, name=f'conv_fcn{i + 1}')(x))
        # ConvTranspose2d(C, K, 4, stride=2, padding=1) as the conv of the 2x-dilated input with
        # the spatially flipped kernel, padded by 4 - 1 - 1 = 2: S -> 2S. The kernel is stored
        # unflipped, [kh, kw, in, out] (torch's [in, out, kh, kw] transposed).
        c = x.shape[-1]
        w = self.param('score_lowres_kernel', conv_kernel_init('fan_out'), (4, 4, c, self.num_keypoints))
        bias = self.param('score_lowres_bias', nn.initializers.zeros, (self.num_keypoints,))
        x = conv_ops.conv_general_dilated(
            x, w[::-1, ::-1].astype(self.dtype), (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC')).astype(jnp.float32) + bias
        x = upsample2x_bilinear(upsample2x_bilinear(x, axis=1), axis=2)      # [BR, 4S, 4S, K]
        return x.transpose(0, 3, 1, 2).reshape(b, r, self.num_keypoints, x.shape[1], x.shape[2])


def upsample2x_bilinear(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """torch's `interpolate(scale_factor=2, mode='bilinear', align_corners=False)` along one axis:
    output 2i samples at i - 1/4 (weights 1/4, 3/4 on rows i - 1, i), 2i + 1 at i + 1/4 (3/4, 1/4
    on rows i, i + 1), rows clamped at the borders (torch clamps the source position at 0 and the
    row index at n - 1, which is the same). Exact weights: no matmul, no TF32 rounding on a GPU."""
    n = x.shape[axis]
    prev = jnp.take(x, np.maximum(np.arange(n) - 1, 0), axis=axis)
    nxt = jnp.take(x, np.minimum(np.arange(n) + 1, n - 1), axis=axis)
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


# -- heatmaps -> keypoints -------------------------------------------------------------------------
_A = -0.75      # torch's bicubic convolution constant
_LOWEST = float(np.finfo(np.float32).min)   # "no pixel" (finite: no reliance on inf arithmetic)


def _cubic_weights(t, xp=jnp):
    """torch's `get_cubic_upsample_coefficients`: [..., 4] weights of rows i-1, i, i+1, i+2 at
    fraction t in [0, 1] (they sum to 1; the middle two are >= 0, the outer two <= 0)."""
    def conv1(x):
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def conv2(x):
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return xp.stack([conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)], axis=-1)


def _bernstein() -> np.ndarray:
    """[4, 4] B: B @ (m_{i-1}, m_i, m_{i+1}, m_{i+2}) are the Bernstein coefficients on [0, 1] of
    the cubic that bicubic interpolation draws between samples i and i + 1."""
    ts = np.linspace(0.0, 1.0, 4)
    # each weight is a cubic in t: fitted exactly from 4 points (power basis, lowest first)
    power = np.stack([np.polyfit(ts, _cubic_weights(ts, np)[:, i], 3)[::-1] for i in range(4)])   # [row, p]
    to_bern = np.array([[math.comb(k, p) / math.comb(3, p) if p <= k else 0.0 for p in range(4)]
                        for k in range(4)])
    return np.round(to_bern @ power.T, 12).astype(np.float32)      # [k, row]: exact quarters


_BERNSTEIN = _bernstein()


def _source_cells(out_size: jnp.ndarray, in_size: int, n: int | None, d: jnp.ndarray | None = None):
    """torch's bicubic source positions of output pixels d (default 0..n-1) for an out_size-pixel
    output (align_corners=False, no scale factor): cell index i = min(floor(src), in - 1) in
    [-1, in - 1] and fraction t = clamp(src - i, 0, 1), src = (in / out) (d + 1/2) - 1/2, float32."""
    scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
    d = jnp.arange(n) if d is None else d
    src = scale * (d.astype(jnp.float32) + 0.5) - 0.5
    i = jnp.minimum(jnp.floor(src), in_size - 1)
    t = jnp.clip(src - i, 0.0, 1.0)
    return i.astype(jnp.int32), t


def heatmaps_to_keypoints(maps: jnp.ndarray, rois: jnp.ndarray, canvas_hw: tuple[int, int],
                          candidate_cells: int = 16) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Keypoints from heatmap logits maps [N, K, H, H] of rois [N, 4] (xyxy, canvas pixels).

    The references (torchvision's and Detectron2's `heatmaps_to_keypoints`, identical here) resize
    each RoI's maps bicubically (torch's `interpolate(mode='bicubic', align_corners=False)`) to
    ceil(h) x ceil(w) of that RoI's clamped (>= 1) size, take the first argmax (row-major) per
    keypoint, and return x = (x_int + 1/2) * w / ceil(w) + x1 (y likewise) and the resized map's
    value there. The resized map's size is data: we never build it.

    Static-shape formulation, exact: the bicubic interpolant is a separate bicubic patch on each
    cell between four samples (57 x 57 cells, counting the clamped border cells), and every
    output pixel lies in one cell. (1) A patch's values lie below its largest Bernstein
    coefficient (convex hull property); the coefficients are B M_cell B^T for the cell's 4 x 4
    samples M_cell and a fixed B. (2) In each keypoint's `candidate_cells` cells of largest bound
    (among cells holding an output pixel) every output pixel is evaluated with torch's own
    positions and weights (float32, x then y, as torch), giving the best value and its first
    row-major position. (3) That is the reference's argmax when the next cell's bound is below
    the best value: no other pixel can reach it (certified). A keypoint that is not certified
    (a near tie between separate peaks, a flat map) is redone over all cells, exactly, inside a
    conditional that costs nothing when every keypoint is certified.

    The static bound on pixels per cell comes from canvas_hw (boxes are clipped to the image).
    Returns (xy [N, K, 2] float32, logits [N, K] (the resized map's value at the argmax:
    torchvision's keypoint score), pool_softmax [N, K] (Detectron2's score:
    exp(value - max) / sum(exp(maps - max)) over the H x H map, with max the value)).
    """
    n, k, hm, _ = maps.shape
    maps = maps.astype(jnp.float32)
    x1, y1 = rois[:, 0], rois[:, 1]
    widths = jnp.maximum(rois[:, 2] - rois[:, 0], 1.0)
    heights = jnp.maximum(rois[:, 3] - rois[:, 1], 1.0)
    wo = jnp.ceil(widths).astype(jnp.int32)
    ho = jnp.ceil(heights).astype(jnp.int32)
    span_y = int(np.ceil(canvas_hw[0] / hm)) + 1       # pixels a cell can hold: ceil(out / hm) + 1
    span_x = int(np.ceil(canvas_hw[1] / hm)) + 1
    cells = hm + 1                                      # cell index -1 .. hm - 1

    # every cell's bound: the largest of its 16 Bernstein coefficients B M_cell B^T, from 4
    # shifted slices per axis of the edge-padded map (cell i reads rows i - 1 .. i + 2, clamped)
    bern = _BERNSTEIN
    padded = jnp.pad(maps, ((0, 0), (0, 0), (2, 2), (2, 2)), mode='edge')          # rows -2 .. hm + 1
    by = [sum(float(bern[p, i]) * padded[:, :, i:i + cells] for i in range(4) if bern[p, i])
          for p in range(4)]                                                          # [N, K, cy, hm + 4]
    bound = None
    for p in range(4):
        for q in range(4):
            cq = sum(float(bern[q, j]) * by[p][..., j:j + cells] for j in range(4) if bern[q, j])
            bound = cq if bound is None else jnp.maximum(bound, cq)
    slack = 1e-5 * (1.0 + jnp.max(jnp.abs(maps), axis=(2, 3)))
    bound = bound + slack[:, :, None, None]                        # [N, K, cy, cx]

    # Every output pixel's cell and fraction, per RoI and axis, computed once: the windows below
    # read them, so that a pixel's cell is one value everywhere (recomputing it, XLA may fuse
    # `scale * d - 0.5` into an FMA in one place and not in another, and a pixel whose source
    # lies within an ulp of a cell border would fall between two cells).
    side_y, side_x = max(canvas_hw[0], hm), max(canvas_hw[1], hm)
    cell_y, t_y = jax.vmap(lambda o: _source_cells(o, hm, side_y))(ho)     # [N, side_y]
    cell_x, t_x = jax.vmap(lambda o: _source_cells(o, hm, side_x))(wo)

    def first_pixels(cell, out_size, side):
        """[cells] int32: each cell's first output pixel, `side` for a cell that holds none."""
        d = jnp.arange(side)
        return jnp.full((cells,), side, jnp.int32).at[cell + 1].min(jnp.where(d < out_size, d, side))
    first_y = jax.vmap(first_pixels, (0, 0, None))(cell_y, ho, side_y)      # [N, cells]
    first_x = jax.vmap(first_pixels, (0, 0, None))(cell_x, wo, side_x)
    occ_y, occ_x = first_y < side_y, first_x < side_x
    bound = jnp.where(occ_y[:, None, :, None] & occ_x[:, None, None, :], bound, -jnp.inf)

    def evaluate(m, cy, cx, out_h, out_w, ay, ax):
        """Best (value, linear index) over the output pixels of cells (cy, cx) [C] (indices
        -1 .. hm - 1) of one map m [hm, hm]; ay, ax: the RoI's (first pixel [cells], pixel cell
        [side], pixel fraction [side]) per axis."""
        def window(cell, out_size, span, axis):
            first, pix_cell, pix_t = axis
            d = first[cell + 1] + jnp.arange(span)
            dc = jnp.minimum(d, pix_cell.shape[0] - 1)
            return d, (pix_cell[dc] == cell) & (d < out_size), _cubic_weights(pix_t[dc])
        dy, oky, wy = jax.vmap(lambda c: window(c, out_h, span_y, ay))(cy)      # [C, Ty], [C, Ty, 4]
        dx, okx, wx = jax.vmap(lambda c: window(c, out_w, span_x, ax))(cx)
        rows = jnp.clip(cy[:, None] + np.arange(-1, 3)[None, :], 0, hm - 1)
        cols = jnp.clip(cx[:, None] + np.arange(-1, 3)[None, :], 0, hm - 1)
        block = jnp.take_along_axis(jnp.take(m, rows, axis=0), cols[:, None, :], axis=2)   # [C, 4, 4]
        # x first (each of the 4 rows), then y, each a left-to-right sum of 4 terms, as torch
        rx = sum(block[:, :, None, j] * wx[:, None, :, j] for j in range(4))    # [C, 4, Tx]
        v = sum(wy[:, :, None, i] * rx[:, None, i, :] for i in range(4))        # [C, Ty, Tx]
        ok = oky[:, :, None] & okx[:, None, :]
        v = jnp.where(ok, v, _LOWEST)
        lin = dy[:, :, None] * out_w + dx[:, None, :]
        best = jnp.max(v)
        first = jnp.min(jnp.where(v == best, lin, jnp.iinfo(jnp.int32).max))
        return best, first

    c = min(candidate_cells, cells * cells)
    flat = bound.reshape(n, k, cells * cells)
    _, cand = jax.lax.top_k(flat, c)
    cy, cx = cand // cells - 1, cand % cells - 1
    ww = jnp.broadcast_to(wo[:, None], (n, k))
    ay, ax = (first_y, cell_y, t_y), (first_x, cell_x, t_x)
    ev = jax.vmap(jax.vmap(evaluate, (0, 0, 0, None, None, None, None)))   # over RoIs, then keypoints
    best, first = ev(maps, cy, cx, ho, wo, ay, ax)
    # the best bound outside the candidates: every cell's bound with the candidates' masked
    chosen = jnp.any(jnp.arange(cells * cells) == cand[..., None], axis=-2)
    rest = jnp.max(jnp.where(chosen, -jnp.inf, flat), axis=-1)
    certified = rest < best

    every = np.arange(cells * cells)
    all_y, all_x = jnp.asarray(every // cells - 1), jnp.asarray(every % cells - 1)

    def redo(args):
        best, first = args

        def one(a):
            i, kk = a // k, a % k
            ok = certified[i, kk]
            sel = (lambda x: x[i])
            return jax.lax.cond(ok, lambda: (best[i, kk], first[i, kk]), lambda: evaluate(
                maps[i, kk], all_y, all_x, ho[i], wo[i], jax.tree_util.tree_map(sel, ay),
                jax.tree_util.tree_map(sel, ax)))
        b, f = jax.lax.map(one, jnp.arange(n * k))
        return b.reshape(n, k), f.reshape(n, k)
    best, first = jax.lax.cond(jnp.all(certified), lambda a: a, redo, (best, first))

    x_int = first % ww
    y_int = first // ww
    x = (x_int.astype(jnp.float32) + 0.5) * (widths / wo.astype(jnp.float32))[:, None] + x1[:, None]
    y = (y_int.astype(jnp.float32) + 0.5) * (heights / ho.astype(jnp.float32))[:, None] + y1[:, None]
    pool_softmax = 1.0 / jnp.sum(jnp.exp(maps - best[:, :, None, None]), axis=(2, 3))
    return jnp.stack([x, y], axis=-1), best, pool_softmax
