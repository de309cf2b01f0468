"""Tests for hypersparse_jax.masking against plain NumPy references.

The threshold is checked bit for bit against ``np.sort(|concat(float32 kernels)|)[floor(κ·n)]``,
on trees small enough for the direct sort and large enough for the counting passes, with ties,
zeros, extreme magnitudes, low-precision dtypes and custom predicates.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersparse_jax import masking, threshold
from hypersparse_jax.masking import (apply_mask, magnitude_mask, magnitude_threshold,
                                     rank_of_threshold, sparsity, sparsity_report)
from hypersparse_jax.threshold import Count

KAPPAS = (0.0, 0.5, 0.9, 0.98, 0.995, 0.999)


# ----------------------------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------------------------


def _np32(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32))


def _kernels(params, where=None):
  """Prunable leaves by the documented rule, found independently of the library."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if where is not None:
      keep = where(path, leaf)
    else:
      last = path[-1] if path else None
      keep = getattr(last, "key", None) == "kernel" and np.ndim(leaf) >= 2
    if keep:
      out.append(leaf)
  return out


def ref_threshold(params, kappa, where=None):
  a = np.sort(np.abs(np.concatenate([_np32(x).ravel() for x in _kernels(params, where)])))
  return a[min(int(math.floor(kappa * a.size)), a.size - 1)]


def assert_bits_equal(got, want):
  got = np.asarray(got, np.float32).reshape(())
  want = np.asarray(want, np.float32).reshape(())
  assert got.view(np.uint32) == want.view(np.uint32), (got, want)


# ----------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------

SHAPES_40K = [(3, 3, 16, 32), (100, 333), (7, 299)]           # 4608 + 33300 + 2093 = 40001
SHAPES_300K = [(3, 3, 64, 128), (511, 401), (97, 211), (1, 3)]  # 299109


def _tree(arrays, dtype=jnp.float32, extras=True):
  params = {f"layer{i}": {"kernel": jnp.asarray(a, dtype)} for i, a in enumerate(arrays)}
  if extras:  # non-prunable leaves with huge values: must never influence the threshold
    params["layer0"]["bias"] = jnp.full((7,), 1e4, dtype)
    params["bn"] = {"scale": jnp.full((5,), 1e4, dtype), "kernel": jnp.full((9,), 1e4, dtype)}
  return params


