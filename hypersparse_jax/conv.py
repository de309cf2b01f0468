"""A convolution that avoids XLA:CPU's two slow convolution cases (same results, faster).

Measured on XLA:CPU (JAX 0.10, 2 cores, batch 64, 3×3 kernels):

* **Kernel gradient.** XLA computes it as another convolution that contracts over the batch and
  slides over the whole image: for the 32×32 stages of a CIFAR ResNet about 40× slower than the
  forward pass (360 ms vs 9.5 ms for 64×32×32×32 → 32). Here it is matrix products instead. For
  stride 1, in an h-major layout ``(h, n, w, c)`` a shift by ``i`` rows is a contiguous slice, so
  ``dw[i, :] = xp[i:i+ho]ᵀ · [dy shifted by j = 0..kw-1]`` — ``kh`` products and no
  ``kh·kw``-fold patch matrix; strided convolutions use the stacked patches ``patchesᵀ · dy``.
* **Narrow layers.** A grey-scale first layer of at most 8 filters (channel pruning leaves
  such layers) is a sum of the kernel's shifted views of the input, each times its taps
  (broadcast), and the models pool layers of at most 8 channels with :func:`max_pool_2x2`:
  XLA:CPU's convolution and YNNPACK pooling are slow there (``_one_input_channel``).
* **Tiny outputs.** When a convolution has fewer output positions than kernel taps (VGG's 2×2
  stage: 2×2 output, 3×3 kernel, 512 → 512 channels) XLA's forward takes 860 ms where the same
  product as ``patches · w`` takes 12 ms; the input gradient follows (it is the transpose of
  whichever forward ran).

:func:`winograd_conv3x3` (Winograd F(2×2, 3×3), stride 1) is here too but not used by
:func:`conv_general_dilated`: on XLA:CPU it was slower than the above on the 32×32 stage of a
CIFAR ResNet and no faster elsewhere (``benchmarks/README.md``).

Pass it to Flax: ``nn.Conv(..., conv_general_dilated=conv.conv_general_dilated)``. Only the CPU
backend is specialised; on GPU/TPU, for calls it does not specialise (dilation, feature
groups, negative padding, other layouts), and inside :func:`plain_convolutions` (used while a
model is traced for export, so that converters such as jax2onnx see one convolution primitive),
it is ``lax.conv_general_dilated``. Memory: the
kernel gradient's shifted copies of one layer live during its backward pass (ResNet-32, batch
64: XLA's temporary buffers 0.49 GB with XLA's own gradient, 0.85 GB here).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_CONTRACT_0 = (((0,), (0,)), ((), ()))
# On CPU, layers this narrow pool with max_pool_2x2 (in the models) and, with one input
# channel, convolve as shifted products (_one_input_channel).
NARROW_POOL_CHANNELS = 8
_PLAIN_ONLY = contextvars.ContextVar("hypersparse_jax_plain_convolutions", default=False)


def specialised() -> bool:
  """Whether a call traced now gets the CPU specialisations here (the CPU backend, outside
  :func:`plain_convolutions`)."""
  return not _PLAIN_ONLY.get() and jax.default_backend() == "cpu"


@contextlib.contextmanager
def plain_convolutions():
  """Within this context :func:`conv_general_dilated` is ``lax.conv_general_dilated`` everywhere.

  The choice is made when a function is traced, so trace (``jax.make_jaxpr``, an exporter, a
  fresh ``jax.jit``) inside the context; functions jit-compiled before keep what they traced.
  Exporters need it: the CPU specialisation is a ``custom_vjp`` around either a convolution or
  a patch matrix product, whereas a single ``conv_general_dilated`` maps to one ONNX ``Conv``.
  """
  token = _PLAIN_ONLY.set(True)
  try:
    yield
  finally:
    _PLAIN_ONLY.reset(token)


def _out_size(size, k, stride, pad):
  return (size + pad[0] + pad[1] - k) // stride + 1


def _plain(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _views(x, kh, kw, strides, padding):
  """The ``kh·kw`` shifted (strided) views of the padded input, each ``(n, ho, wo, c)``, in
  the kernel's row-major tap order."""
  n, h, w, c = x.shape
  (sh, sw), (ph, pw) = strides, padding
  ho, wo = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  return [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def _patches(x, kh, kw, strides, padding):
  """The ``kh·kw`` shifted (strided) views of the padded input: ``(n·ho·wo, kh·kw·c)``."""
  views = _views(x, kh, kw, strides, padding)
  n, ho, wo, c = views[0].shape
  return jnp.stack(views, axis=3).reshape(n * ho * wo, kh * kw * c)


def _one_input_channel(c, o):
  """Whether the forward is a sum of shifted, broadcast products: one input channel (an image
  model's first layer, grey-scale) and at most :data:`NARROW_POOL_CHANNELS` outputs, as channel
  pruning leaves such layers. Alone, XLA:CPU's convolution is slow there (Fashion-MNIST, batch
  256, 28×28: 3×3, 1 → 2 in 6.8 ms, the products 0.3 ms; 5×5, 1 → 6: 7.8 / 0.7 ms). Inside a
  model it pays together with the narrow pool that follows (:func:`max_pool_2x2`); before
  Flax's pool of a wider layer XLA fuses the products into its slow pooling (LeNet-5 with 10
  conv1 filters: 16 → 58 ms), hence the same bound. (One-off measurements: benchmarks README,
  "XLA on narrow layers"; whole models in ``benchmarks/results/narrow_layers.json``.)"""
  return c == 1 and o <= NARROW_POOL_CHANNELS


def _forward(x, w, strides, padding):
  kh, kw, c, o = w.shape
  n, h, wd, _ = x.shape
  ho = _out_size(h, kh, strides[0], padding[0])
  wo = _out_size(wd, kw, strides[1], padding[1])
  if ho * wo < kh * kw:
    # Fewer output positions than kernel taps (VGG's 2×2 stage): XLA:CPU's convolution takes
    # 20–70× longer than the same product as a matrix multiplication here.
    out = jnp.matmul(_patches(x, kh, kw, strides, padding), w.reshape(kh * kw * c, o),
                     preferred_element_type=jnp.float32)
    return out.reshape(n, ho, wo, o).astype(jnp.result_type(x, w))
  if _one_input_channel(c, o):
    taps = w.reshape(kh * kw, o).astype(jnp.float32)
    out = sum(v.astype(jnp.float32) * taps[t] for t, v in
              enumerate(_views(x, kh, kw, strides, padding)))
    return out.astype(jnp.result_type(x, w))
  return _plain(x, w, strides, padding)


def _kernel_grad_rows(x, dy, kh, kw, padding):
  """Stride-1 kernel gradient: ``kh`` matrix products, no ``kh·kw``-fold patch matrix.

  ``dw[i, j] = Σ xp[i:i+ho]ᵀ · pad_j(dy)`` in the h-major layout, where ``pad_j`` places ``dy``
  at column offset ``j`` of the padded width (the ``kw`` shifts of ``dy`` side by side).
  """
  c, o = x.shape[-1], dy.shape[-1]
  ho, n, wo = dy.shape[1], dy.shape[0], dy.shape[2]
  xp = jnp.pad(jnp.transpose(x, (1, 0, 2, 3)), (padding[0], (0, 0), padding[1], (0, 0)))
  wp = xp.shape[2]
  dt = jnp.transpose(dy, (1, 0, 2, 3))
  d3 = jnp.concatenate([jnp.pad(dt, ((0, 0), (0, 0), (j, wp - wo - j), (0, 0)))
                        for j in range(kw)], axis=-1).reshape(ho * n * wp, kw * o)
  rows = [lax.dot_general(xp[i:i + ho].reshape(ho * n * wp, c), d3.astype(xp.dtype), _CONTRACT_0,
                          preferred_element_type=jnp.float32) for i in range(kh)]
  return jnp.stack(rows).reshape(kh, c, kw, o).transpose(0, 2, 1, 3)


def _kernel_grad(x, dy, w_shape, strides, padding):
  kh, kw, c, o = w_shape
  ho, wo = dy.shape[1], dy.shape[2]
  if strides == (1, 1) and ho * wo >= kh * kw:
    return _kernel_grad_rows(x, dy, kh, kw, padding)
  patches = _patches(x, kh, kw, strides, padding)
  dw = lax.dot_general(patches, dy.reshape(-1, o).astype(patches.dtype), _CONTRACT_0,
                       preferred_element_type=jnp.float32)
  return dw.reshape(kh, kw, c, o)


# Winograd F(2×2, 3×3): y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A per 4×4 input tile d and 2×2 output tile
# (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). The elementwise
# product summed over input channels is 16 batched matrix products, 2.25× fewer multiplications
# than the direct convolution; the transforms are additions (Bᵀ, Aᵀ) and a tiny einsum (G).
_WINOGRAD_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)


