"""2-D convolution for XLA:CPU: 1x1 convolutions as matmuls, kernel gradients as sums of matmuls.

XLA:CPU lowers the kernel gradient of a convolution (a convolution of the input with the output
gradient as its "kernel") to Eigen's spatial convolution with a huge window, which runs far below
matmul speed: measured on 2 EPYC cores (docs/performance.md), a 3x3 256->256 conv on 2x200x200
takes 10.4 s for dW against 2.2 s as nine matmuls, and the R50-FPN backbone's backward was 7x its
forward. Here dW[i, j] = sum_{b,y,x} x_pad[b, s*y + i, s*x + j, :]^T g[b, y, x, :], one strided
slice and one [Cin, BHW] x [BHW, Cout] matmul per kernel tap. The input gradient of a stride-1
conv stays XLA's own transpose (a plain convolution, already fast); that of a strided conv is
written as one stride-1 convolution per stride phase (`input_grad`), since XLA's form (a
convolution of the stride-dilated gradient) misses XLA:CPU's fast path. Forward is
`lax.conv_general_dilated`.

A 1x1 convolution is a [BHW, Cin] x [Cin, Cout] matmul (after a strided slice for stride 2), and
XLA:CPU runs the `dot` 1.2-4.7x faster than the same `convolution` op (measured on 2 EPYC cores,
docs/performance.md change 10: 36-170 GFLOP/s as a conv, 66-211 as a dot, worst for the 64- and
256-channel convs at 200x304 of res2); written as a dot, its gradients are dots too.

`conv_general_dilated` has lax's signature, so it plugs into `flax.linen.Conv(conv_general_dilated=
...)`. Both forms are used for NHWC/HWIO convs without dilation or groups on the CPU backend
(decided when tracing); everything else, and every other backend (cuDNN and the TPU compiler have
their own kernel-gradient convolutions and 1x1 lowering), goes to lax unchanged. Same numbers up to
summation order (the 1x1 dot: identical in every case measured).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _lax_conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_dw(x, w, strides, padding, precision):
    return _lax_conv(x, w, strides, padding, precision)


def _fwd(x, w, strides, padding, precision):
    return _lax_conv(x, w, strides, padding, precision), (x, w)


def kernel_grad(x: jnp.ndarray, g: jnp.ndarray, kernel_hw: tuple[int, int], strides, padding,
                precision=None) -> jnp.ndarray:
    """dL/dW [kh, kw, Cin, Cout] of an NHWC/HWIO conv, from its input x and output gradient g."""
    (pt, pb), (pl, pr) = padding
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    b, ho, wo, cout = g.shape
    cin = x.shape[3]
    sh, sw = strides
    g2 = g.reshape(b * ho * wo, cout)
    taps = []
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            xs = lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                           (1, sh, sw, 1))
            # As a 2-D [BHW, Cin]^T [BHW, Cout] dot: ~1.7x faster on XLA:CPU than the same
            # contraction written as a 4-D einsum (which transposes the slice first).
            taps.append(jnp.dot(xs.reshape(b * ho * wo, cin).T, g2, precision=precision,
                                preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(tuple(kernel_hw) + (cin, cout))


def input_grad(x_shape: Sequence[int], w: jnp.ndarray, g: jnp.ndarray, strides, padding,
               precision=None) -> jnp.ndarray:
    """dL/dx [B, H, W, Cin] of a strided NHWC/HWIO conv, as s_h * s_w stride-1 convolutions.

    XLA writes this gradient as one convolution of g dilated by the stride (`lhs_dilation`), which
    XLA:CPU's fast convolution path (YNNPACK) does not take: measured on 2 EPYC cores, the 3x3
    stride-2 convs of R50's res3-res5 first blocks at batch 2, 800x1216: 179, 88, 69 ms. Polyphase
    form: the padded input position q = s*a + r only receives the kernel taps k = r + s*m, so
    phase r of dx is the stride-1 correlation of g with those taps flipped (in/out channels
    swapped), and the phases interleave into dx: 77, 57, 52 ms. Same FLOPs as the forward.
    Needs kernel size >= stride per axis (every phase has a tap; the phase length covers g).
    """
    b, h, wd, cin = x_shape
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    _, ho, wo, _ = g.shape
    ah, aw = -(-(h + pt + pb) // sh), -(-(wd + pl + pr) // sw)       # phase lengths (ceil)
    rows = []
    for r in range(sh):
        cols = []
        for c in range(sw):
            taps = w[r::sh, c::sw]
            mh, mw = taps.shape[:2]
            taps = jnp.swapaxes(taps[::-1, ::-1], 2, 3)                  # [mh, mw, Cout, Cin]
            gp = lax.pad(g, jnp.zeros((), g.dtype),
                         ((0, 0, 0), (mh - 1, ah - ho, 0), (mw - 1, aw - wo, 0), (0, 0, 0)))
            cols.append(_lax_conv(gp, taps, (1, 1), ((0, 0), (0, 0)), precision))   # [B, ah, aw, Cin]
        rows.append(jnp.stack(cols, axis=3))                             # [B, ah, aw, sw, Cin]
    dx = jnp.stack(rows, axis=2).reshape(b, ah * sh, aw * sw, cin)       # [B, ah, sh, aw, sw, Cin]
    return dx[:, pt:pt + h, pl:pl + wd]


def _bwd(strides, padding, precision, res, g):
    x, w = res
    if tuple(strides) != (1, 1) and all(k >= s for k, s in zip(w.shape[:2], strides)):
        dx = input_grad(x.shape, w, g, strides, padding, precision).astype(x.dtype)
    else:   # stride 1: XLA's own gradient is a plain convolution and already fast
        _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, w, strides, padding, precision), x)
        (dx,) = vjp_x(g)
    dw = kernel_grad(x, g, w.shape[:2], strides, padding, precision).astype(w.dtype)
    return dx, dw


_conv_matmul_dw.defvjp(_fwd, _bwd)


def _use_matmul_dw(x, w, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count) -> bool:
    if jax.default_backend() != 'cpu' or x.ndim != 4 or feature_group_count != 1:
        return False
    if isinstance(padding, str) or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())):
        return False
    if dimension_numbers is None:
        return False
    dn = (dimension_numbers if isinstance(dimension_numbers, lax.ConvDimensionNumbers)
          else lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers))
    return dn == _NHWC


def pointwise_conv(x: jnp.ndarray, w: jnp.ndarray, strides: Sequence[int], precision=None) -> jnp.ndarray:
    """A 1x1 NHWC/HWIO convolution without padding as one matmul: x [B, H, W, Cin], w [1, 1, Cin,
    Cout] -> [B, ceil(H / sh), ceil(W / sw), Cout], as `lax.conv_general_dilated` computes it."""
    sh, sw = (int(s) for s in strides)
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw]
    b, h, wd, cin = x.shape
    y = jnp.dot(x.reshape(b * h * wd, cin), w.reshape(cin, w.shape[-1]), precision=precision)
    return y.reshape(b, h, wd, w.shape[-1])


def _zero_padding(padding) -> bool:
    if isinstance(padding, str):
        return padding.upper() in ('VALID', 'SAME')     # a 1x1 window never pads under 'SAME'
    return all(int(a) == 0 and int(b) == 0 for a, b in padding)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` with 1x1 convs as matmuls and the matmul kernel gradient where
    they apply (see above)."""
    if (batch_group_count == 1 and preferred_element_type is None and rhs.ndim == 4
            and tuple(rhs.shape[:2]) == (1, 1) and _zero_padding(padding)
            and _use_matmul_dw(lhs, rhs, ((0, 0), (0, 0)), lhs_dilation, rhs_dilation, dimension_numbers,
                               feature_group_count)):
        return pointwise_conv(lhs, rhs, window_strides, precision)
    if (batch_group_count == 1 and preferred_element_type is None
            and _use_matmul_dw(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                               feature_group_count)):
        pad = tuple((int(a), int(b)) for a, b in padding)
        return _conv_matmul_dw(lhs, rhs, tuple(int(s) for s in window_strides), pad, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
