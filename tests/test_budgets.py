"""Per-layer budgets (uniform, ERK) and N:M patterns: masks, thresholds, HyperSparse, art().

Every figure is checked against an independent computation: hand-worked ERK budgets, NumPy
restatements (sorts per leaf, loops over groups), autodiff of the loss form written out here
without the library's custom VJP, and finite differences.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypersparse_jax as hs
from hypersparse_jax import budgets, penalties

C = penalties.REFERENCE_SCALE


def _tree(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 8, 6)), "bias": jnp.ones(6)},
          "fc1": {"kernel": jax.random.normal(k[1], (48, 32)) * 0.1, "bias": jnp.zeros(32)},
          "fc2": {"kernel": jax.random.normal(k[2], (32, 10)) * 3.0, "bias": jnp.zeros(10)}}


KERNELS = ("conv", "fc1", "fc2")


# ------------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------------


def _erk_numpy(shapes, kappa):
  """ERK restated: solve for eps, make the largest raw density dense while eps*raw > 1."""
  n = np.array([np.prod(s) for s in shapes], float)
  raw = np.array([sum(s) for s in shapes], float) / n
  dense = np.zeros(len(shapes), bool)
  while True:
    eps = ((1 - kappa) * n.sum() - n[dense].sum()) / (raw[~dense] * n[~dense]).sum()
    if (eps * raw[~dense]).max() <= 1:
      return np.where(dense, 1.0, eps * raw)
    dense |= (~dense) & (raw == raw[~dense].max())


def test_erk_hand_worked():
  # 10x10 and 100x10 at 90 %: raw densities 0.2 and 0.11, eps = 110 / 130
  params = {"a": {"kernel": jnp.ones((10, 10))}, "b": {"kernel": jnp.ones((100, 10))}}
  s = hs.layer_sparsities(params, 0.9, "erk")
  assert s["a"]["kernel"] == pytest.approx(1 - 0.2 * 110 / 130, abs=1e-12)
  assert s["b"]["kernel"] == pytest.approx(1 - 0.11 * 110 / 130, abs=1e-12)
  # a small layer capped dense: 2x2 (raw 1) and 100x100 (raw 0.02) at 50 %: eps = 5002/204
  # would give the 2x2 density 24.5; it stays dense and the rest keeps 5002 - 4 = 4998 weights
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((100, 100))}}
  s = hs.layer_sparsities(params, 0.5, "erk")
  assert s["a"]["kernel"] == 0.0
  assert s["b"]["kernel"] == pytest.approx(1 - 4998 / 10000, abs=1e-12)


def test_erk_matches_numpy_and_totals():
  shapes = [(5, 5, 1, 20), (5, 5, 20, 50), (800, 500), (500, 10), (3, 7)]
  for kappa in (0.5, 0.9, 0.98, 0.995):
    dens = np.array(budgets.erk_densities(shapes, kappa))
    np.testing.assert_allclose(dens, _erk_numpy(shapes, kappa), rtol=1e-12)
    n = np.array([np.prod(s) for s in shapes], float)
    assert (dens * n).sum() == pytest.approx((1 - kappa) * n.sum(), rel=1e-12)
    assert dens.max() <= 1.0


def test_uniform_and_global_layer_sparsities():
  params = _tree()
  s = hs.layer_sparsities(params, 0.8, "uniform")
  assert all(s[k]["kernel"] == 0.8 for k in KERNELS)
  assert s["conv"]["bias"] is None  # not prunable
  # global: what the global mask removes from each layer, counted here
  g = hs.layer_sparsities(params, 0.8, "global")
  a = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).ravel() for k in KERNELS])
  t = np.sort(a)[int(math.floor(0.8 * a.size))]
  for k in KERNELS:
    w = np.abs(np.asarray(params[k]["kernel"]))
    assert g[k]["kernel"] == pytest.approx(np.mean(w <= t))


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_budget_masks_and_thresholds_match_numpy(distribution):
  params = _tree(1)
  kappa = 0.9
  budgets_ = hs.layer_sparsities(params, kappa, distribution)
  mask = hs.magnitude_mask(params, kappa, distribution=distribution)
  ts = hs.magnitude_threshold(params, kappa, distribution=distribution)
  for k in KERNELS:
    w = np.abs(np.asarray(params[k]["kernel"], np.float32)).ravel()
    kl = budgets_[k]["kernel"]
    t = np.sort(w)[min(int(math.floor(kl * w.size)), w.size - 1)]
    assert float(ts[k]["kernel"]) == t
    np.testing.assert_array_equal(np.asarray(mask[k]["kernel"]).ravel(), w > t)
    assert np.all(np.asarray(mask[k]["bias"]))


def test_erk_dense_leaf_keeps_everything_and_has_no_term():
  # the 2x2 leaf is dense under ERK at 50 %: mask all True, no threshold, zero HyperSparse grad
  params = {"a": {"kernel": jnp.array([[0.1, -0.2], [0.3, 0.4]])},
            "b": {"kernel": jax.random.normal(jax.random.PRNGKey(3), (100, 100))}}
  mask = hs.magnitude_mask(params, 0.5, distribution="erk")
  assert np.all(np.asarray(mask["a"]["kernel"]))
  assert hs.magnitude_threshold(params, 0.5, distribution="erk")["a"]["kernel"] is None
  g = hs.hypersparse_grad(params, 0.5, distribution="erk")
  assert np.all(np.asarray(g["a"]["kernel"]) == 0)
  assert np.any(np.asarray(g["b"]["kernel"]) != 0)


def test_achieved_sparsity_per_leaf():
  params = _tree(2)
  mask = hs.magnitude_mask(params, 0.75, distribution="uniform")
  for k in KERNELS:
    m = np.asarray(mask[k]["kernel"])
    # the reference's rule per leaf: floor(κ n) + 1 weights removed (distinct magnitudes)
    assert (~m).sum() == math.floor(0.75 * m.size) + 1


# ------------------------------------------------------------------------------------------------
# HyperSparse under a budget
# ------------------------------------------------------------------------------------------------


def _hs_unit_numpy(w, t):
  """The global HyperSparse gradient of one unit, in float64 NumPy."""
  a = np.abs(w)
  s = C / t
  A, T = a.sum(), np.tanh(s * a).sum()
  return np.sign(w) * s * (1 - np.tanh(s * a) ** 2) * A / T


def _plain_penalty(units_and_thresholds):
  """Σ_u A_u T_u / stop_gradient(T_u) − A_u, written with jnp.abs and autodiff only."""
  def f(ws):
    total = 0.0
    for w, t in zip(ws, units_and_thresholds):
      a = jnp.abs(w)
      s = C / t
      A, T = jnp.sum(a), jnp.sum(jnp.tanh(s * a))
      total = total + A * T / jax.lax.stop_gradient(T) - A
    return total
  return f


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_budget_gradient_matches_numpy_and_autograd(distribution):
  params = _tree(4)
  kappa = 0.9
  g = hs.hypersparse_grad(params, kappa, distribution=distribution)
  ts = hs.magnitude_threshold(params, kappa, distribution=distribution)
  ws = [params[k]["kernel"] for k in KERNELS]
  thr = [ts[k]["kernel"] for k in KERNELS]
  auto = jax.grad(_plain_penalty(thr))(ws)
  for k, w, t, ga in zip(KERNELS, ws, thr, auto):
    ref = _hs_unit_numpy(np.asarray(w, np.float64), float(t))
    np.testing.assert_allclose(np.asarray(g[k]["kernel"]), ref, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g[k]["kernel"]), np.asarray(ga), rtol=2e-4, atol=1e-6)
    assert np.all(np.asarray(g[k]["bias"]) == 0)
  # the loss form's autodiff is the closed form
  gl = jax.grad(lambda p: hs.hypersparse_penalty(p, kappa, distribution=distribution))(params)
  for k in KERNELS:
    np.testing.assert_allclose(np.asarray(gl[k]["kernel"]), np.asarray(g[k]["kernel"]),
                               rtol=1e-6, atol=1e-7)
  assert abs(float(hs.hypersparse_penalty(params, kappa, distribution=distribution))) < 1e-3


def test_budget_gradient_finite_differences():
  """The loss form's value moves as its gradient says, for the per-leaf thresholds held fixed
  (they are detached): central differences of the plain penalty at the same thresholds."""
  params = _tree(5)
  ts = hs.magnitude_threshold(params, 0.8, distribution="erk")
  ws = [np.asarray(params[k]["kernel"], np.float64) for k in KERNELS]
  thr = [float(ts[k]["kernel"]) for k in KERNELS]
  g = hs.hypersparse_grad(params, 0.8, distribution="erk")

  def value(ws_):  # the penalty with T's denominator frozen at its value for ws
    total = 0.0
    for w, w0, t in zip(ws_, ws, thr):
      a, a0 = np.abs(w), np.abs(w0)
      T0 = np.tanh(C / t * a0).sum()
      total += a.sum() * np.tanh(C / t * a).sum() / T0 - a.sum()
    return total

  rng = np.random.default_rng(0)
  for _ in range(6):
    li = rng.integers(len(KERNELS))
    idx = tuple(rng.integers(s) for s in ws[li].shape)
    h = 1e-6 * max(1.0, abs(ws[li][idx]))
    plus = [w.copy() for w in ws]
    minus = [w.copy() for w in ws]
    plus[li][idx] += h
    minus[li][idx] -= h
    fd = (value(plus) - value(minus)) / (2 * h)
    assert float(g[KERNELS[li]]["kernel"][idx]) == pytest.approx(fd, rel=1e-3, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# N:M
# ------------------------------------------------------------------------------------------------


def _nm_keep_numpy(a, n):
  """Per group (last axis): keep the n largest, ties to the earlier entry (stable sort)."""
  keep = np.zeros(a.shape, bool)
  flat, kflat = a.reshape(-1, a.shape[-1]), keep.reshape(-1, a.shape[-1])
  for g in range(flat.shape[0]):
    order = sorted(range(a.shape[-1]), key=lambda i: (-flat[g, i], i))
    kflat[g, order[:n]] = True
  return keep


def _groups_numpy(w, axis, m):
  moved = np.moveaxis(np.abs(w), axis, -1)
  return moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))


def _ungroup_numpy(g, shape, axis):
  moved_shape = np.moveaxis(np.empty(shape), axis, -1).shape
  return np.moveaxis(g.reshape(moved_shape), -1, axis)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_nm_mask_matches_numpy(n, m):
  params = {"conv": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 5))},
            "fc": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (24, 7))},
            "fc_bias_free": {"bias": jnp.ones(3)}}
  mask = hs.nm_mask(params, n, m)
  for name, axis in (("conv", 2), ("fc", 0)):
    w = np.asarray(params[name]["kernel"])
    ref = _ungroup_numpy(_nm_keep_numpy(_groups_numpy(w, axis, m), n), w.shape, axis)
    np.testing.assert_array_equal(np.asarray(mask[name]["kernel"]), ref)
    # exactly n of every m along the input axis
    counts = _groups_numpy(np.asarray(mask[name]["kernel"]).astype(float), axis, m).sum(-1)
    assert np.all(counts == n)
  assert np.all(np.asarray(mask["fc_bias_free"]["bias"]))


def test_nm_ties_keep_the_earlier_weight():
  w = jnp.array([[0.5], [-0.5], [0.5], [0.1], [0.0], [0.0], [0.0], [0.0]])
  m = np.asarray(hs.nm_mask({"d": {"kernel": w}}, 2, 4)["d"]["kernel"]).ravel()
  assert m.tolist() == [True, True, False, False, True, True, False, False]


def test_nm_undivisible_leaf_stays_dense_and_is_named():
  params = {"conv1": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (5, 5, 1, 20))},
            "fc": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (8, 3))}}
  mask = hs.nm_mask(params, 2, 4)
  assert np.all(np.asarray(mask["conv1"]["kernel"]))
  assert budgets.nm_dense_leaves(params, 2, 4) == [("conv1/kernel", (5, 5, 1, 20), 2)]
  g = hs.hypersparse_grad(params, 0.5, nm=(2, 4))
  assert np.all(np.asarray(g["conv1"]["kernel"]) == 0)
  report = hs.sparsity_report(params, mask, sparsity=0.5, nm=(2, 4))
  assert report.pattern["dense_leaves"] == ["conv1/kernel"]
  assert "dense (input not a multiple of 4): conv1/kernel" in str(report)
  assert report.pattern["groups_over_n"] == 0


def test_nm_violations_counts_groups():
  w = np.zeros((8, 2), np.float32)
  w[0:3, 0] = 1.0   # group 0 of column 0: three non-zeros
  w[4:6, 1] = 1.0   # group 1 of column 1: two
  assert budgets.nm_violations({"d": {"kernel": jnp.asarray(w)}}, 2, 4) == 1
  assert budgets.nm_violations({"d": {"kernel": jnp.asarray(w)}}, 1, 4) == 2


def test_nm_axis_rules():
  from jax.tree_util import DictKey
  path = lambda *names: tuple(DictKey(n) for n in names)  # noqa: E731
  assert budgets.nm_axis(path("fc", "kernel"), jnp.zeros((4, 3))) == 0
  assert budgets.nm_axis(path("conv", "kernel"), jnp.zeros((3, 3, 4, 2))) == 2
  assert budgets.nm_axis(path("attention", "query", "kernel"), jnp.zeros((8, 2, 4))) == 0
  assert budgets.nm_axis(path("attention", "out", "kernel"), jnp.zeros((2, 4, 8))) == 1
  assert budgets.nm_axis(path("token_embed", "embedding"), jnp.zeros((256, 8))) == 1
  assert budgets.nm_axis(path("conv1d", "kernel"), jnp.zeros((3, 8, 4))) == 1
  assert budgets.nm_axis(path("conv3d", "kernel"), jnp.zeros((3, 3, 3, 8, 4))) == 3


def test_nm_groups_the_input_channels_of_real_flax_layers():
  """Conv1D (W, I, O), Conv3D (D, H, W, I, O) and attention kernels as Flax makes them: groups run
  along the axis the layer contracts with its input (I for convolutions; d_model for q/k/v)."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x1, x3, xs):
      a = nn.Conv(6, (3,), name="c1d")(x1)
      b = nn.Conv(4, (2, 2, 2), name="c3d")(x3)
      c = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="att")(xs)
      return a.sum() + b.sum() + c.sum()

  shapes = jax.eval_shape(Net().init, jax.random.PRNGKey(3), jnp.ones((1, 5, 8)),
                          jnp.ones((1, 3, 3, 3, 8)), jnp.ones((1, 4, 8)))  # Flax's layouts
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)), shapes["params"])
  expected = {("c1d",): (1, (3, 8, 6)), ("c3d",): (3, (2, 2, 2, 8, 4)),
              ("att", "query"): (0, (8, 2, 4)), ("att", "key"): (0, (8, 2, 4)),
              ("att", "value"): (0, (8, 2, 4)), ("att", "out"): (1, (2, 4, 8))}
  mask = hs.nm_mask(params, 2, 4)
  for names, (axis, shape) in expected.items():
    w, k = params, mask
    for n_ in names:
      w, k = w[n_], k[n_]
    w, k = np.asarray(w["kernel"]), np.asarray(k["kernel"])
    assert w.shape == shape
    ref = _ungroup_numpy(_nm_keep_numpy(_groups_numpy(w, axis, 4), 2), w.shape, axis)
    np.testing.assert_array_equal(k, ref, err_msg="/".join(names))
  # the I axis of the 1-D convolution, checked through the layer itself: with an input that is
  # non-zero in one group of 4 channels only, each output sees at most 2 of them per tap
  w1 = np.asarray(params["c1d"]["kernel"]) * np.asarray(mask["c1d"]["kernel"])
  assert np.all((w1[:, 0:4, :] != 0).sum(axis=1) <= 2)


