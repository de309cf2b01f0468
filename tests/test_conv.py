"""The matmul-kernel-gradient convolution against XLA's own convolution and autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hypersparse_jax import conv

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 7, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),
    ((3, 6, 6, 2), (3, 2, 2, 3), (1, 2), "SAME"),
    ((1, 7, 7, 2), (3, 3, 2, 2), (1, 1), "VALID"),
    # stride-1 kernel gradient by rows: asymmetric padding, non-square and 1×1 kernels
    ((2, 6, 5, 3), (2, 3, 3, 4), (1, 1), ((0, 2), (1, 0))),
    ((2, 7, 4, 2), (5, 1, 2, 3), (1, 1), ((2, 2), (0, 0))),
    ((2, 5, 5, 3), (1, 1, 3, 4), (1, 1), ((0, 0), (0, 0))),
    # fewer output positions than kernel taps: the forward is a matrix product too
    ((3, 2, 2, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 4, 4, 3), (3, 3, 3, 2), (2, 2), ((1, 1), (1, 1))),
    ((2, 1, 1, 3), (3, 3, 3, 2), (1, 1), "SAME"),
    ((2, 3, 3, 2), (3, 3, 2, 6), (1, 1), "VALID"),
    # one input channel, at most 8 outputs: a sum of shifted, broadcast products
    ((3, 10, 10, 1), (3, 3, 1, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 1), (3, 3, 1, 3), (2, 2), "SAME"),
    ((2, 12, 12, 1), (5, 5, 1, 6), (1, 1), "VALID"),
    ((2, 6, 7, 1), (2, 1, 1, 5), (1, 2), ((0, 1), (1, 0))),
])
def test_value_and_gradients_match_lax(shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
  ours = lambda x, w: jnp.sum(jnp.sin(conv.conv_general_dilated(  # noqa: E731
      x, w, strides, padding, dimension_numbers=NHWC)))
  ref = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(  # noqa: E731
      x, w, strides, padding, dimension_numbers=NHWC)))
  # one input channel sums the taps in another order: float32 rounding of 25 taps ≈ 1.4e-6
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5 if shape[-1] == 1 else 1e-6)
  for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_tiny_outputs_use_a_matrix_product_and_others_keep_xla_forward():
  """The VGG 2×2 stage runs as a product (XLA:CPU's convolution is 70× slower there)."""
  fwd = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                               dimension_numbers=NHWC)
  w = jnp.ones((3, 3, 4, 5))
  tiny = str(jax.make_jaxpr(fwd)(jnp.ones((2, 2, 2, 4)), w))
  large = str(jax.make_jaxpr(fwd)(jnp.ones((2, 8, 8, 4)), w))
  assert "conv_general_dilated" not in tiny and "dot_general" in tiny
  assert "conv_general_dilated" in large
  grad = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(fwd(jnp.ones((2, 8, 8, 4)), w))))(w))
  assert "dot_general" in grad


def test_one_input_channel_uses_products_up_to_eight_outputs():
  """A grey-scale first layer of at most 8 filters (as channel pruning leaves it) runs
  without XLA:CPU's convolution in the forward; a wider one, or any inside
  plain_convolutions, keeps it."""
  def forward_jaxpr(kh, o):
    w = jnp.ones((kh, kh, 1, o))
    return str(jax.make_jaxpr(lambda x: conv.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=NHWC))(jnp.ones((2, 12, 12, 1))))
  assert "conv_general_dilated" not in forward_jaxpr(3, 8)
  assert "conv_general_dilated" not in forward_jaxpr(5, 6)
  assert "conv_general_dilated" in forward_jaxpr(3, 9)
  assert "conv_general_dilated" in forward_jaxpr(5, 20)
  with conv.plain_convolutions():
    assert "conv_general_dilated" in forward_jaxpr(3, 4)


def _numpy_pool(x):
  """2×2, stride-2 max pooling in NumPy, odd sizes floored."""
  n, h, w, c = x.shape
  return x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 5, 2), (1, 1, 4, 1)])
def test_max_pool_matches_numpy_and_flax_gradient(shape):
  """Values against NumPy; the gradient against Flax's pool (``reduce_window``), on an input
  with ties (small integers), where it must go to the same element of each window."""
  rng = np.random.default_rng(4)
  for x in (rng.standard_normal(shape), rng.integers(0, 3, shape)):
    x = jnp.asarray(x, jnp.float32)
    got = jax.jit(conv.max_pool_2x2)(x)
    np.testing.assert_array_equal(got, _numpy_pool(np.asarray(x)))
    dy = jnp.asarray(rng.standard_normal(got.shape), jnp.float32)
    (gx,) = jax.jit(lambda x, dy: jax.vjp(conv.max_pool_2x2, x)[1](dy))(x, dy)
    (want,) = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)[1](dy)
    np.testing.assert_array_equal(gx, want)
    # each window's gradient lands on one of its maxima
    assert float(jnp.sum(gx)) == pytest.approx(float(jnp.sum(dy)), rel=1e-5)
  xb = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  assert conv.max_pool_2x2(xb).dtype == jnp.bfloat16
  np.testing.assert_array_equal(conv.max_pool_2x2(xb).astype(jnp.float32),
                                _numpy_pool(np.asarray(xb.astype(jnp.float32))))