def _pattern(name, shapes, rng):
  sizes = [int(np.prod(s)) for s in shapes]
  n = sum(sizes)
  if name == "normal":
    flat = rng.standard_normal(n).astype(np.float32) * 0.05
  elif name == "ties":       # few distinct magnitudes, both signs
    flat = rng.choice(np.float32([0.25, 0.5, 0.75, 1.0, 2.0]), n) * rng.choice([-1, 1], n)
  elif name == "half_zero":  # half exactly zero (so κ=0 and 0.5-ε land in zeros)
    flat = rng.standard_normal(n).astype(np.float32)
    flat[rng.permutation(n)[: n // 2]] = 0.0
  elif name == "mostly_zero":  # κ·n inside a block of zeros for every κ <= 0.995 -> t = 0
    flat = np.zeros(n, np.float32)
    idx = rng.permutation(n)[: max(1, n // 500)]
    flat[idx] = rng.standard_normal(idx.size)
  elif name == "all_zero":
    flat = np.zeros(n, np.float32)
  elif name == "extreme":    # huge, tiny, subnormal, negative zero
    flat = rng.standard_normal(n).astype(np.float32)
    scale = rng.choice(np.float32([1e30, 1e-30, 1e-40, 1.0, -1e-42]), n)
    flat = (flat * scale).astype(np.float32)
    flat[rng.permutation(n)[:50]] = -0.0
  elif name == "sorted":     # candidates contiguous in memory: rows too crowded to gather from
    flat = np.sort(rng.standard_normal(n).astype(np.float32))
  elif name == "reversed_abs":
    flat = -np.sort(np.abs(rng.standard_normal(n).astype(np.float32)))[::-1]
  elif name == "narrow":     # all magnitudes within a few ulps of each other
    flat = (np.float32(1.0) + rng.integers(0, 8, n).astype(np.float32) * np.float32(2**-23))
    flat = flat.astype(np.float32) * rng.choice(np.float32([-1, 1]), n)
  else:
    raise ValueError(name)
  out, start = [], 0
  for s, size in zip(shapes, sizes):
    out.append(flat[start:start + size].reshape(s))
    start += size
  return out


PATTERNS = ("normal", "ties", "half_zero", "mostly_zero", "all_zero", "extreme", "sorted",
            "reversed_abs", "narrow")


# ----------------------------------------------------------------------------------------------
# magnitude_threshold
# ----------------------------------------------------------------------------------------------
# Compiling the counting path takes seconds per (tree structure, κ) on CPU and an eager call
# recompiles it, so counting-path checks compile once per κ and run every data pattern through.

SHAPES_SMALL = [(3, 3, 8, 16), (100, 33), (7, 29)]  # 1152 + 3300 + 203: direct sort


@functools.lru_cache(maxsize=None)
def _jitted_threshold(kappa, where=None):
  return jax.jit(lambda p: magnitude_threshold(p, kappa, where=where))


class ThresholdTest(chex.TestCase):

  def _check(self, params, kappas=KAPPAS, where=None):
    fn = self.variant(functools.partial(magnitude_threshold, where=where), static_argnums=1)
    for kappa in kappas:
      t = fn(params, kappa)
      assert t.dtype == jnp.float32 and t.shape == ()
      assert_bits_equal(t, ref_threshold(params, kappa, where))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 7)
  def test_tiny_trees(self, n):
    rng = np.random.default_rng(n)
    self._check({"dense": {"kernel": rng.standard_normal((n, 1)).astype(np.float32),
                           "bias": np.ones(1, np.float32)}})

  @chex.variants(with_jit=True, without_jit=True)
  def test_tiny_tree_hand_values(self):
    params = {"kernel": np.float32([[-3.0, 1.0, 0.0, -2.0, 5.0, 4.0, 6.0]])}
    fn = self.variant(magnitude_threshold, static_argnums=1)
    # sorted magnitudes: 0 1 2 3 4 5 6; index floor(κ·7)
    for kappa, want in [(0.0, 0.0), (0.14, 0.0), (0.15, 1.0), (0.5, 3.0), (0.9, 6.0),
                        (0.999, 6.0)]:
      assert float(fn(params, kappa)) == want

  @chex.variants(with_jit=True, without_jit=True)
  def test_direct_sort_all_patterns(self):
    rng = np.random.default_rng(1)
    for pattern in PATTERNS:
      self._check(_tree(_pattern(pattern, SHAPES_SMALL, rng)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision_leaves(self, dtype):
    rng = np.random.default_rng(11)
    for pattern in ("normal", "ties", "half_zero"):
      self._check(_tree(_pattern(pattern, SHAPES_SMALL, rng), dtype))

  @chex.variants(with_jit=True, without_jit=True)
  def test_where_predicates(self):
    rng = np.random.default_rng(8)
    params = {
        "conv": {"kernel": rng.standard_normal((3, 3, 8, 16)).astype(np.float32),
                 "bias": rng.standard_normal(16).astype(np.float32) * 100},
        "dense": {"kernel": rng.standard_normal((300, 15)).astype(np.float32),
                  "bias": rng.standard_normal(15).astype(np.float32) * 100},
        "emb": {"embedding": rng.standard_normal((80, 64)).astype(np.float32) * 3},
    }
    only_dense = lambda path, x: "dense" in masking.path_name(path) and jnp.ndim(x) >= 2
    everything = lambda path, x: True
    matrices = lambda path, x: jnp.ndim(x) >= 2
    for where in (None, only_dense, everything, matrices):
      self._check(params, kappas=(0.0, 0.5, 0.98), where=where)

  @chex.variants(with_jit=True, without_jit=True)
  def test_counting_path_just_above_direct_limit(self):
    # one call per variant (an eager call compiles the counting loops anew)
    rng = np.random.default_rng(3)
    n = threshold._DIRECT + 1
    flat = np.sort(rng.standard_normal(n).astype(np.float32))  # crowded rows: exact recount
    params = {"a": {"kernel": flat[:n - 45].reshape(-1, 4)}, "b": {"kernel": flat[n - 45:].reshape(9, 5)}}
    self._check(params, kappas=(0.98,))
    below = {"a": {"kernel": flat[:threshold._DIRECT].reshape(-1, 8)}}  # n = _DIRECT: direct sort
    self._check(below, kappas=(0.5, 0.999))


@pytest.mark.parametrize("kappa", [0.5, 0.98])
def test_counting_path_40k_all_patterns(kappa):
  assert sum(int(np.prod(s)) for s in SHAPES_40K) > threshold._DIRECT
  fn = _jitted_threshold(kappa)
  rng = np.random.default_rng(int(kappa * 100))
  for pattern in PATTERNS:
    params = _tree(_pattern(pattern, SHAPES_40K, rng))
    assert_bits_equal(fn(params), ref_threshold(params, kappa))


@pytest.mark.parametrize("kappa", [0.0, 0.999])
def test_counting_path_300k(kappa):
  fn = _jitted_threshold(kappa)
  rng = np.random.default_rng(17)
  for pattern in ("normal", "ties", "half_zero", "mostly_zero", "extreme", "sorted"):
    params = _tree(_pattern(pattern, SHAPES_300K, rng))
    assert_bits_equal(fn(params), ref_threshold(params, kappa))


def test_counting_path_mixed_low_precision_dtypes():
  rng = np.random.default_rng(12)
  fn = _jitted_threshold(0.9)
  for pattern in ("normal", "ties", "half_zero", "sorted"):
    a, b, c = _pattern(pattern, SHAPES_40K, rng)
    params = {"x": {"kernel": jnp.asarray(a, jnp.bfloat16)},
              "y": {"kernel": jnp.asarray(b, jnp.float16)},
              "z": {"kernel": jnp.asarray(c, jnp.bfloat16)}}
    assert_bits_equal(fn(params), ref_threshold(params, 0.9))


def test_counting_path_custom_where():
  rng = np.random.default_rng(13)
  everything = lambda path, x: True
  fn = _jitted_threshold(0.995, everything)
  for pattern in ("normal", "half_zero", "extreme"):
    params = _tree(_pattern(pattern, SHAPES_40K, rng))  # + 1e4 biases, counted here
    assert_bits_equal(fn(params), ref_threshold(params, 0.995, everything))


def test_kappa_in_block_of_zeros_gives_zero():
  rng = np.random.default_rng(5)
  params = _tree(_pattern("half_zero", SHAPES_SMALL, rng))
  assert float(magnitude_threshold(params, 0.3)) == 0.0
  assert float(magnitude_threshold(params, 0.49)) == 0.0
  assert float(magnitude_threshold(params, 0.51)) > 0.0
  assert float(magnitude_threshold(_tree(_pattern("all_zero", SHAPES_SMALL, rng)), 0.999)) == 0.0


def test_threshold_is_not_affected_by_non_prunable_leaves():
  rng = np.random.default_rng(0)
  k = rng.standard_normal((40, 40)).astype(np.float32)
  t1 = magnitude_threshold({"kernel": k}, 0.9)
  t2 = magnitude_threshold({"kernel": k, "bias": np.full(40, 1e9, np.float32),
                            "scale": np.zeros((40, 40), np.float32)}, 0.9)
  assert_bits_equal(t1, t2)
  assert_bits_equal(t1, np.sort(np.abs(k.ravel()))[1440])


# ----------------------------------------------------------------------------------------------
# Hint path of the exact selection
# ----------------------------------------------------------------------------------------------


def _bits(x):
  return jnp.asarray(np.float32(x).view(np.int32))


def test_threshold_hints_give_the_same_exact_value():
  kappa = 0.98
  fn = jax.jit(lambda p, h: masking._threshold(masking.prunable_leaves(p), kappa, h))
  rng = np.random.default_rng(21)
  for pattern in ("normal", "ties", "half_zero", "mostly_zero", "sorted", "extreme"):
    params = _tree(_pattern(pattern, SHAPES_40K, rng))
    want = ref_threshold(params, kappa)
    hints = [_bits(want), _bits(np.nextafter(want, np.float32(1))), _bits(want * 1.001),
             _bits(want * 0.97), _bits(want * 50), _bits(1e-6), jnp.int32(0), _bits(1e30),
             _bits(np.finfo(np.float32).max), jnp.int32(threshold._MAX_BITS), _bits(-1.0),
             jnp.int32(-1)]
    for hint in hints:
      assert_bits_equal(fn(params, hint), want)


# Leaves read in place (float32 leaves of at least ``_SEPARATE`` weights: the passes clear the
# sign bit as they read), tails shorter than a row, converted low-precision leaves, and hints
# near, slightly off (one pass, or two with two passes' row counts) and far off (sample
# quantiles in the second pass). ``_SEPARATE`` is lowered so that a 40k tree takes the path.
SHAPES_IN_PLACE = [(97, 131), (20011,), (40, 32), (7, 3), (3001,)]  # 37 020 > _DIRECT
IN_PLACE_DTYPES = [jnp.float32, jnp.float32, jnp.float32, jnp.float16, jnp.bfloat16]


@pytest.mark.parametrize("kappa", [0.0, 0.5, 0.98, 0.9999])
def test_counting_path_leaves_read_in_place(monkeypatch, kappa):
  monkeypatch.setattr(threshold, "_SEPARATE", 3000)
  n = sum(int(np.prod(s)) for s in SHAPES_IN_PLACE)
  assert n > threshold._DIRECT
  k = rank_of_threshold(kappa, n)
  fn = jax.jit(lambda arrays, h: jax.lax.bitcast_convert_type(threshold._kth_bits(
      threshold._flat_chunks([(None, a) for a in arrays]), n, k, h), jnp.float32))
  plain = jax.jit(lambda arrays: jax.lax.bitcast_convert_type(threshold._kth_bits(
      threshold._flat_chunks([(None, a) for a in arrays]), n, k), jnp.float32))
  chunks = threshold._flat_chunks(
      [(None, jnp.zeros(s, d)) for s, d in zip(SHAPES_IN_PLACE, IN_PLACE_DTYPES)])
  assert [c.shape[0] for c in chunks] == [1280 + 21, 12707, 20011, 3001]  # two float32 leaves read in place, a bfloat16 one converted
  rng = np.random.default_rng(int(kappa * 1e4))
  for pattern in ("normal", "ties", "half_zero", "mostly_zero", "extreme", "sorted", "narrow"):
    with np.errstate(over="ignore"):  # "extreme": float32's largest values round to inf in bfloat16
      arrays = [jnp.asarray(a, d) for a, d in zip(_pattern(pattern, SHAPES_IN_PLACE, rng),
                                                  IN_PLACE_DTYPES)]
    want = np.sort(np.abs(np.concatenate([_np32(a).ravel() for a in arrays])))[k]
    assert_bits_equal(plain(arrays), want)
    for hint in (want, np.nextafter(want, np.float32(1)), want * 1.0005, want * 0.9995,
                 want * 1.004, want * 0.97, want * 50, 1e-6, 0.0, 1e30):
      assert_bits_equal(fn(arrays, _bits(hint)), want)
    for hint in (jnp.int32(threshold._MAX_BITS), jnp.int32(-1)):
      assert_bits_equal(fn(arrays, hint), want)


# ----------------------------------------------------------------------------------------------
# Property test
# ----------------------------------------------------------------------------------------------

# a fixed menu of shapes keeps eager op compilation cached across examples
_small_shapes = st.sampled_from([(1, 1), (1, 5), (7, 3), (33, 2), (4, 4, 3), (3, 3, 2, 17)])


@st.composite
def _random_tree(draw):
  big = draw(st.integers(0, 4)) == 0  # 1 in 5: counting path, shapes fixed (compiled once)
  shapes = SHAPES_40K if big else draw(st.lists(_small_shapes, min_size=1, max_size=3))
  dtype = jnp.float32 if big else draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  ties = draw(st.sampled_from(["none", "levels", "zeros", "sign_only"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  scale = np.float32(draw(st.sampled_from([1e-3, 1.0, 30.0])))
  zero_frac = draw(st.floats(0.0, 1.0))
  leaves = []
  for s in shapes:
    x = rng.standard_normal(s).astype(np.float32) * scale
    if ties == "levels":
      x = np.round(x * 4) / 4
    elif ties == "zeros":
      x[rng.random(s) < zero_frac] = 0.0
    elif ties == "sign_only":
      x = np.sign(x)
    leaves.append(x.astype(np.float32))
  if big:
    kappa = draw(st.sampled_from([0.5, 0.98]))
  else:
    kappa = draw(st.one_of(st.sampled_from(KAPPAS), st.floats(0.0, 0.9999)))
  return _tree(leaves, dtype, extras=big), kappa, big


@settings(max_examples=40, deadline=None)
@given(_random_tree())
def test_property_threshold_matches_numpy_sort(example):
  params, kappa, big = example
  want = ref_threshold(params, kappa)
  if big:
    assert_bits_equal(_jitted_threshold(kappa)(params), want)
    return
  assert_bits_equal(magnitude_threshold(params, kappa), want)
  mask = magnitude_mask(params, kappa)
  for x, m in zip(_kernels(params), _kernels(mask)):
    np.testing.assert_array_equal(np.asarray(m), np.abs(_np32(x)) > want)


# ----------------------------------------------------------------------------------------------
# Masks, apply_mask, sparsity figures
# ----------------------------------------------------------------------------------------------


def _model_like(rng, dtype=jnp.float32):
  return {
      "Conv_0": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 8)), dtype),
                 "bias": jnp.asarray(rng.standard_normal(8), dtype)},
      "BatchNorm_0": {"scale": jnp.asarray(rng.standard_normal(8), dtype),
                      "bias": jnp.asarray(rng.standard_normal(8), dtype)},
      "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((200, 10)), dtype),
                  "bias": jnp.asarray(rng.standard_normal(10), dtype)},
  }


class MaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16, jnp.float16)
  def test_mask_keeps_exactly_above_threshold(self, dtype):
    params = _model_like(np.random.default_rng(1), dtype)
    fn = self.variant(magnitude_mask, static_argnums=1)
    for kappa in (0.0, 0.5, 0.9, 0.98):
      mask = fn(params, kappa)
      chex.assert_trees_all_equal_shapes(mask, params)
      t = ref_threshold(params, kappa)
      for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
        x = params[path[0].key][path[1].key]
        assert m.dtype == jnp.bool_
        if path[1].key == "kernel":
          np.testing.assert_array_equal(np.asarray(m), np.abs(_np32(x)) > t)
        else:
          assert np.all(np.asarray(m)), path

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_strict_with_ties_and_subnormals(self):
    w = np.float32([[0.5, -0.5, 0.5, 0.25], [1e-40, -2e-40, 3e-45, 0.0], [1e-30, 5.0, -0.5, 0.5]])
    params = {"kernel": w}
    fn = self.variant(magnitude_mask, static_argnums=1)
    for kappa in (0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.9):
      t = ref_threshold(params, kappa)
      np.testing.assert_array_equal(np.asarray(fn(params, kappa)["kernel"]), np.abs(w) > t,
                                    err_msg=f"kappa={kappa} t={t!r}")
    # every weight equal to t is dropped: sort index 6 (κ=0.5 of 12) is a tied 0.5
    assert not np.any(np.asarray(fn(params, 0.5)["kernel"])[np.abs(w) == 0.5])

  def test_mask_global_not_per_layer(self):
    params = {"a": {"kernel": np.full((10, 10), 0.01, np.float32)},
              "b": {"kernel": np.full((10, 10), 1.0, np.float32)}}
    params["b"]["kernel"][0, 0] = 0.5
    mask = magnitude_mask(params, 0.5)
    assert not np.any(np.asarray(mask["a"]["kernel"]))
    # t = sorted[100] = 0.5 -> keep everything strictly above in layer b
    assert int(np.sum(np.asarray(mask["b"]["kernel"]))) == 99

  @chex.variants(with_jit=True, without_jit=True)
  def test_apply_mask_zeroes_exactly_dropped(self):
    rng = np.random.default_rng(2)
    params = _model_like(rng)
    mask = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < 0.3), params)
    out = self.variant(apply_mask)(params, mask)
    for x, m, o in zip(jax.tree.leaves(params), jax.tree.leaves(mask), jax.tree.leaves(out)):
      x, m, o = np.asarray(x), np.asarray(m), np.asarray(o)
      assert o.dtype == x.dtype and o.shape == x.shape
      np.testing.assert_array_equal(o, np.where(m, x, 0))
      np.testing.assert_array_equal(o[m], x[m])
      assert np.all(o[~m] == 0)

  def test_apply_mask_on_bfloat16_updates(self):
    rng = np.random.default_rng(3)
    upd = _model_like(rng, jnp.bfloat16)
    mask = magnitude_mask(upd, 0.9)
    out = apply_mask(upd, mask)
    for x, m, o in zip(jax.tree.leaves(upd), jax.tree.leaves(mask), jax.tree.leaves(out)):
      assert o.dtype == jnp.bfloat16
      np.testing.assert_array_equal(_np32(o), np.where(np.asarray(m), _np32(x), 0))

  def test_sparsity_counts_zeros(self):
    rng = np.random.default_rng(4)
    params = _model_like(rng)
    k1 = np.asarray(params["Conv_0"]["kernel"]).copy()
    k2 = np.asarray(params["Dense_0"]["kernel"]).copy()
    k1[rng.random(k1.shape) < 0.4] = 0.0
    k2[rng.random(k2.shape) < 0.9] = -0.0
    params["Conv_0"]["kernel"], params["Dense_0"]["kernel"] = k1, k2
    params["BatchNorm_0"]["bias"] = np.zeros(8, np.float32)  # not prunable: not counted
    want = (np.sum(k1 == 0) + np.sum(k2 == 0)) / (k1.size + k2.size)
    assert sparsity(params) == pytest.approx(want, abs=1e-15)
    only_conv = lambda p, x: masking.path_name(p) == "Conv_0/kernel"
    assert sparsity(params, where=only_conv) == pytest.approx(np.mean(k1 == 0), abs=1e-15)

  def test_sparsity_after_mask_matches_numpy(self):
    params = _model_like(np.random.default_rng(5))
    pruned = apply_mask(params, magnitude_mask(params, 0.9))
    a = np.abs(np.concatenate([_np32(params["Conv_0"]["kernel"]).ravel(),
                               _np32(params["Dense_0"]["kernel"]).ravel()]))
    t = np.sort(a)[int(math.floor(0.9 * a.size))]
    assert sparsity(pruned) == pytest.approx(np.mean(a <= t), abs=1e-15)

  def test_sparsity_report_counts(self):
    rng = np.random.default_rng(6)
    params = _model_like(rng)
    k1 = np.asarray(params["Conv_0"]["kernel"]).copy()
    k1[:, :, :, :3] = 0.0
    params["Conv_0"]["kernel"] = k1
    k2 = np.asarray(params["Dense_0"]["kernel"])
    report = sparsity_report(params)
    by_name = {l.name: l for l in report.layers}
    assert set(by_name) == {"Conv_0/kernel", "Dense_0/kernel"}
    assert by_name["Conv_0/kernel"].kept == int(np.sum(k1 != 0))
    assert by_name["Conv_0/kernel"].total == k1.size
    assert by_name["Conv_0/kernel"].shape == k1.shape
    assert by_name["Dense_0/kernel"].kept == int(np.sum(k2 != 0)) == k2.size
    assert report.kept == int(np.sum(k1 != 0) + np.sum(k2 != 0))
    assert report.total == k1.size + k2.size
    assert report.sparsity == pytest.approx(1 - report.kept / report.total)
    assert by_name["Conv_0/kernel"].sparsity == pytest.approx(3 / 8)
    text = str(report)
    global_lines = [l for l in text.splitlines() if l.startswith("global")]
    assert len(global_lines) == 1
    assert f"{report.total:,}" in global_lines[0] and f"{report.kept:,}" in global_lines[0]
    assert "Conv_0/kernel" in text and "Dense_0/kernel" in text
    d = report.as_dict()
    assert d["kept"] == report.kept and d["total"] == report.total and len(d["layers"]) == 2

  def test_sparsity_report_with_mask(self):
    rng = np.random.default_rng(7)
    params = _model_like(rng)
    mask = magnitude_mask(params, 0.75)
    report = sparsity_report(params, mask)
    t = ref_threshold(params, 0.75)
    k1, k2 = _np32(params["Conv_0"]["kernel"]), _np32(params["Dense_0"]["kernel"])
    by_name = {l.name: l for l in report.layers}
    assert by_name["Conv_0/kernel"].kept == int(np.sum(np.abs(k1) > t))
    assert by_name["Dense_0/kernel"].kept == int(np.sum(np.abs(k2) > t))
    n = k1.size + k2.size
    assert report.total == n
    assert report.kept == n - (int(math.floor(0.75 * n)) + 1)  # no ties in continuous data