def _nm_grad_numpy(w, axis, n, m):
  """Per group: the global HyperSparse gradient with t = the largest magnitude pruned."""
  a = _groups_numpy(w.astype(np.float64), axis, m)
  keep = _nm_keep_numpy(a, n)
  g = np.zeros(a.shape)  # C order: the reshape below is a view
  fa, fk, fg = a.reshape(-1, m), keep.reshape(-1, m), g.reshape(-1, m)
  for i in range(fa.shape[0]):
    t = fa[i][~fk[i]].max()
    s = C / t
    A, T = fa[i].sum(), np.tanh(s * fa[i]).sum()
    fg[i] = s * (1 - np.tanh(s * fa[i]) ** 2) * A / T
  return np.sign(w) * _ungroup_numpy(g, w.shape, axis)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4)])
def test_nm_gradient_matches_numpy_and_autograd(n, m):
  params = {"conv": {"kernel": jax.random.normal(jax.random.PRNGKey(7), (3, 3, 8, 4))},
            "fc": {"kernel": jax.random.normal(jax.random.PRNGKey(8), (16, 6))}}
  kappa = 1 - n / m
  g = hs.hypersparse_grad(params, kappa, nm=(n, m))
  for name, axis in (("conv", 2), ("fc", 0)):
    w = np.asarray(params[name]["kernel"])
    np.testing.assert_allclose(np.asarray(g[name]["kernel"]), _nm_grad_numpy(w, axis, n, m),
                               rtol=2e-4, atol=1e-6)
  # autodiff of the loss form written out: one unit per group, thresholds from the mask
  mask = hs.nm_mask(params, n, m)

  def plain(p):
    total = 0.0
    for name, axis in (("conv", 2), ("fc", 0)):
      w = p[name]["kernel"]
      a = jnp.moveaxis(jnp.abs(w), axis, -1)
      a = a.reshape(a.shape[:-1] + (a.shape[-1] // m, m))
      k = jnp.moveaxis(mask[name]["kernel"], axis, -1).reshape(a.shape)
      t = jax.lax.stop_gradient(jnp.max(jnp.where(k, 0.0, a), axis=-1, keepdims=True))
      s = C / t
      A, T = jnp.sum(a, -1), jnp.sum(jnp.tanh(s * a), -1)
      total = total + jnp.sum(A * T / jax.lax.stop_gradient(T) - A)
    return total

  auto = jax.grad(plain)(params)
  gl = jax.grad(lambda p: hs.hypersparse_penalty(p, kappa, nm=(n, m)))(params)
  for name in ("conv", "fc"):
    np.testing.assert_allclose(np.asarray(g[name]["kernel"]), np.asarray(auto[name]["kernel"]),
                               rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gl[name]["kernel"]), np.asarray(g[name]["kernel"]),
                               rtol=1e-6, atol=1e-7)


def test_nm_pushes_the_pruned_and_frees_the_kept():
  """In a group with well-separated magnitudes, the M − N smallest get (nearly) the full
  L1-like push, the N largest (nearly) none."""
  w = jnp.array([[0.01], [2.0], [-0.02], [3.0]])
  g = np.abs(np.asarray(hs.hypersparse_grad({"d": {"kernel": w}}, 0.5, nm=(2, 4))["d"]["kernel"]))
  g = g.ravel()
  assert min(g[0], g[2]) > 50 * max(g[1], g[3])


# ------------------------------------------------------------------------------------------------
# art(), validation, reports
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,kappa", [(dict(distribution="erk"), 0.9),
                                      (dict(distribution="uniform"), 0.8),
                                      (dict(nm=(2, 4)), 0.5)])