def _winograd_bt(d):
  """``Bᵀ`` applied to four slices along one tile axis (entries 0, ±1: additions only)."""
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _winograd_at(m):
  """``Aᵀ`` applied to four slices along one tile axis."""
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_conv3x3(x, w):
  """Stride-1 3×3 convolution with one pixel of zero padding, by Winograd F(2×2, 3×3).

  Same result as ``lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` up to float32 rounding (measured: relative
  deviation ≤ 2e-6 of the largest output, forward and both gradients, on ResNet-32's layers).
  Written in plain JAX operations, so ``jax.grad`` gives the input and kernel gradients as
  batched matrix products too.

  Args:
    x: ``(n, h, w, c)`` input with even ``h`` and ``w``.
    w: ``(3, 3, c, o)`` kernel.

  Returns:
    ``(n, h, w, o)``.
  """
  n, h, wd, c = x.shape
  if w.shape[:2] != (3, 3) or h % 2 or wd % 2:
    raise ValueError(f"winograd_conv3x3 needs a 3x3 kernel and even spatial sizes, got input "
                     f"{x.shape} and kernel {w.shape}")
  o = w.shape[-1]
  th, tw = h // 2, wd // 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = [lax.slice_in_dim(xp, a, a + 2 * th - 1, 2, axis=1) for a in range(4)]
  tiles = []
  for r in _winograd_bt(rows):
    tiles.extend(_winograd_bt([lax.slice_in_dim(r, b, b + 2 * tw - 1, 2, axis=2)
                               for b in range(4)]))
  v = jnp.stack(tiles).reshape(16, n * th * tw, c)
  u = jnp.einsum("ai,ijco,bj->abco", _WINOGRAD_G, w, _WINOGRAD_G).reshape(16, c, o)
  m = lax.dot_general(v, u.astype(v.dtype), (((2,), (1,)), ((0,), (0,))),
                      preferred_element_type=jnp.float32).reshape(4, 4, n, th, tw, o)
  out_rows = [jnp.stack(_winograd_at([mr[j] for j in range(4)]), axis=3)
              for mr in _winograd_at([m[i] for i in range(4)])]
  y = jnp.stack(out_rows, axis=2)  # (n, th, 2, tw, 2, o)
  return y.reshape(n, h, wd, o).astype(jnp.result_type(x, w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return _forward(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  return _forward(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _forward(x, w, strides, padding), x)
  (dx,) = input_vjp(dy)
  dw = _kernel_grad(x, dy, w.shape, strides, padding)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _pool_window(x):
  # a Python -inf: lax then takes its max-pool primitive, whose gradient is select-and-scatter
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


@jax.custom_vjp
def max_pool_2x2(x):
  """2×2 max pooling with stride 2 over an NHWC ``x`` (odd sizes floored): the same values as
  ``flax.linen.max_pool(x, (2, 2), strides=(2, 2))`` and the same gradient (it goes to the
  first maximum of each window, as ``lax.reduce_window``'s does), but the forward is the
  elementwise maximum of four strided slices.

  Why: XLA:CPU (JAX 0.10) runs a ``reduce_window`` fused with the convolution and ReLU before
  it as a YNNPACK fusion that is slow for narrow layers: on Fashion-MNIST's 28×28 at batch
  256, a 3×3 convolution to 2 channels, ReLU and the pool take 6.4–7.4 ms that way and 0.5 ms
  with four slices. For wide layers the slices lose (LeNet-5's 20-channel conv1 stage, whole
  model: 8.6 → 20 ms), so the models use this only up to :data:`NARROW_POOL_CHANNELS`
  channels, on the CPU backend (:func:`specialised`). Whole models, against XLA's convolution
  and Flax's pool throughout: ``benchmarks/bench_narrow_layers.py`` (VGG-11 pruned to
  2-4-7-7-13-13-13-13 filters 2.3× faster; models wider than 8 everywhere take the same path;
  the single-stage figures above are one-off measurements, benchmarks README, "XLA on narrow
  layers").
  On GPU/TPU and while exporting the models call Flax's pool.
  """
  n, h, w, c = x.shape
  if h < 2 or w < 2:  # no whole window: an empty result, as Flax's
    return jnp.zeros((n, h // 2, w // 2, c), x.dtype)
  window = lambda i, j: lax.slice(x, (0, i, j, 0), (n, h - h % 2, w - w % 2, c),  # noqa: E731
                                  (1, 2, 2, 1))
  return jnp.maximum(jnp.maximum(window(0, 0), window(0, 1)),
                     jnp.maximum(window(1, 0), window(1, 1)))


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, g):
  _, vjp = jax.vjp(_pool_window, x)
  return vjp(g)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """Drop-in for ``lax.conv_general_dilated`` with a matmul kernel gradient (see module doc)."""
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if not specialised():  # cuDNN / TPU gradients are fast
    return plain()
  ones = lambda d: d is None or all(v == 1 for v in d)  # noqa: E731
  if lhs.ndim != 4 or dimension_numbers is None or (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return plain()
  if not (ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
          and batch_group_count == 1 and preferred_element_type is None):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  if any(v < 0 for p in padding for v in p):
    return plain()
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), padding)