# ----------------------------------------------------------------------------------------------
# Count: two-word exact counting
# ----------------------------------------------------------------------------------------------


def _value(c):
  high, low = np.asarray(c.high, np.int64), np.asarray(c.low, np.int64)
  assert np.all((low >= 0) & (low < 2**16))
  return high * 2**16 + low


def test_count_sum_of_many_max_partials_exceeds_2_32():
  parts = list(jnp.full((5000,), 2**31 - 1, jnp.int32))  # 5000 int32 scalars
  c = Count.sum(parts)
  total = 5000 * (2**31 - 1)
  assert total > 2**32
  assert int(_value(c)) == total
  for v, le in [(total, True), (total - 1, False), (total + 1, True), (2**31, False),
                (2**32, False), (0, False), (10 * total, True)]:
    assert bool(c.le(v)) is le, v
    assert bool(c.gt(v)) is (not le), v


def test_count_sum_elementwise_mixed_partials():
  rng = np.random.default_rng(0)
  parts_np = rng.integers(0, 2**31 - 1, size=(600, 6), dtype=np.int64)
  parts_np[:, 0] = 2**31 - 1
  parts_np[:, 1] = 0
  parts_np[:, 2] = 2**16 - 1
  parts_np[:, 3] = 2**16
  c = Count.sum(list(jnp.asarray(parts_np, jnp.int32)))
  want = [int(x) for x in parts_np.sum(axis=0)]
  assert max(want) > 2**32
  assert [int(x) for x in _value(c)] == want
  assert c.high.dtype == jnp.int32 and c.low.dtype == jnp.int32


