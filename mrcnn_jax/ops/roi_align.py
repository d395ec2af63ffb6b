"""RoIAlign (single- and multi-level) in jax.numpy, with torchvision.ops.roi_align's semantics.

Layout: features NHWC, boxes per image with a static count ([B, R, 4] xyxy in input-image pixels).

torchvision conventions reproduced here (they bite when porting weights):
  * `aligned=False` (torchvision's default, and what its Mask R-CNN uses) does NOT shift boxes by
    half a pixel and clamps the RoI size to >= 1 feature pixel; `aligned=True` (Detectron2) maps a
    box to `x * scale - 0.5` and allows any size, so a box smaller than a pixel is not stretched.
  * Each output bin averages a `grid_h x grid_w` grid of bilinear samples at
    `start + bin * (p + (i + 0.5) / grid)`. `sampling_ratio <= 0` means adaptive:
    `grid = ceil(roi_size / output_size)` per box and axis.
  * A sample with y < -1 or y > height (same for x) contributes 0 but still counts in the average;
    a sample in [-1, 0) is clamped to 0; a sample at or past the last row/column reads that
    row/column only (no interpolation towards the padding).

Two evaluation forms giving the same numbers:
  * 'gather' (default, for CPU/GPU): per box and axis, 2 * grid (corner index, weight) pairs per
    output bin, with the grid average and bilinear weights folded into those separable weights;
    one gather of the `(out_h * 2 * grid) x (out_w * 2 * grid)` feature rows of each box, then a
    weighted sum. Multi-level: all levels are flattened into one buffer per image and each box
    gathers from its own level only.
  * 'einsum' (MXU-friendly, for TPU): the same separable weights scattered into dense
    interpolation matrices Wy [R, out_h, H] and Wx [R, out_w, W] (the grid is already summed into
    them, so they have at most 2 * grid nonzeros per row) contracted with the feature map.
    Multi-level: every level is contracted with zero weights for the boxes of other levels.
    Cost O(R * out * H * W * C): meant for small maps / accelerators, not CPU.

Float exactness. The sample coordinates are computed bit for bit as torchvision's C++ kernel
computes them (same operations, same order, no fused multiply-adds), because three decisions are discontinuous in them: the
adaptive grid ceil(roi / out), whether a sample is outside [-1, size] (contributes 0), and which
rows it interpolates. Integer boxes put samples exactly on those boundaries all the time. XLA is
not IEEE-faithful by default in two ways that matter here: it contracts a multiply feeding an add
into an FMA inside a fusion, and it rewrites x / c (c a constant or a broadcast) into
x * (1 / c). It also recomputes cheap elementwise producers separately in every consumer fusion,
not necessarily with the same rounding. Hence `_materialize` (products and integer decisions
computed once, never fused into consumers) and `_ieee_divide`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_METHODS = ('gather', 'einsum')


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _weight_dtype(features_dtype) -> jnp.dtype:
    """Interpolation maths in float32, or float64 when the features are float64 (parity tests)."""
    return jnp.promote_types(features_dtype, jnp.float32)


def _materialize(x: jnp.ndarray) -> jnp.ndarray:
    """x, computed once into a buffer: no consumer fusion recomputes it, and a rounded product
    cannot be contracted with a following add into an FMA.

    `lax.optimization_barrier` is dropped before fusion on XLA:CPU and no-op reductions are
    simplified away; a sort is never fused into its consumers, so sorting x next to a copy of
    itself (a no-op) pins it. Only used on small per-box / per-bin arrays.
    """
    pair = jnp.stack([x, x], axis=-1)
    return lax.sort(pair, dimension=pair.ndim - 1)[..., 0]


def _ieee_divide(x: jnp.ndarray, d) -> jnp.ndarray:
    """x / d, correctly rounded. XLA turns a division by a constant or broadcast divisor into a
    multiplication by its reciprocal; `x * 0 + d` is a full array (not simplified for floats),
    so the division stays a division."""
    return x / (x * 0.0 + d)


def _axis_samples(start, bin_size, grid, size, out: int, max_grid: int):
    """Bilinear corner indices and weights along one axis, torchvision's rules.

    Args:
      start, bin_size: [...] float RoI start and bin size in feature pixels.
      grid: [...] int32 samples per bin along this axis, 0 <= grid <= max_grid.
      size: [...] int32 valid extent (height or width) of the feature map for that box.
      out: static number of output bins; max_grid: static samples slots per bin.

    Returns:
      idx: [..., out, 2 * max_grid] int32 corner index (low, high per sample), within [0, size-1].
      w: [..., out, 2 * max_grid] float bilinear weight / grid (0 for samples outside the map
        and for unused adaptive slots), so that sum_k w * f[idx] is the grid average along this
        axis; the 2-D output is sum over both axes' (idx, w) of wy * wx * f[iy, ix].
    """
    dtype = start.dtype
    start = start[..., None, None]
    bin_size = bin_size[..., None, None]
    gridi = grid[..., None, None]
    gridf = jnp.maximum(gridi, 1).astype(dtype)
    sizei = size[..., None, None]
    sizef = sizei.astype(dtype)
    p = jnp.arange(out, dtype=dtype)[:, None]
    i = jnp.arange(max_grid)[None, :]
    # The C++ kernel's y = start + p * bin + ((i + .5) * bin) / grid, with the same roundings.
    y = (start + _materialize(p * bin_size)) + _ieee_divide((i + 0.5).astype(dtype) * bin_size, gridf)
    used = (i < gridi) & (y >= -1.0) & (y <= sizef)  # torchvision: outside [-1, size] -> 0
    # torchvision's effective coordinate: y <= 0 -> 0; y_low >= size - 1 -> y = y_low = size - 1,
    # i.e. exactly clip(y, 0, size - 1); then y_low = (int)y, y_high = min(y_low + 1, size - 1).
    yc = jnp.clip(y, 0.0, sizef - 1.0)
    low = jnp.clip(jnp.where(jnp.isnan(yc), 0.0, yc).astype(jnp.int32), 0, jnp.maximum(sizei - 1, 0))
    # Belt and braces: should the index fusion and the weight fusion ever round y differently, a
    # disagreement on floor(y) would make a whole output row read the wrong feature row. With
    # y_low computed once and the weights taken relative to that y_low, it only moves a weight
    # by an ulp.
    low = _materialize(low)
    high = jnp.minimum(low + 1, jnp.maximum(sizei - 1, 0))
    lowf = low.astype(dtype)
    zero = jnp.zeros((), dtype)
    ly = yc - lowf  # torchvision: ly = y - y_low, hy = 1 - ly (at the last row y == y_low: ly = 0)
    w_low = jnp.where(used, 1.0 - ly, zero) / gridf
    w_high = jnp.where(used, ly, zero) / gridf
    idx = jnp.stack([low, high], axis=-1)
    w = jnp.stack([w_low, w_high], axis=-1)
    shape = idx.shape[:-2] + (2 * max_grid,)
    return idx.reshape(shape), w.reshape(shape)


def _box_geometry(boxes, scale, aligned: bool, out_hw: tuple[int, int], sampling_ratio: int,
                  max_sampling_ratio: int):
    """RoI start / bin size / grid per axis, as torchvision.

    boxes [..., 4] float (weight dtype) in image pixels; scale [...] or scalar spatial scale.
    Returns ((start_y, bin_y, grid_y), (start_x, bin_x, grid_x), max_grid) with [...] arrays.
    """
    dtype = boxes.dtype
    offset = jnp.asarray(0.5 if aligned else 0.0, dtype)
    scale = jnp.asarray(scale, dtype)
    scaled = _materialize(boxes * scale[..., None])  # no FMA with the offset (module docstring)
    x1 = scaled[..., 0] - offset
    y1 = scaled[..., 1] - offset
    x2 = scaled[..., 2] - offset
    y2 = scaled[..., 3] - offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:  # torchvision (legacy): RoIs are at least 1x1 feature pixel
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    out_h, out_w = out_hw
    # Correctly rounded: ceil(roi / out) must be torchvision's (14 / 7 must give 2, not 3).
    bin_h = _ieee_divide(roi_h, out_h)
    bin_w = _ieee_divide(roi_w, out_w)
    if sampling_ratio > 0:
        max_grid = int(sampling_ratio)
        grid_h = jnp.full(roi_h.shape, max_grid, jnp.int32)
        grid_w = jnp.full(roi_w.shape, max_grid, jnp.int32)
    else:
        # Adaptive grid ceil(roi / out), capped at `max_sampling_ratio` static slots (see
        # roi_align's docstring). A grid <= 0 (empty or inverted box with aligned=True) gives no
        # samples and an output of 0, as torchvision. nan boxes also give 0. Computed once
        # (`_materialize`) so that every consumer sees the same integer.
        max_grid = int(max_sampling_ratio)

        def adaptive(g):
            g = jnp.where(jnp.isnan(g), 0.0, jnp.clip(jnp.ceil(g), 0.0, float(max_grid)))
            return _materialize(g.astype(jnp.int32))

        grid_h = adaptive(bin_h)
        grid_w = adaptive(bin_w)
    return (y1, bin_h, grid_h), (x1, bin_w, grid_w), max_grid


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f'method must be one of {_METHODS}, got {method!r}')


def _default_rois_per_step() -> int | None:
    """CPU: small chunks of boxes keep the gathered corner rows in cache (about 4x faster for
    1000 RoIs than one big gather, which XLA materializes); accelerators: all boxes at once."""
    return 8 if jax.default_backend() == 'cpu' else None


def _gather_pool(flat, base, stride, iy, wy, ix, wx, out_dtype, rois_per_step):
    """Weighted gather from a flat feature buffer.

    flat [P, C]; base, stride [B, R] int32 (flat row of the box's map origin, its row length);
    iy, wy [B, R, out_h, K]; ix, wx [B, R, out_w, K]. Returns [B, R, out_h, out_w, C].
    """
    b, r, out_h, k = iy.shape
    out_w = ix.shape[2]
    n = b * r
    c = flat.shape[1]
    wdtype = wy.dtype
    args = (base.reshape(n), stride.reshape(n), iy.reshape(n, out_h, k), wy.reshape(n, out_h, k),
            ix.reshape(n, out_w, k), wx.reshape(n, out_w, k))

    def pool(a):
        base, stride, iy, wy, ix, wx = a
        idx = (base[..., None, None, None, None] + iy[..., :, :, None, None] * stride[..., None, None, None, None]
               + ix[..., None, None, :, :])  # [..., out_h, K, out_w, K]
        vals = jnp.take(flat, idx, axis=0, mode='clip').astype(wdtype)  # [..., out_h, K, out_w, K, C]
        w = wy[..., :, :, None, None] * wx[..., None, None, :, :]
        return jnp.sum(vals * w[..., None], axis=(-4, -2))  # [..., out_h, out_w, C]

    if rois_per_step is None or rois_per_step >= n:
        out = pool(args)
    else:
        out = lax.map(pool, args, batch_size=int(rois_per_step))
    return out.reshape(b, r, out_h, out_w, c).astype(out_dtype)


def _dense_weights(idx, w, size: int):
    """[..., out, K] (index, weight) pairs -> dense [..., out, size] interpolation matrix."""
    onehot = idx[..., None] == jnp.arange(size, dtype=idx.dtype)
    return jnp.sum(jnp.where(onehot, w[..., None], jnp.zeros((), w.dtype)), axis=-2)


def _einsum_pool(features, iy, wy, ix, wx):
    """features [B, H, W, C]; iy, wy [B, R, out_h, K]; ix, wx [B, R, out_w, K] -> [B, R, oh, ow, C]."""
    _, h, w, _ = features.shape
    dy = _dense_weights(iy, wy, h)  # [B, R, out_h, H]
    dx = _dense_weights(ix, wx, w)  # [B, R, out_w, W]
    f = features.astype(wy.dtype)
    t = jnp.einsum('brph,bhwc->brpwc', dy, f, precision=lax.Precision.HIGHEST)
    return jnp.einsum('brqw,brpwc->brpqc', dx, t, precision=lax.Precision.HIGHEST)


def _valid_sizes(valid_hw, batch: int, h: int, w: int):
    """valid_hw [B, 2] or None -> (vh [B], vw [B]) int32."""
    if valid_hw is None:
        return jnp.full((batch,), h, jnp.int32), jnp.full((batch,), w, jnp.int32)
    valid_hw = jnp.asarray(valid_hw)
    return valid_hw[:, 0].astype(jnp.int32), valid_hw[:, 1].astype(jnp.int32)


def roi_align(features: jnp.ndarray, boxes: jnp.ndarray, output_size: int | tuple[int, int],
              spatial_scale: float, sampling_ratio: int, aligned: bool, *,
              valid_hw: jnp.ndarray | None = None, max_sampling_ratio: int = 8,
              method: str = 'gather', rois_per_step: int | None = -1) -> jnp.ndarray:
    """RoIAlign of per-image boxes on one feature map; torchvision.ops.roi_align semantics.

    Args:
      features: [B, H, W, C] float (float32 / bfloat16 / float64).
      boxes: [B, R, 4] float32 xyxy in input-image pixels (padding rows are allowed; they give
        whatever their coordinates give, so mask them downstream).
      output_size: int or (out_h, out_w).
      spatial_scale: feature pixels per image pixel (1/4 for P2).
      sampling_ratio: samples per bin and axis; <= 0 for torchvision's adaptive ceil(roi / out).
      aligned: False = torchvision (no half-pixel shift, RoI >= 1x1); True = Detectron2.
      valid_hw: optional [B, 2] int (height, width) of each image's meaningful feature region,
        used in place of the static H, W for the boundary rules (zero outside, clamp at the last
        row/column). This reproduces torchvision on an image that was padded only to a smaller
        size than our static canvas.
      max_sampling_ratio: static bound on the adaptive grid. A box needing more than this many
        samples per bin along an axis (roi_size > max_sampling_ratio * output_size feature pixels,
        e.g. > 56 pixels of its level for 7x7 with the default 8) is sampled on a uniform
        `max_sampling_ratio` grid per bin instead: still an average over evenly spaced samples
        covering the whole bin, but coarser than torchvision's, so its output differs slightly.
        Unused for sampling_ratio > 0.
      method: 'gather' (CPU/GPU) or 'einsum' (dense interpolation matrices, TPU); same numbers.
      rois_per_step: 'gather' only: pool this many boxes per `lax.map` step (None: all at once);
        the default -1 picks 8 on CPU (cache-sized chunks) and None on accelerators.

    Returns:
      [B, R, out_h, out_w, C] in the features' dtype (interpolation weights in float32, float64
      for float64 features).
    """
    _check_method(method)
    if rois_per_step == -1:
        rois_per_step = _default_rois_per_step()
    out_hw = _pair(output_size)
    b, h, w, c = features.shape
    r = boxes.shape[1]
    wdtype = _weight_dtype(features.dtype)
    boxes = jnp.asarray(boxes).astype(wdtype)
    (y0, bh, gh), (x0, bw, gw), max_grid = _box_geometry(
        boxes, spatial_scale, aligned, out_hw, sampling_ratio, max_sampling_ratio)
    vh, vw = _valid_sizes(valid_hw, b, h, w)
    vh = jnp.broadcast_to(vh[:, None], (b, r))
    vw = jnp.broadcast_to(vw[:, None], (b, r))
    iy, wy = _axis_samples(y0, bh, gh, vh, out_hw[0], max_grid)
    ix, wx = _axis_samples(x0, bw, gw, vw, out_hw[1], max_grid)
    if method == 'einsum':
        return _einsum_pool(features, iy, wy, ix, wx).astype(features.dtype)
    flat = features.reshape(b * h * w, c)
    base = jnp.broadcast_to((jnp.arange(b, dtype=jnp.int32) * (h * w))[:, None], (b, r))
    stride = jnp.full((b, r), w, jnp.int32)
    return _gather_pool(flat, base, stride, iy, wy, ix, wx, features.dtype, rois_per_step)


def box_levels(boxes: jnp.ndarray, k_min: int, k_max: int, canonical_scale: float = 224,
               canonical_level: int = 4, eps: float = 1e-6, eps_in_log: bool = False) -> jnp.ndarray:
    """FPN level index of each box (FPN paper, eq. 1), as torchvision's LevelMapper or, with
    eps_in_log, Detectron2's `assign_boxes_to_levels`.

    boxes: [..., 4] float xyxy in image pixels. Returns [...] int32 level index in
    [0, k_max - k_min] (0 = finest level k_min):
        torchvision:  k = clamp(floor(k0 + log2(sqrt(area) / s0) + eps), k_min, k_max) - k_min,
        Detectron2:   k = clamp(floor(k0 + log2(sqrt(area) / s0 + eps)), k_min, k_max) - k_min,
    evaluated in the boxes' dtype in the reference's order. A zero-area box gets -inf (or
    log2(eps)) -> k_min; a negative-area (inverted) box gets nan in the references (undefined
    level); here k_min.
    """
    boxes = jnp.asarray(boxes)
    dtype = boxes.dtype
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    s = jnp.sqrt(area)
    ratio = _ieee_divide(s, canonical_scale)
    if eps_in_log:
        k = jnp.floor(jnp.asarray(canonical_level, dtype) + jnp.log2(ratio + jnp.asarray(eps, dtype)))
    else:
        k = jnp.floor(jnp.asarray(canonical_level, dtype) + jnp.log2(ratio) + jnp.asarray(eps, dtype))
    k = jnp.where(jnp.isnan(k), float(k_min), jnp.clip(k, float(k_min), float(k_max)))
    return (k.astype(jnp.int32) - int(k_min)).astype(jnp.int32)


def multilevel_roi_align(features: Sequence[jnp.ndarray], boxes: jnp.ndarray,
                         output_size: int | tuple[int, int], sampling_ratio: int, aligned: bool, *,
                         scales: Sequence[float], canonical_scale: float = 224,
                         canonical_level: int = 4, level_eps: float = 1e-6, level_eps_in_log: bool = False,
                         valid_hw: Sequence[jnp.ndarray] | None = None, max_sampling_ratio: int = 8,
                         method: str = 'gather', rois_per_step: int | None = -1) -> jnp.ndarray:
    """Multi-level RoIAlign: each box is pooled from one FPN level (torchvision MultiScaleRoIAlign).

    Args:
      features: list over levels of [B, H_l, W_l, C] (same B, C, dtype), finest first, with
        spatial scale scales[l] (e.g. 1/4, 1/8, 1/16, 1/32 for P2..P5).
      boxes: [B, R, 4] float32 xyxy in input-image pixels.
      output_size, sampling_ratio, aligned, max_sampling_ratio, method, rois_per_step: as
        `roi_align` (torchvision's MultiScaleRoIAlign uses aligned=False).
      scales: per-level spatial scales, powers of 2. torchvision infers them from the feature and
        image sizes (2 ** round(log2(feature / image))); here they are given.
      canonical_scale, canonical_level, level_eps, level_eps_in_log: LevelMapper's s0, k0, eps
        and where eps goes; the level is `box_levels(boxes, k_min, k_max, ...)` with
        k_min = -log2(scales[0]), k_max = -log2(scales[-1]).
      valid_hw: optional list over levels of [B, 2] int (valid height, width of each level).

    Returns:
      [B, R, out_h, out_w, C] in the features' dtype.
    """
    _check_method(method)
    if rois_per_step == -1:
        rois_per_step = _default_rois_per_step()
    out_hw = _pair(output_size)
    num_levels = len(features)
    if len(scales) != num_levels:
        raise ValueError(f'{num_levels} feature levels but {len(scales)} scales')
    b, _, _, c = features[0].shape
    r = boxes.shape[1]
    dtype = features[0].dtype
    wdtype = _weight_dtype(dtype)
    boxes = jnp.asarray(boxes).astype(wdtype)
    k_min = int(round(-math.log2(scales[0])))
    k_max = int(round(-math.log2(scales[-1])))
    # [B, R]; computed once so that the scale, offset and size lookups agree (see _materialize).
    level = _materialize(box_levels(boxes, k_min, k_max, canonical_scale, canonical_level, level_eps,
                                    level_eps_in_log))

    hs = [f.shape[1] for f in features]
    ws = [f.shape[2] for f in features]
    scale = jnp.asarray(scales, wdtype)[level]
    if valid_hw is None:
        vh = jnp.asarray(hs, jnp.int32)[level]
        vw = jnp.asarray(ws, jnp.int32)[level]
    else:
        vhw = jnp.stack([jnp.asarray(v).astype(jnp.int32) for v in valid_hw], axis=1)  # [B, L, 2]
        vh = jnp.take_along_axis(vhw[..., 0], level, axis=1)
        vw = jnp.take_along_axis(vhw[..., 1], level, axis=1)
    (y0, bh, gh), (x0, bw, gw), max_grid = _box_geometry(
        boxes, scale, aligned, out_hw, sampling_ratio, max_sampling_ratio)
    iy, wy = _axis_samples(y0, bh, gh, vh, out_hw[0], max_grid)
    ix, wx = _axis_samples(x0, bw, gw, vw, out_hw[1], max_grid)

    if method == 'einsum':
        out = jnp.zeros((b, r) + out_hw + (c,), wdtype)
        for l, f in enumerate(features):
            on = (level == l)[:, :, None, None].astype(wdtype)
            out = out + _einsum_pool(f, iy, wy * on, ix, wx)
        return out.astype(dtype)

    # One flat buffer [B * sum_l H_l W_l, C]; each box reads its level at a row offset.
    sizes = [h * w for h, w in zip(hs, ws)]
    per_image = sum(sizes)
    flat = jnp.concatenate([f.reshape(b, s, c) for f, s in zip(features, sizes)], axis=1)
    flat = flat.reshape(b * per_image, c)
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    base = (jnp.arange(b, dtype=jnp.int32)[:, None] * per_image
            + jnp.asarray(offsets, jnp.int32)[level])
    stride = jnp.asarray(ws, jnp.int32)[level]
    return _gather_pool(flat, base, stride, iy, wy, ix, wx, dtype, rois_per_step)