def test_art_adds_lambda_times_the_pattern_gradient(kw, kappa):
  params = _tree(9)
  lam0 = 0.3
  tx = hs.art(kappa, lambda_init=lam0, eta=2.0, steps_per_epoch=1, warmup_epochs=1, **kw)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)
  update = jax.jit(tx.update)
  u0, state = update(grads, state, params)  # warm-up: untouched
  for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  u1, state = update(grads, state, params)
  hsg = hs.hypersparse_grad(params, kappa, **kw)
  for a, b, h in zip(jax.tree.leaves(u1), jax.tree.leaves(grads), jax.tree.leaves(hsg)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) + lam0 * np.asarray(h),
                               rtol=1e-5, atol=1e-6)  # jit vs eager float32 rounding
  assert float(state.lambda_) == pytest.approx(lam0)
  assert int(state.nonfinite_steps) == 0
  if "distribution" in kw:  # one threshold per leaf, the exact ones
    ts = hs.magnitude_threshold(params, kappa, **kw)
    expected = [0.0 if ts[k]["kernel"] is None else float(ts[k]["kernel"]) for k in KERNELS]
    np.testing.assert_array_equal(np.asarray(state.threshold), np.float32(expected))


def test_pattern_validation_messages():
  params = _tree()
  with pytest.raises(ValueError, match="distribution must be one of global, uniform, erk"):
    hs.magnitude_mask(params, 0.9, distribution="layerwise")
  with pytest.raises(ValueError, match="1 <= N < M"):
    hs.nm_mask(params, 4, 4)
  with pytest.raises(ValueError, match="2:4 has sparsity"):
    hs.hypersparse_grad(params, 0.9, nm=(2, 4))
  with pytest.raises(ValueError, match="does not combine"):
    hs.art(0.5, steps_per_epoch=1, nm=(2, 4), distribution="erk")
  with pytest.raises(ValueError, match="written N:M"):
    budgets.parse_nm("2-4")
  with pytest.raises(TypeError, match="must be an integer"):
    hs.nm_mask(params, 2.0, 4)
  assert budgets.parse_nm("1:4") == (1, 4)