def test_count_sum_total_just_over_2_31():
  c = Count.sum([jnp.int32(2**30), jnp.int32(2**30), jnp.int32(1)])
  assert int(_value(c)) == 2**31 + 1


@pytest.mark.parametrize("value", [0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 + 12345,
                                   123456789012])
def test_count_of_le_gt(value):
  c = Count.of(value)
  assert int(_value(c)) == value
  for other in (value - 2**16, value - 1, value, value + 1, value + 2**16):
    if other < 0:
      continue
    assert bool(c.le(other)) is (value <= other), (value, other)
    assert bool(c.gt(other)) is (value > other), (value, other)


@pytest.mark.parametrize("a,b", [(5, 3), (3, 5), (2**32 + 7, 2**32 - 2**30), (2**40, 2**40 - 1),
                                 (2**40 - 1, 2**40), (2**35 + 65535, 2**35 + 65536),
                                 (123456789012, 123456789012 - (2**31 - 1))])
def test_count_minus_and_minus_int(a, b):
  assert int(Count.of(a).minus(Count.of(b))) == a - b
  assert int(Count.of(a).minus_int(b)) == a - b
  big = Count.sum([jnp.int32(2**31 - 1)] * 64)  # 64·(2^31 − 1), built from partials
  total = 64 * (2**31 - 1)
  assert int(big.minus_int(total - 12345)) == 12345
  assert int(big.minus(Count.of(total + 999))) == -999


