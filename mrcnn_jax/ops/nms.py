"""Fixed-size non-maximum suppression with the exact greedy semantics of torchvision.

`nms` returns a padded, fixed-size set of indices plus a validity mask, so it runs under `jit` and
`vmap` (batch of images, or of FPN levels). It reproduces `torchvision.ops.nms` (and, with `idxs`,
`torchvision.ops.batched_nms`) bit for bit on the valid boxes: same kept set, same order.

Algorithm (tiled greedy, after TF Model Garden's padded NMS; our own code):
  1. Sort the boxes: valid first, then score descending, then input index ascending (stable).
  2. Walk the sorted boxes in tiles of `tile_size`. For each tile:
     a. cross suppression: one [N_pad, T] IoU matrix against every box kept in earlier tiles;
     b. self suppression: the tile's [T, T] IoU matrix, upper triangle only (a box can only be
        suppressed by a higher-ranked box), resolved by fixed-point iteration
            keep <- candidates & ~any_i(keep_i & S_ij)
        inside a `lax.while_loop`. Entry j depends only on entries i < j, so after n sweeps the
        first n entries are final; the loop stops at the first sweep that changes nothing, which is
        then the unique fixed point, i.e. exactly greedy. The number of sweeps is the length of
        the longest suppression chain + 1 (small in practice), not the tile size.
  3. Stop as soon as `max_output` boxes are kept (early exit of the tile loop).
Memory is O(N * tile_size); work is O(N^2) IoUs in large vectorised ops instead of N small steps.
"""

from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax import lax


def float32_threshold(iou_threshold: float) -> np.float32:
    """The float32 `t` such that `iou > t` (iou float32) equals `float64(iou) > iou_threshold`.

    torchvision's kernel computes the IoU in float32 (for float32 boxes) but compares it with the
    threshold as a C++ `double`. Casting the threshold to float32 rounds to nearest, which can round
    *up* (float32(0.3) = 0.30000001192...), and then an IoU equal to float32(0.3) would be kept by
    us but suppressed by torchvision (0.30000001192 > 0.3 in double). For float32 `f`:
        f > thr (as reals)  <=>  f > t,  t = the largest float32 <= thr,
    because when thr is not representable there is no float32 strictly between t and thr, so
    `f > thr` means `f >= nextafter(t, +inf)`, i.e. `f > t`. So round the threshold *down*.
    """
    thr = float(iou_threshold)
    t = np.float32(thr)
    if float(t) > thr:
        t = np.nextafter(t, np.float32(-np.inf))
    return np.float32(t)


