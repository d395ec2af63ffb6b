"""ops.conv: the matmul kernel gradient equals XLA's own convolution gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mrcnn_jax.ops import conv as conv_ops

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax(x, w, s, p):
    return lax.conv_general_dilated(x, w, (s, s), [(p, p)] * 2, dimension_numbers=NHWC,
                                    precision=lax.Precision.HIGHEST)


def _ours(x, w, s, p):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return conv_ops.conv_general_dilated(x, w, (s, s), [(p, p)] * 2, dimension_numbers=dn,
                                         precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize('k,s,hw', [(1, 1, (9, 7)), (1, 2, (9, 7)), (3, 1, (8, 11)), (3, 2, (9, 10)),
                                    (7, 2, (17, 12)), (2, 1, (6, 6))])
def test_value_and_gradients_equal_lax(k, s, hw):
    rng = np.random.default_rng(k * 10 + s)
    x = jnp.asarray(rng.normal(size=(2,) + hw + (5,)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
    p = k // 2
    y_ref = _lax(x, w, s, p)
    g = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: _ours(a, b, s, p), x, w)
    _, vjp_ref = jax.vjp(lambda a, b: _lax(a, b, s, p), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-5)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize('k,s,hw,padding', [
    (3, 2, (13, 21), ((1, 1), (1, 1))), (3, 2, (14, 15), ((0, 1), (2, 0))), (5, 2, (13, 12), ((2, 2), (2, 2))),
    (3, 3, (14, 16), ((1, 1), (1, 1))), (2, 2, (8, 9), ((0, 0), (0, 0))), (7, 2, (17, 12), ((3, 3), (3, 3)))])
def test_strided_input_gradient_equals_lax(k, s, hw, padding):
    """The polyphase input gradient of strided convs, odd sizes and asymmetric padding included."""
    rng = np.random.default_rng(k * 10 + s)
    x = jnp.asarray(rng.normal(size=(2,) + hw + (5,)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 5, 6)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def conv(fn, a):
        return fn(a, w, (s, s), padding, dimension_numbers=dn, precision=lax.Precision.HIGHEST)
    y, vjp_ref = jax.vjp(lambda a: conv(lax.conv_general_dilated, a), x)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    want = vjp_ref(g)[0]
    got = conv_ops.input_grad(x.shape, w, g, (s, s), padding, precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    # through the custom VJP, and without XLA's stride-dilated convolution
    _, vjp_ours = jax.vjp(lambda a: conv(conv_ops.conv_general_dilated, a), x)
    convs = [e for e in jax.make_jaxpr(vjp_ours)(g).jaxpr.eqns if e.primitive.name == 'conv_general_dilated']
    assert convs and all(tuple(e.params['lhs_dilation']) == (1, 1) for e in convs)
    np.testing.assert_allclose(vjp_ours(g)[0], want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_bf16_kernel_gradient_is_accumulated_in_f32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 16)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(2, 32, 32, 8)), jnp.bfloat16)
    dw = conv_ops.kernel_grad(x, g, (3, 3), (1, 1), ((1, 1), (1, 1)))
    assert dw.dtype == jnp.float32
    want = conv_ops.kernel_grad(x.astype(jnp.float32), g.astype(jnp.float32), (3, 3), (1, 1),
                                ((1, 1), (1, 1)), precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-3)


def test_grouped_and_dilated_convs_go_to_lax():
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 2, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    assert not conv_ops._use_matmul_dw(x, w, [(1, 1)] * 2, None, None, dn, 2)
    assert not conv_ops._use_matmul_dw(x, jnp.ones((3, 3, 4, 4)), [(1, 1)] * 2, None, (2, 2), dn, 1)
    assert not conv_ops._use_matmul_dw(x, jnp.ones((3, 3, 4, 4)), 'SAME', None, None, dn, 1)
    assert conv_ops._use_matmul_dw(x, jnp.ones((3, 3, 4, 4)), [(1, 1)] * 2, None, None, dn, 1)
    y = conv_ops.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=dn,
                                      feature_group_count=2)
    np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                                           dimension_numbers=dn, feature_group_count=2))


@pytest.mark.parametrize('padding', [[(0, 0)] * 2, 'VALID'])
def test_pointwise_conv_is_a_matmul_on_cpu(padding):
    """1x1 convs (bottleneck reduce/expand, shortcuts, FPN laterals) lower to a dot, which XLA:CPU
    runs faster than its convolution op; 1x1 with padding and 3x3 stay convolutions."""
    x = jnp.ones((2, 9, 7, 4))
    dn = lax.conv_dimension_numbers(x.shape, (1, 1, 4, 6), NHWC)

    def prims(w, pad, stride=(2, 2)):
        jaxpr = jax.make_jaxpr(lambda a, b: conv_ops.conv_general_dilated(
            a, b, stride, pad, dimension_numbers=dn))(x, w)
        return {str(e.primitive) for e in jaxpr.eqns} | {str(e.primitive) for e in jax.make_jaxpr(
            jax.grad(lambda a, b: conv_ops.conv_general_dilated(a, b, stride, pad, dimension_numbers=dn).sum(),
                     argnums=(0, 1)))(x, w).eqns}
    assert jax.default_backend() == 'cpu'
    one = prims(jnp.ones((1, 1, 4, 6)), padding)
    assert 'dot_general' in one and 'conv_general_dilated' not in one
    assert 'conv_general_dilated' in prims(jnp.ones((1, 1, 4, 6)), [(1, 1)] * 2)
    assert 'conv_general_dilated' in prims(jnp.ones((3, 3, 4, 6)), [(1, 1)] * 2, (1, 1))