# ----------------------------------------------------------------------------------------------
# rank_of_threshold
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa,n,want", [
    (0.98, 100, 98), (0.9, 10, 9), (0.0, 1, 0), (0.5, 1, 0), (0.999, 1, 0), (0.5, 2, 1),
    (0.5, 7, 3), (0.995, 200, 199), (0.995, 1000, 995), (0.999, 1000, 999), (0.7, 10, 7),
    (0.3, 10, 3), (0.9999999999, 10, 9), (0.98, 10**10, 98 * 10**8),
])
def test_rank_of_threshold(kappa, n, want):
  assert rank_of_threshold(kappa, n) == want


# ----------------------------------------------------------------------------------------------
# Errors at the API boundary
# ----------------------------------------------------------------------------------------------

_GOOD = {"Dense_0": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}


def _api_calls():
  return [lambda p, s: magnitude_threshold(p, s), lambda p, s: magnitude_mask(p, s)]


@pytest.mark.parametrize("bad,exc,text", [
    (-0.1, ValueError, "-0.1"), (1.0, ValueError, "1.0"), (1.5, ValueError, "1.5"),
    (float("nan"), ValueError, "nan"), ("abc", TypeError, "abc"), (None, TypeError, "None"),
    ([0.5], TypeError, r"\[0.5\]"),
])
def test_bad_sparsity_raises_with_value(bad, exc, text):
  for call in _api_calls():
    with pytest.raises(exc, match=text):
      call(_GOOD, bad)
  with pytest.raises(exc, match="sparsity"):
    magnitude_threshold(_GOOD, bad)