def test_budget_report_shows_targets():
  params = _tree(3)
  mask = hs.magnitude_mask(params, 0.9, distribution="erk")
  report = hs.sparsity_report(params, mask, sparsity=0.9, distribution="erk")
  # the targets against the NumPy restatement of ERK (tree order: conv, fc1, fc2)
  dens = _erk_numpy([tuple(params[k]["kernel"].shape) for k in KERNELS], 0.9)
  for layer, d in zip(report.layers, dens):
    assert layer.target == pytest.approx(1 - d, abs=1e-12)
  assert "budget erk at 90.00% overall" in str(report)
  assert report.as_dict()["pattern"] == {"kind": "erk", "sparsity": 0.9}


@pytest.mark.parametrize("kwargs,message", [
    (dict(distribution="erk2", sparsity=0.9), "distribution must be one of global, uniform, erk, got 'erk2'"),
    (dict(distribution="erk2"), "got 'erk2'"),
    (dict(distribution="erk"), "distribution='erk' sets per-layer budgets from a sparsity"),
    (dict(nm=(2, 4), distribution="uniform"), "does not combine with distribution='uniform'"),
    (dict(nm=(2, 4), sparsity=0.9), "has sparsity 1 - 2/4 = 0.5; got sparsity 0.9"),
    (dict(nm=(4, 4)), "4"),
    (dict(sparsity=1.5), "1.5"),
])
def test_sparsity_report_refuses_what_it_cannot_show(kwargs, message):
  params = _tree(1)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    hs.sparsity_report(params, **kwargs)


def test_bfloat16_nm_mask():
  w = jax.random.normal(jax.random.PRNGKey(0), (16, 4)).astype(jnp.bfloat16)
  mask = np.asarray(hs.nm_mask({"d": {"kernel": w}}, 2, 4)["d"]["kernel"])
  ref = _ungroup_numpy(_nm_keep_numpy(_groups_numpy(np.asarray(w, np.float32), 0, 4), 2),
                       w.shape, 0)
  np.testing.assert_array_equal(mask, ref)