def _areas(boxes: jnp.ndarray) -> jnp.ndarray:
    """boxes [..., 4] float32 xyxy -> [...] float32, as torchvision: (x2 - x1) * (y2 - y1)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_iou(a: jnp.ndarray, area_a: jnp.ndarray, b: jnp.ndarray, area_b: jnp.ndarray) -> jnp.ndarray:
    """IoU [M, T] float32 of a [M, 4] vs b [T, 4], rounding exactly as torchvision's CPU kernel.

    inter = max(0, xx2 - xx1) * max(0, yy2 - yy1);  ovr = inter / (area_i + area_j - inter).
    Degenerate pairs give 0 / 0 = nan, which never compares greater than the threshold, so they
    never suppress (as in torchvision).
    """
    xx1 = jnp.maximum(a[:, None, 0], b[None, :, 0])
    yy1 = jnp.maximum(a[:, None, 1], b[None, :, 1])
    xx2 = jnp.minimum(a[:, None, 2], b[None, :, 2])
    yy2 = jnp.minimum(a[:, None, 3], b[None, :, 3])
    w = jnp.maximum(jnp.float32(0), xx2 - xx1)
    h = jnp.maximum(jnp.float32(0), yy2 - yy1)
    # torchvision rounds inter before subtracting it. XLA may contract `s - w * h` into an FMA
    # (one rounding) inside a fusion, which moves the IoU by an ulp; a select between the product
    # and 0 is not a multiply, so it cannot be contracted. (Same value: w == 0 gives 0 either way;
    # nan coordinates give a nan or 0 IoU, never suppressing, as in torchvision.) The areas are
    # computed outside (as torchvision does) and must reach here as materialized arrays, not be
    # recomputed in this fusion, for the same reason: area_a + area_b would be contracted too.
    inter = jnp.where(w > 0, w * h, jnp.float32(0))
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, valid: jnp.ndarray, iou_threshold: float,
        max_output: int, *, idxs: jnp.ndarray | None = None,
        tile_size: int = 512) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS with a fixed-size output; equals torchvision.ops.nms / batched_nms on valid boxes.

    Args:
      boxes: [N, 4] float32 xyxy (any other float dtype is cast to float32).
      scores: [N] float32.
      valid: [N] bool; invalid boxes are neither kept nor suppress anything.
      iou_threshold: Python float. A box is suppressed by a kept, higher-ranked box when their
        float32 IoU is strictly greater than the threshold taken as a double (see
        `float32_threshold`).
      max_output: static output size; only the first `max_output` kept boxes are returned.
      idxs: optional [N] int class / level ids; boxes only suppress boxes with the same id
        (batched NMS, like torchvision's `_batched_nms_vanilla`: IoUs of the original coordinates).
      tile_size: static number of sorted boxes resolved per step (memory O(N * tile_size)).

    Returns:
      indices: [max_output] int32 indices into the input, the kept boxes in descending score order
        (ties: lower input index first, torchvision's stable sort), padded with 0.
      keep_valid: [max_output] bool, True on the rows of `indices` that are real kept boxes.

    NaN scores are not supported (their rank is undefined). Works under jit and vmap.
    """
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
    thr = jnp.float32(float32_threshold(iou_threshold))
    boxes = lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
    scores = lax.stop_gradient(jnp.asarray(scores, jnp.float32))
    valid = jnp.asarray(valid, bool)

    # 1. Sort: valid first, score descending, index ascending. `+ 0.0` maps -0.0 to +0.0.
    iota = jnp.arange(n, dtype=jnp.int32)
    _, _, order = lax.sort(((~valid).astype(jnp.int32), -scores + 0.0, iota), num_keys=3)
    tile = min(tile_size, _round_up(n, 8))
    n_pad = _round_up(n, tile)
    num_tiles = n_pad // tile
    pad = n_pad - n
    sboxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
    sareas = _areas(sboxes)
    cand_all = jnp.pad(valid[order], (0, pad))
    ids = jnp.zeros((n,), jnp.int32) if idxs is None else jnp.asarray(idxs, jnp.int32)
    sids = jnp.pad(ids[order], (0, pad), constant_values=-1)

    # Kept boxes are appended to a compact buffer: cross suppression then costs [cap, tile] per
    # tile rather than [n_pad, tile], which matters when max_output << N.
    cap = min(_round_up(max_output, 8), n_pad)
    upper = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # row i ranks above column j

    def tile_body(state):
        t, keep, count, kboxes, kareas, kids = state
        start = t * tile
        tboxes = lax.dynamic_slice_in_dim(sboxes, start, tile)
        tareas = lax.dynamic_slice_in_dim(sareas, start, tile)
        tids = lax.dynamic_slice_in_dim(sids, start, tile)
        cand = lax.dynamic_slice_in_dim(cand_all, start, tile)

        # a. Cross suppression by every box kept in earlier tiles (the first `count` buffer rows).
        sup = _pairwise_iou(kboxes, kareas, tboxes, tareas) > thr  # [cap, tile]
        sup = sup & (jnp.arange(cap) < count)[:, None]
        if idxs is not None:
            sup = sup & (kids[:, None] == tids[None, :])
        cand = cand & ~jnp.any(sup, axis=0)

        # b. Self suppression inside the tile, by fixed-point iteration (exact greedy, see above).
        self_sup = (_pairwise_iou(tboxes, tareas, tboxes, tareas) > thr) & upper
        if idxs is not None:
            self_sup = self_sup & (tids[:, None] == tids[None, :])

        def sweep(s):
            k, _ = s
            new = cand & ~jnp.any(self_sup & k[:, None], axis=0)
            return new, jnp.any(new != k)

        tkeep, _ = lax.while_loop(lambda s: s[1], sweep, (cand, jnp.array(True)))
        keep = lax.dynamic_update_slice_in_dim(keep, tkeep, start, axis=0)
        dst = jnp.where(tkeep, count + jnp.cumsum(tkeep, dtype=jnp.int32) - 1, cap)
        kboxes = kboxes.at[dst].set(tboxes, mode='drop')
        kareas = kareas.at[dst].set(tareas, mode='drop')
        kids = kids.at[dst].set(tids, mode='drop')
        return t + 1, keep, count + jnp.sum(tkeep, dtype=jnp.int32), kboxes, kareas, kids

    def tile_cond(state):
        t, _, count = state[:3]
        return (t < num_tiles) & (count < max_output)

    init = (jnp.int32(0), jnp.zeros((n_pad,), bool), jnp.int32(0), jnp.zeros((cap, 4), jnp.float32),
            jnp.zeros((cap,), jnp.float32), jnp.zeros((cap,), jnp.int32))
    _, keep, count = lax.while_loop(tile_cond, tile_body, init)[:3]

    # 3. Compact the kept sorted positions into the first `count` output slots.
    rank = jnp.cumsum(keep, dtype=jnp.int32) - 1
    slot = jnp.where(keep, rank, max_output)[:n]  # max_output: out of range -> dropped
    indices = jnp.zeros((max_output,), jnp.int32).at[slot].set(order, mode='drop')
    keep_valid = jnp.arange(max_output) < count
    return indices, keep_valid