def test_numeric_string_sparsity_raises():
  with pytest.raises(TypeError, match="0.9"):
    magnitude_threshold(_GOOD, "0.9")


def test_traced_sparsity_raises():
  with pytest.raises(TypeError, match="sparsity"):
    jax.jit(magnitude_threshold)(_GOOD, 0.5)


@pytest.mark.parametrize("fn", [lambda p: magnitude_threshold(p, 0.5),
                                lambda p: magnitude_mask(p, 0.5), sparsity, sparsity_report])
def test_bad_trees_raise(fn):
  with pytest.raises(ValueError, match="empty"):
    fn({})
  with pytest.raises(ValueError, match="no prunable leaf.*bias"):
    fn({"Dense_0": {"bias": np.ones(3, np.float32)}, "BatchNorm_0": {"scale": np.ones(3)}})
  with pytest.raises(ValueError, match="no prunable leaf"):
    fn({"kernel": np.ones(3, np.float32)})  # 1-D kernel is not prunable by default
  with pytest.raises(TypeError, match="Dense_0/kernel.*int32"):
    fn({"Dense_0": {"kernel": np.ones((3, 3), np.int32)}})
  with pytest.raises(TypeError, match="bool"):
    fn({"kernel": np.ones((3, 3), bool)})
  nan = np.ones((3, 3), np.float32)
  nan[1, 2] = np.nan
  with pytest.raises(ValueError, match="Conv_1/kernel.*NaN"):
    fn({"Conv_1": {"kernel": nan}})
  inf = np.ones((3, 3), np.float32)
  inf[0, 0] = -np.inf
  with pytest.raises(ValueError, match="Conv_1/kernel.*infinite"):
    fn({"Conv_1": {"kernel": inf}})
  with pytest.raises(ValueError, match=re.escape("(0, 3)")):
    fn({"Conv_1": {"kernel": np.ones((0, 3), np.float32)}})