@pytest.mark.parametrize("shape", [(2, 8, 8, 4), (2, 2, 2, 4)])
def test_bfloat16_matches_lax_and_keeps_dtypes(shape):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.bfloat16)
  args = ((1, 1), ((1, 1), (1, 1)))
  ours = conv.conv_general_dilated(x, w, *args, dimension_numbers=NHWC)
  ref = lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), *args,
                                 dimension_numbers=NHWC)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_allclose(ours.astype(jnp.float32), ref, rtol=3e-2, atol=3e-2 * float(
      jnp.max(jnp.abs(ref))))
  gx, gw = jax.grad(lambda x, w: jnp.sum(conv.conv_general_dilated(
      x, w, *args, dimension_numbers=NHWC).astype(jnp.float32) ** 2), (0, 1))(x, w)
  rx, rw = jax.grad(lambda x, w: jnp.sum(lax.conv_general_dilated(
      x, w, *args, dimension_numbers=NHWC) ** 2), (0, 1))(x.astype(jnp.float32),
                                                          w.astype(jnp.float32))
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  for got, want in ((gx, rx), (gw, rw)):
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=5e-2,
                               atol=5e-2 * float(jnp.max(jnp.abs(want))))


def test_kernel_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 5, 2))
  w = rng.standard_normal((3, 3, 2, 2))
  f = lambda w: float(jnp.sum(jnp.sin(conv.conv_general_dilated(  # noqa: E731
      jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), (2, 2), ((1, 1), (1, 1)),
      dimension_numbers=NHWC))))
  g = np.asarray(jax.grad(lambda w: jnp.sum(jnp.sin(conv.conv_general_dilated(
      jnp.asarray(x, jnp.float32), w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC))))(
          jnp.asarray(w, jnp.float32)))
  h = 1e-2
  for idx in [(0, 0, 0, 0), (1, 2, 1, 0), (2, 1, 0, 1)]:
    e = np.zeros_like(w)
    e[idx] = h
    assert abs((f(w + e) - f(w - e)) / (2 * h) - g[idx]) < 2e-2 * max(1.0, abs(g[idx]))


def test_inside_flax_conv_and_fallback_for_dilation():
  x = jnp.ones((1, 6, 6, 2))
  fast = nn.Conv(3, (3, 3), padding="SAME", conv_general_dilated=conv.conv_general_dilated)
  plain = nn.Conv(3, (3, 3), padding="SAME")
  v = plain.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(fast.apply(v, x), plain.apply(v, x), rtol=1e-6)
  dilated = nn.Conv(3, (3, 3), kernel_dilation=(2, 2), conv_general_dilated=conv.conv_general_dilated)
  plain_dilated = nn.Conv(3, (3, 3), kernel_dilation=(2, 2))
  gd = jax.grad(lambda v: jnp.sum(dilated.apply(v, x) ** 2))(v)
  gp = jax.grad(lambda v: jnp.sum(plain_dilated.apply(v, x) ** 2))(v)
  np.testing.assert_allclose(gd["params"]["kernel"], gp["params"]["kernel"], rtol=1e-5)


@pytest.mark.parametrize("shape,out_channels", [
    ((2, 8, 8, 3), 5), ((2, 6, 10, 4), 3), ((3, 2, 2, 2), 4), ((2, 16, 16, 32), 32),
    ((2, 8, 8, 128), 128),
])
def test_winograd_value_and_gradients_match_lax(shape, out_channels):
  """F(2×2, 3×3) rounds differently from the direct sum: deviations measured on ResNet-32's
  layers are ≤ 1.4e-6 of the largest entry (forward, input and kernel gradient); checked at
  1e-5 of it."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], out_channels)) / np.sqrt(9 * shape[-1]),
                  jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape[:3] + (out_channels,)), jnp.float32)
  ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, precision=lax.Precision.HIGHEST)
  want_y, want_vjp = jax.vjp(ref, x, w)
  got_y, got_vjp = jax.vjp(jax.jit(conv.winograd_conv3x3), x, w)
  for got, want in zip((got_y, *got_vjp(dy)), (want_y, *want_vjp(dy))):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_winograd_refuses_odd_sizes_and_other_kernels():
  with pytest.raises(ValueError, match="even spatial sizes"):
    conv.winograd_conv3x3(jnp.ones((1, 5, 4, 2)), jnp.ones((3, 3, 2, 2)))
  with pytest.raises(ValueError, match="3x3 kernel"):
    conv.winograd_conv3x3(jnp.ones((1, 4, 4, 2)), jnp.ones((5, 5, 2, 2)))