def test_apply_mask_mismatches_raise():
  params = {"a": {"kernel": np.ones((4, 3), np.float32), "bias": np.ones(3, np.float32)}}
  good = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
  with pytest.raises(ValueError, match="structure"):
    apply_mask(params, {"a": {"kernel": good["a"]["kernel"]}})
  with pytest.raises(ValueError, match="structure"):
    apply_mask(params, [good["a"]["kernel"], good["a"]["bias"]])
  with pytest.raises(ValueError, match=r"a/kernel.*\(3, 4\).*\(4, 3\)"):
    apply_mask(params, {"a": {"kernel": np.ones((3, 4), bool), "bias": good["a"]["bias"]}})
  with pytest.raises(TypeError, match="a/bias.*float32"):
    apply_mask(params, {"a": {"kernel": good["a"]["kernel"], "bias": np.ones(3, np.float32)}})
  with pytest.raises(TypeError, match="int32"):
    apply_mask(params, {"a": {"kernel": np.ones((4, 3), np.int32), "bias": good["a"]["bias"]}})
  with pytest.raises(ValueError, match="structure"):
    sparsity_report(params, {"a": {"kernel": good["a"]["kernel"]}})


def test_row_flags_from_first_pass_counts_match_a_recount():
  # The gather finds candidate rows from the first counting pass's per-row counts (tail rows
  # always flagged) or from one more pass; both against a NumPy recount, then the gather itself.
  rng = np.random.default_rng(5)
  sizes = (40_000, 1_000_003, 77)  # two chunks with a tail, one small
  chunks = [jnp.asarray(np.abs(rng.standard_normal(s)).astype(np.float32).view(np.int32))
            for s in sizes]
  n = sum(sizes)
  for kappa in (0.5, 0.98, 0.9999):
    k = masking.rank_of_threshold(kappa, n)
    want = np.sort(np.concatenate([np.asarray(c) for c in chunks]))[k]
    for rel in (1e-4, 1e-2):  # splits as ART's hint fan around the answer, and wider
      splits = jnp.asarray(np.sort(np.float32(want.view(np.float32)) * np.float32(
          [1 - 8 * rel, 1 - 2 * rel, 1 - rel, 1 - rel / 2, 1 + rel / 2, 1 + rel, 1 + 2 * rel,
           1 + 8 * rel])).view(np.int32))
      counts, rows = threshold._count_below(chunks, splits)
      full = threshold._Bracket(jnp.int32(0), jnp.int32(threshold._MAX_BITS),
                                threshold.Count.of(0), threshold.Count.of(n))
      br = threshold._narrow_by_counts(k, full, splits, counts)
      lo, hi = int(br.lo), int(br.hi)
      assert lo <= want <= hi
      # NumPy: does each row of _ROW (a chunk's last row short) hold a value in [lo, hi]?
      exact, tails_flagged = [], []
      for c in chunks:
        c = np.asarray(c)
        inside = (c >= lo) & (c <= hi)
        body = c.size - c.size % threshold._ROW
        row_any = list(inside[:body].reshape(-1, threshold._ROW).any(1))
        exact += row_any + ([inside[body:].any()] if body < c.size else [])
        tails_flagged += row_any + ([True] if body < c.size else [])
      from_counts = np.asarray(threshold._row_flags_from_counts(chunks, br, [(splits, rows)]))
      np.testing.assert_array_equal(from_counts, np.array(tails_flagged))
      by_pass = np.asarray(threshold._row_flags_by_pass(chunks, br))
      np.testing.assert_array_equal(by_pass, np.array(exact))
      # The gather from the flagged rows returns exactly the values in [lo, hi], sorted.
      values = np.concatenate([np.asarray(c) for c in chunks])
      cands = np.sort(values[(values >= lo) & (values <= hi)])
      capacity = max(int(np.sum(tails_flagged)), cands.size)
      got = np.asarray(threshold._gather_candidates(chunks, br, jnp.asarray(tails_flagged),
                                                    capacity))
      np.testing.assert_array_equal(got[:cands.size], cands)
      assert np.all(got[cands.size:] == 2**31 - 1)


def _recount_flags(chunks, lo, hi):
  # NumPy: does each row of _ROW (a chunk's last row short) hold a value in [lo, hi]? Tail rows
  # always flagged.
  flags = []
  for c in chunks:
    c = np.asarray(c)
    inside = (c >= lo) & (c <= hi)
    body = c.size - c.size % threshold._ROW
    flags += list(inside[:body].reshape(-1, threshold._ROW).any(1)) + ([True] if body < c.size
                                                                       else [])
  return np.array(flags)


def test_row_flags_from_two_passes_counts_match_a_recount():
  # A second pass at uniform splits inside the first pass's bracket: the new bracket's ends are
  # splits of either pass (the lowest piece starts at the first pass's split, the highest ends
  # at one), and the flags combine both passes' row counts. Ranks at both ends of the bracket.
  rng = np.random.default_rng(8)
  sizes = (50_000, 300_011, 5)
  chunks = [jnp.asarray(np.abs(rng.standard_normal(s)).astype(np.float32).view(np.int32))
            for s in sizes]
  values = np.sort(np.concatenate([np.asarray(c) for c in chunks]))
  n = values.size
  full = threshold._Bracket(jnp.int32(0), jnp.int32(threshold._MAX_BITS),
                            threshold.Count.of(0), threshold.Count.of(n))
  for kappa in (0.3, 0.9):
    k0 = masking.rank_of_threshold(kappa, n)
    want0 = values[k0]
    splits = jnp.asarray(np.sort(np.float32(want0.view(np.float32)) * np.float32(
        [0.9, 0.95, 0.98, 0.99, 1.01, 1.02, 1.05, 1.1])).view(np.int32))
    counts, rows = threshold._count_below(chunks, splits)
    first = threshold._narrow_by_counts(k0, full, splits, counts)
    lo1, hi1 = int(first.lo), int(first.hi)
    inside = np.nonzero((values >= lo1) & (values <= hi1))[0]
    for k in (int(inside[0]), int(inside[len(inside) // 2]), int(inside[-1])):
      br1 = threshold._narrow_by_counts(k, full, splits, counts)
      splits2 = threshold._uniform_splits(br1)
      counts2, rows2 = threshold._count_below(chunks, splits2)
      br = threshold._narrow_by_counts(k, br1, splits2, counts2)
      lo, hi = int(br.lo), int(br.hi)
      assert lo <= values[k] <= hi
      assert int(br.below_lo.minus_int(0)) == np.sum(values < lo)
      got = np.asarray(threshold._row_flags_from_counts(chunks, br, [(splits, rows),
                                                                     (splits2, rows2)]))
      np.testing.assert_array_equal(got, _recount_flags(chunks, lo, hi))


@pytest.mark.parametrize("n,size,density", [(1000, 64, 0.02), (625_750, 3655, 0.0006),
                                            (625_750, 300, 0.0), (100_000, 2000, 0.5)])
def test_true_indices_is_nonzero(n, size, density):
  rng = np.random.default_rng(n + size)
  flags = rng.random(n) < density
  want = np.nonzero(flags)[0][:size]
  want = np.concatenate([want, np.full(size - want.size, n)])
  got = np.asarray(jax.jit(threshold._true_indices, static_argnums=1)(jnp.asarray(flags), size))
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# The selections without data-dependent control flow (method="radix" and "sort")
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["radix", "sort"])
@pytest.mark.parametrize("kappa", [0.0, 0.5, 0.98, 0.999])
def test_radix_and_sort_selection_all_patterns(kappa, method):
  def fn(p):
    leaves = [x for _, x in masking.prunable_leaves(p)]
    n = sum(x.size for x in leaves)
    return threshold.kth_magnitude(leaves, rank_of_threshold(kappa, n), method=method)

  fn = jax.jit(fn)
  rng = np.random.default_rng(int(kappa * 1000) + 7)
  for pattern in PATTERNS:
    params = _tree(_pattern(pattern, SHAPES_40K, rng))
    assert_bits_equal(fn(params), ref_threshold(params, kappa))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_radix_selection_low_precision(dtype):
  rng = np.random.default_rng(11)
  arrays = [jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.05, dtype)
            for s in SHAPES_40K]
  flat = np.sort(np.abs(np.concatenate([_np32(a).ravel() for a in arrays])))
  for k in (777, flat.size - 1):
    assert_bits_equal(threshold.kth_magnitude(arrays, k, method="radix"), flat[k])


@pytest.mark.parametrize("bits_per_pass", [2, 5, 8])
def test_radix_selection_any_digit_width(bits_per_pass):
  # Every width covers the 31 bits (the last pass is shorter where 31 is no multiple).
  rng = np.random.default_rng(bits_per_pass)
  flat = np.concatenate([rng.standard_normal(30000) * 1e-20, rng.standard_normal(20001) * 1e3,
                         np.zeros(999), [np.finfo(np.float32).max, np.finfo(np.float32).tiny]]
                        ).astype(np.float32)
  chunks = [threshold.magnitude_bits(flat[:12345]), threshold.magnitude_bits(flat[12345:])]
  ref = np.sort(np.abs(flat))
  run = jax.jit(lambda c, k: threshold._kth_bits_radix(c, k, bits_per_pass), static_argnums=1)
  for k in (0, 999, 30500, flat.size - 1):  # in the zeros' block; just after; tiny; max
    got = np.asarray(run(chunks, k)).astype(np.int32).view(np.float32)
    assert_bits_equal(got, ref[k])
  with pytest.raises(ValueError, match="bits_per_pass"):
    threshold._kth_bits_radix(chunks, 0, 9)


def test_kth_magnitude_rejects_unknown_method():
  with pytest.raises(ValueError, match=r"method must be one of .*'sorting'"):
    threshold.kth_magnitude([jnp.ones(3)], 0, method="sorting")


def dynamic_control_flow(lowered):
  """While loops and branching ``case`` ops of a lowered program (StableHLO).

  ``lax.platform_dependent`` leaves a ``case`` whose branches only return constants (it picks
  the platform's branch index; XLA folds it) and a one-branch ``case``: neither is listed.
  """
  found = []

  def walk(op):
    op = op.operation
    if op.name == "stablehlo.while":
      found.append("while")
    if op.name == "stablehlo.case" and len(op.regions) > 1:
      if not all(o.operation.name in ("stablehlo.constant", "stablehlo.return")
                 for r in op.regions for b in r.blocks for o in b.operations):
        found.append("case")
    for r in op.regions:
      for b in r.blocks:
        for o in b.operations:
          walk(o)

  walk(lowered.compiler_ir("stablehlo").operation)
  return found


def test_radix_and_sort_hold_no_loops_or_branches():
  arrays = [jnp.ones(s, jnp.float32) for s in SHAPES_40K]
  for method, expected in (("bracket", True), ("radix", False), ("sort", False)):
    traced = jax.jit(lambda a: threshold.kth_magnitude(a, 1000, method=method)).trace(arrays)
    for platform in ("cpu", "cuda"):
      found = dynamic_control_flow(traced.lower(lowering_platforms=(platform,)))
      assert bool(found) == expected, (method, platform, found)
