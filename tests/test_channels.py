"""Channel pruning: groups, the channel mask against NumPy, group HyperSparse against autograd
of the loss form written out here and a NumPy restatement, and slim()'s smaller models, whose
logits equal the masked models'."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypersparse_jax as hs
from hypersparse_jax import channels, models, penalties

C = penalties.REFERENCE_SCALE


def _init(model, seed=0, bn_noise=True):
  shape = model.default_input_shape
  v = jax.jit(lambda k: model.init(k, jnp.zeros(shape), train=False))(jax.random.PRNGKey(seed))
  v = jax.tree.map(np.asarray, v)
  rng = np.random.default_rng(seed)
  if bn_noise:  # BatchNorm scales, biases and statistics that are not the initial 1 / 0
    def jitter(path, x):
      name = jax.tree_util.keystr(path)
      if "scale" in name:
        return (rng.uniform(0.2, 2.0, x.shape) * rng.choice([-1, 1], x.shape)).astype(x.dtype)
      if "'bias'" in name and ("bn" in name or "features" in name or "downsample_1" in name):
        return rng.normal(0, 0.3, x.shape).astype(x.dtype)
      if "mean" in name:
        return rng.normal(0, 0.5, x.shape).astype(x.dtype)
      if "var" in name:
        return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
      return x
    v = jax.tree_util.tree_map_with_path(jitter, v)
  return jax.tree.map(jnp.asarray, v)


MODELS = {
    "lenet5": lambda: models.LeNet5(),
    "lenet300": lambda: models.LeNet300(),
    "cnn": lambda: models.DigitsCNN(),
    "vgg11": lambda: models.VGG(depth=11),
    "vgg11_nobn": lambda: models.VGG(depth=11, batch_norm=False),
    "resnet20": lambda: models.CIFARResNet(depth=20, num_classes=10),
    "resnet56": lambda: models.CIFARResNet(depth=56, num_classes=10),
}


def test_groups_of_the_library_models():
  def names(model):  # the groups depend on the parameters' names only: shapes suffice
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros(model.default_input_shape),
                                                 train=False), jax.random.PRNGKey(0))
    return [(g.name, "/".join(g.consumer), g.norm and "/".join(g.norm))
            for g in channels.channel_groups(shapes["params"])]
  assert names(models.LeNet5()) == [("conv1", "conv2", None), ("conv2", "fc1", None),
                                    ("fc1", "fc2", None)]
  assert names(models.LeNet300()) == [("fc1", "fc2", None), ("fc2", "fc3", None)]
  assert names(models.DigitsCNN()) == [("conv1", "conv2", "bn1"), ("conv2", "fc", "bn2")]
  vgg = names(models.VGG(depth=11))
  assert len(vgg) == 8 and vgg[0] == ("features_0", "features_4", "features_1")  # conv, bn, relu, pool, conv
  assert vgg[-1][1] == "classifier"
  r20 = names(models.CIFARResNet(depth=20, num_classes=10))
  assert len(r20) == 9  # one per BasicBlock: conv1 -> conv2
  assert all(p.endswith("/conv1") and c.endswith("/conv2") for p, c, _ in r20)
  r56 = names(models.CIFARResNet(depth=56, num_classes=10))
  assert len(r56) == 2 * 27  # Bottleneck: conv1 -> conv2 -> conv3
  with pytest.raises(ValueError, match="pass groups="):
    channels.channel_groups({"encoder": {"kernel": jnp.ones((2, 2))}})


def _numpy_keep(params, groups, kappa, normalized=True):
  """Magnitudes (BN scale or weight norm) / layer mean (raw with ``normalized=False``), global
  sort, then rescue each layer's largest channel."""
  mags = []
  for g in groups:
    if g.norm is not None:
      m = np.abs(np.asarray(channels._get(params, g.norm)["scale"], np.float32))
    else:
      k = np.asarray(channels._get(params, g.producer)["kernel"], np.float32)
      m = np.sqrt((np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1) ** 2).sum(1))
    mags.append((m / m.mean() if normalized else m).astype(np.float32))
  allm = np.concatenate(mags)
  t = np.sort(allm)[min(int(math.floor(kappa * allm.size)), allm.size - 1)]
  keeps = []
  for m in mags:
    keep = m > t
    keep[np.argmax(m)] = True
    keeps.append(keep)
  return keeps


@pytest.mark.parametrize("name,kappa,normalized", [
    ("lenet5", 0.5, True), ("lenet5", 0.9, True), ("cnn", 0.9, True), ("vgg11", 0.5, True),
    ("resnet20", 0.9, True), ("vgg11", 0.75, False), ("lenet5", 0.5, False)])
def test_channel_mask_matches_numpy(name, kappa, normalized):
  v = _init(MODELS[name]())
  params = v["params"]
  groups = channels.channel_groups(params)
  mask = hs.channel_mask(params, kappa, normalized=normalized)
  keeps = _numpy_keep(params, groups, kappa, normalized)
  if not normalized:  # the raw threshold differs from the normalised one on these weights
    assert any(not np.array_equal(a, b) for a, b in zip(keeps, _numpy_keep(params, groups, kappa)))
  covered = set()
  for g, keep in zip(groups, keeps):
    km = np.asarray(channels._get(mask, g.producer)["kernel"])
    np.testing.assert_array_equal(km.reshape(-1, km.shape[-1]).all(0), keep)
    np.testing.assert_array_equal(km.reshape(-1, km.shape[-1]).any(0), keep)
    covered.add(g.producer + ("kernel",))
    if "bias" in channels._get(params, g.producer):
      np.testing.assert_array_equal(np.asarray(channels._get(mask, g.producer)["bias"]), keep)
      covered.add(g.producer + ("bias",))
    if g.norm is not None:
      for leaf in ("scale", "bias"):
        np.testing.assert_array_equal(np.asarray(channels._get(mask, g.norm)[leaf]), keep)
        covered.add(g.norm + (leaf,))
  # everything else is kept: consumers, the head, and (ResNet) the residual stream's convs
  for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
    key = tuple(p.key for p in path)
    if key not in covered:
      assert np.all(np.asarray(m)), key


@pytest.mark.parametrize("normalized", [True, False])
def test_a_layer_never_loses_all_its_channels(normalized):
  """Columns with chosen norms: fc1 (300 units) has 100 channels at 0.1 and 200 in [1.3, 1.6]
  (layer mean 1), fc2 (100 units) 100 in [0.9, 1.1] × 1e-3 (mean ≈ 1 after normalising).
  At κ = 0.5 the threshold is fc1's smallest large channel, normalised or raw, so every fc2
  channel lies below it: fc2 keeps exactly its largest, fc1 those above the threshold."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(np.array, _init(models.LeNet300())["params"])

  def columns(shape, norms):
    k = rng.normal(size=shape)
    return (k / np.linalg.norm(k, axis=0) * norms).astype(np.float32)

  fc1 = np.concatenate([np.full(100, 0.1), rng.uniform(1.3, 1.6, 200)])
  fc1 *= 300 / fc1.sum()  # mean exactly 1: normalised = raw
  fc2 = rng.uniform(0.9, 1.1, 100)
  params["fc1"]["kernel"] = columns((784, 300), fc1)
  params["fc2"]["kernel"] = columns((300, 100), fc2 * 1e-3)
  params = jax.tree.map(jnp.asarray, params)
  t = np.sort(fc1)[100]  # rank floor(0.5·400) = 200 of the sorted 400: fc1's 101st smallest
  assert np.max(fc2 / fc2.mean() if normalized else fc2 * 1e-3) < t
  mask = hs.channel_mask(params, 0.5, normalized=normalized)
  alive = np.asarray(mask["fc2"]["kernel"]).any(0)
  assert alive.sum() == 1 and alive[np.argmax(fc2)]  # rescued: exactly its largest channel
  np.testing.assert_array_equal(np.asarray(mask["fc2"]["bias"]), alive)
  kept1 = np.asarray(mask["fc1"]["kernel"]).any(0)
  assert kept1.sum() == 199  # fc1 by the threshold alone: its large channels but the smallest
  np.testing.assert_array_equal(kept1, fc1 > np.sort(fc1)[100] * (1 + 1e-6))


def _numpy_uniform_keep(params, groups, kappa):
  """Per layer of n channels: all but the floor(κ·n) of smallest magnitude (NumPy's stable
  argsort: among equal magnitudes the earlier channel goes first)."""
  keeps = []
  for m in _numpy_mags(params, groups):
    drop = min(int(math.floor(kappa * m.size)), m.size - 1)
    keep = np.ones(m.size, bool)
    keep[np.argsort(m, kind="stable")[:drop]] = False
    keeps.append(keep)
  return keeps


def _numpy_mags(params, groups):
  out = []
  for g in groups:
    if g.norm is not None:
      out.append(np.abs(np.asarray(channels._get(params, g.norm)["scale"], np.float64)))
    else:
      k = np.asarray(channels._get(params, g.producer)["kernel"], np.float64)
      out.append(np.sqrt((np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1) ** 2).sum(1)))
  return out


@pytest.mark.parametrize("name,kappa", [("lenet5", 0.5), ("lenet5", 0.9), ("vgg11", 0.75),
                                        ("resnet20", 0.5), ("cnn", 0.3)])
def test_uniform_channel_mask_matches_numpy(name, kappa):
  params = _init(MODELS[name]())["params"]
  groups = channels.channel_groups(params)
  mask = hs.channel_mask(params, kappa, distribution="uniform")
  keep = hs.channel_mask(params, kappa, distribution="uniform", normalized=False)
  for g, want in zip(groups, _numpy_uniform_keep(params, groups, kappa)):
    for m in (mask, keep):  # the layer's own scale does not change its order
      km = np.asarray(channels._get(m, g.producer)["kernel"])
      np.testing.assert_array_equal(km.reshape(-1, km.shape[-1]).any(0), want, err_msg=g.name)
    if g.norm is not None:
      np.testing.assert_array_equal(np.asarray(channels._get(mask, g.norm)["scale"]), want)
  if name == "lenet5":
    kept = [int(np.asarray(mask[k]["bias"]).sum()) for k in ("conv1", "conv2", "fc1")]
  if name == "lenet5" and kappa == 0.5:  # by hand: 20, 50 and 500 channels lose 10, 25, 250
    assert kept == [10, 25, 250]
  if name == "lenet5" and kappa == 0.9:  # floor(18), floor(45), floor(450) removed
    assert kept == [2, 5, 50]


def test_uniform_channel_mask_by_hand_with_ties():
  """fc1's unit norms 2, 1, 1, 3: κ = 0.25 removes floor(1) = 1, the earlier of the tied 1s
  (unit 1); κ = 0.5 removes both; fc2 has 2 units of norms 5, 4: floor(0.5) = 0 at κ = 0.25,
  floor(1) = 1 (unit 1) at κ = 0.5. The global rule at κ = 0.5 would remove floor(3) + 1 = 4
  of the 6 (and rescue each layer's largest)."""
  params = {"fc1": {"kernel": jnp.array([[2., 0., 1., 0.], [0., 1., 0., 3.]]),
                    "bias": jnp.zeros(4)},
            "fc2": {"kernel": jnp.array([[5., 0.], [0., 4.], [0., 0.], [0., 0.]]),
                    "bias": jnp.zeros(2)},
            "fc3": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
  m = hs.channel_mask(params, 0.25, distribution="uniform")
  assert np.asarray(m["fc1"]["bias"]).tolist() == [True, False, True, True]
  assert np.asarray(m["fc2"]["bias"]).tolist() == [True, True]
  m = hs.channel_mask(params, 0.5, distribution="uniform")
  assert np.asarray(m["fc1"]["bias"]).tolist() == [True, False, False, True]
  assert np.asarray(m["fc2"]["bias"]).tolist() == [True, False]
  with pytest.raises(ValueError, match="'global'.*or 'uniform'.*got 'erk'"):
    hs.channel_mask(params, 0.5, distribution="erk")


@pytest.mark.parametrize("name,kappa", [("lenet5", 0.04), ("cnn", 0.6), ("vgg11", 0.75)])
def test_uniform_group_hypersparse_gradient_matches_autograd_and_numpy(name, kappa):
  """Per layer l: A_l·T_l/sg(T_l) − A_l over m̃ = ‖θ‖/sg(mean ‖θ‖), t_l the largest m̃ its
  mask removes; summed over the layers that lose a channel. LeNet-5 at κ = 0.04: conv1 (20
  channels) loses floor(0.8) = 0 and has no term."""
  params = _init(MODELS[name](), seed=4)["params"]
  groups = channels.channel_groups(params)
  grads, value, t = channels.channel_hypersparse(params, kappa, distribution="uniform")
  mags = _numpy_mags(params, groups)
  drops = [min(int(math.floor(kappa * m.size)), m.size - 1) for m in mags]
  tn = [np.sort(m / m.mean())[d - 1] if d else 0.0 for m, d in zip(mags, drops)]
  np.testing.assert_allclose(np.asarray(t), tn, rtol=1e-5)
  if name == "lenet5":
    assert drops[0] == 0 and float(t[0]) == 0.0
    assert not np.any(np.asarray(grads["conv1"]["kernel"]))

  def carriers(p, g):
    if g.norm is not None:
      return channels._get(p, g.norm)["scale"][:, None]
    k = channels._get(p, g.producer)["kernel"]
    return jnp.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)

  def penalty(p):
    total = 0.0
    for g, t_l, d in zip(groups, tn, drops):
      if not d:
        continue
      m = jnp.sqrt(jnp.sum(carriers(p, g) ** 2, axis=1))
      m = m / jax.lax.stop_gradient(jnp.mean(m))
      A, T = jnp.sum(m), jnp.sum(jnp.tanh(C / t_l * m))
      total = total + A * T / jax.lax.stop_gradient(T) - A
    return total

  auto = jax.grad(penalty)(params)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(auto)[0], jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(p))
  assert abs(float(value)) < 1e-3
  for g, m, t_l, d in zip(groups, mags, tn, drops):  # float64: s·sech²(s·m̃)·A/T·θ/(‖θ‖μ)
    th = np.asarray(carriers(params, g), np.float64)
    got = np.asarray(carriers(grads, g))
    if not d:
      assert not np.any(got)
      continue
    s, mu = C / t_l, m.mean()
    d_m = s * (1 - np.tanh(s * m / mu) ** 2) * (m / mu).sum() / np.tanh(s * m / mu).sum()
    np.testing.assert_allclose(got, (d_m / (m * mu))[:, None] * th, rtol=2e-4, atol=1e-7,
                               err_msg=g.name)


def test_art_over_channels_uniform_keeps_a_threshold_per_layer():
  params = _init(MODELS["lenet5"](), seed=2)["params"]
  tx = hs.art(0.5, lambda_init=0.1, eta=1.0, steps_per_epoch=1, warmup_epochs=1,
              structure="channel", distribution="uniform")
  state = tx.init(params)
  assert state.threshold.shape == (3,)
  zero = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zero, state, params)  # warm-up
  u, state = tx.update(zero, state, params)
  grads, _, t = channels.channel_hypersparse(params, 0.5, distribution="uniform")
  np.testing.assert_allclose(np.asarray(state.threshold), np.asarray(t), rtol=1e-6)
  assert np.all(np.asarray(t) > 0)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), 0.1 * np.asarray(b), rtol=1e-6, atol=1e-9)


def _plain_magnitudes(params, groups, normalized=True):
  """Per group, m = ‖θ‖ over its channels (BatchNorm scale where it has one, else the kernel's
  output slice), ÷ sg(mean m) when ``normalized``: written with jnp only."""
  mags = []
  for g in groups:
    if g.norm is not None:
      th = channels._get(params, g.norm)["scale"][:, None]
    else:
      k = channels._get(params, g.producer)["kernel"]
      th = jnp.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)
    m = jnp.sqrt(jnp.sum(th ** 2, axis=1))
    mags.append(m / jax.lax.stop_gradient(jnp.mean(m)) if normalized else m)
  return mags


def _plain_group_penalty(groups, t, kappa_unused=None):
  """A·T/sg(T) − A over m̃ = ‖θ‖/sg(mean ‖θ‖), written with jnp only."""
  def f(params):
    mags = _plain_magnitudes(params, groups)
    s = C / t
    A = sum(jnp.sum(m) for m in mags)
    T = sum(jnp.sum(jnp.tanh(s * m)) for m in mags)
    return A * T / jax.lax.stop_gradient(T) - A
  return f


@pytest.mark.parametrize("name", ["lenet5", "cnn", "resnet20"])
def test_group_hypersparse_gradient_matches_autograd_and_numpy(name):
  v = _init(MODELS[name](), seed=3)
  params = v["params"]
  kappa = 0.7
  grads, value, t = channels.channel_hypersparse(params, kappa)
  groups = channels.channel_groups(params)
  auto = jax.grad(_plain_group_penalty(groups, t))(params)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(auto)[0], jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(p))
  assert abs(float(value)) < 1e-3
  # NumPy restatement, float64, for the first group
  g0 = groups[0]
  if g0.norm is None:
    k = np.asarray(channels._get(params, g0.producer)["kernel"], np.float64)
    th = np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)
  else:
    th = np.asarray(channels._get(params, g0.norm)["scale"], np.float64)[:, None]
  allm = []
  for g in groups:
    if g.norm is None:
      kk = np.asarray(channels._get(params, g.producer)["kernel"], np.float64)
      m = np.sqrt((np.moveaxis(kk, -1, 0).reshape(kk.shape[-1], -1) ** 2).sum(1))
    else:
      m = np.abs(np.asarray(channels._get(params, g.norm)["scale"], np.float64))
    allm.append((m, m.mean()))
  s = C / float(t)
  A = sum((m / mu).sum() for m, mu in allm)
  T = sum(np.tanh(s * m / mu).sum() for m, mu in allm)
  m0, mu0 = allm[0]
  d = s * (1 - np.tanh(s * m0 / mu0) ** 2) * A / T
  ref = (d / (m0 * mu0))[:, None] * th
  got = (np.asarray(channels._get(grads, g0.norm)["scale"])[:, None] if g0.norm is not None
         else np.moveaxis(np.asarray(channels._get(grads, g0.producer)["kernel"]), -1, 0)
         .reshape(th.shape))
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["lenet5", "cnn", "vgg11"])
@pytest.mark.parametrize("normalized", [True, False])
def test_group_l1_gradient_matches_autograd_and_numpy(name, normalized):
  """``penalty='l1'``: Σ m̃ (or Σ m raw: network slimming's Σ|γ| with BatchNorm, the group
  lasso Σ‖θ‖ without), against autograd of that sum and a float64 NumPy restatement."""
  params = _init(MODELS[name](), seed=5)["params"]
  groups = channels.channel_groups(params)
  grads, value, _ = channels.channel_hypersparse(params, 0.5, penalty="l1",
                                                  normalized=normalized)

  def l1(p):
    return sum(jnp.sum(m) for m in _plain_magnitudes(p, groups, normalized))

  auto = jax.grad(l1)(params)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(auto)[0], jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(p))
  np.testing.assert_allclose(float(value), float(l1(params)), rtol=1e-5)
  for g in groups:  # NumPy: sign(γ)/μ with BatchNorm, θ/(‖θ‖·μ) without
    if g.norm is not None:
      gam = np.asarray(channels._get(params, g.norm)["scale"], np.float64)
      mu = np.abs(gam).mean() if normalized else 1.0
      np.testing.assert_allclose(np.asarray(channels._get(grads, g.norm)["scale"]),
                                 np.sign(gam) / mu, rtol=1e-5)
      assert not np.any(np.asarray(channels._get(grads, g.producer)["kernel"]))
    else:
      k = np.asarray(channels._get(params, g.producer)["kernel"], np.float64)
      norms = np.sqrt((k.reshape(-1, k.shape[-1]) ** 2).sum(0))
      mu = norms.mean() if normalized else 1.0
      np.testing.assert_allclose(np.asarray(channels._get(grads, g.producer)["kernel"]),
                                 k / (norms * mu), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("penalty,normalized", [("hypersparse", True), ("l1", True),
                                                 ("l1", False)])
def test_art_over_channels_adds_lambda_times_the_group_gradient(penalty, normalized):
  """``art(structure='channel')``: the warm-up step leaves the updates alone, then each update
  is ``g + λ_e·∇`` of the group penalty, λ growing by η; with ``penalty='l1',
  normalized=False`` the term is network slimming's ``λ·sign(γ)`` on the BatchNorm scales and
  ``λ·θ/‖θ‖`` on the weights of groups without BatchNorm (NumPy, by hand)."""
  params = _init(models.DigitsCNN(), seed=4)["params"]
  lam0, kappa = 0.3, 0.5
  tx = hs.art(kappa, lambda_init=lam0, eta=2.0, steps_per_epoch=1, warmup_epochs=1,
              penalty=penalty, structure="channel", normalized=normalized)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)
  update = jax.jit(tx.update)
  u0, state = update(grads, state, params)
  for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(state.lambda_) == 0.0
  term, _, t = channels.channel_hypersparse(params, kappa, penalty=penalty, normalized=normalized)
  for epoch, lam in ((1, lam0), (2, 2 * lam0)):
    u, state = update(grads, state, params)
    assert float(state.lambda_) == pytest.approx(lam)
    for a, b, h in zip(jax.tree.leaves(u), jax.tree.leaves(grads), jax.tree.leaves(term)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b) + lam * np.asarray(h),
                                 rtol=1e-5, atol=1e-6)
    if penalty == "l1" and not normalized:  # by hand: Liu et al.'s subgradient
      for g in channels.channel_groups(params):
        gam = np.asarray(channels._get(params, g.norm)["scale"])
        np.testing.assert_allclose(np.asarray(channels._get(u, g.norm)["scale"]),
                                   0.5 + lam * np.sign(gam), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(channels._get(u, g.producer)["kernel"]), 0.5)
  if penalty == "hypersparse":  # the channel threshold is kept in the state
    assert float(state.threshold) == pytest.approx(float(t), rel=1e-6) and float(t) > 0


def test_art_over_channels_refuses_what_it_cannot_do():
  with pytest.raises(ValueError, match="does not combine with an N:M pattern"):
    hs.art(0.5, steps_per_epoch=1, structure="channel", nm=(2, 4))
  with pytest.raises(ValueError, match="'global'.*or 'uniform'.*got 'erk'"):
    hs.art(0.5, steps_per_epoch=1, structure="channel", distribution="erk")
  with pytest.raises(ValueError, match="takes penalty 'hypersparse' or 'l1'.*'l2'"):
    hs.art(0.5, steps_per_epoch=1, structure="channel", penalty="l2")
  with pytest.raises(ValueError, match="normalized=False applies to structure='channel' only"):
    hs.art(0.5, steps_per_epoch=1, normalized=False)
  with pytest.raises(ValueError, match="structure must be 'weight' or 'channel', got 'filter'"):
    hs.art(0.5, steps_per_epoch=1, structure="filter")
  tx = hs.art(0.5, steps_per_epoch=1, structure="channel")
  with pytest.raises(ValueError, match="pass groups="):  # no library model's names
    tx.init({"encoder": {"kernel": jnp.ones((2, 2))}})


def _logits(model, variables):
  x = jax.random.normal(jax.random.PRNGKey(7), (4,) + tuple(model.default_input_shape[1:]))
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.mark.parametrize("name", ["lenet5", "lenet300", "cnn", "vgg11", "vgg11_nobn", "resnet20",
                                  "resnet56"])
def test_slim_gives_the_masked_models_logits_with_fewer_parameters(name):
  model = MODELS[name]()
  v = _init(model, seed=1)
  mask = hs.channel_mask(v["params"], 0.6)
  masked = dict(v, params=hs.apply_mask(v["params"], mask))
  small_model, small = hs.slim(model, v, mask)
  want = _logits(model, masked)
  got = _logits(small_model, small)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  n_big = sum(x.size for x in jax.tree.leaves(v["params"]))
  n_small = sum(x.size for x in jax.tree.leaves(small["params"]))
  assert n_small < n_big
  # the smaller model is a model of its own: it initialises to the same shapes
  fresh = jax.eval_shape(lambda k: small_model.init(k, jnp.zeros(model.default_input_shape),
                                                     train=False), jax.random.PRNGKey(0))
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, small)
  # each producer lost exactly its removed channels
  for g, keep in zip(channels.channel_groups(v["params"]),
                     channels.channel_keep(v["params"], 0.6).values()):
    assert channels._get(small["params"], g.producer)["kernel"].shape[-1] == int(np.sum(keep))
  if name.startswith("resnet"):  # the residual stream keeps its width
    assert small["params"]["conv1"]["kernel"].shape == v["params"]["conv1"]["kernel"].shape
    assert small["params"]["layer3_0"]["downsample_0"]["kernel"].shape == (
        v["params"]["layer3_0"]["downsample_0"]["kernel"].shape)


def test_slimmed_model_has_fewer_flops():
  model = models.LeNet5()
  v = _init(model)
  mask = hs.channel_mask(v["params"], 0.75)
  small_model, small = hs.slim(model, v, mask)
  big = channels.count_flops(model, v, (1, 28, 28, 1))
  little = channels.count_flops(small_model, small, (1, 28, 28, 1))
  # LeNet-5's multiply-adds counted by hand: conv1 24²·20·25, conv2 8²·50·(25·20), fc1 800·500,
  # fc2 500·10; XLA counts 2 flops a multiply-add (plus a few elementwise ones)
  macs = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 25 * 20 + 800 * 500 + 500 * 10
  assert 2 * macs <= big <= 2 * macs * 1.05
  assert little < 0.5 * big


def test_channel_mask_bad_input():
  v = _init(models.LeNet5())
  with pytest.raises(ValueError, match="sparsity must be in"):
    hs.channel_mask(v["params"], 1.0)
  bad = jax.tree.map(lambda x: x, v["params"])
  bad["conv1"]["kernel"] = bad["conv1"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="conv1 contains NaN"):
    hs.channel_mask(bad, 0.5)
  cnn = _init(models.DigitsCNN())["params"]  # a BatchNorm scale carries the magnitude
  cnn["bn2"]["scale"] = cnn["bn2"]["scale"].at[1].set(jnp.inf)
  with pytest.raises(ValueError, match="bn2/scale contains NaN or infinite"):
    hs.channel_mask(cnn, 0.5)
  with pytest.raises(ValueError, match="bn2/scale contains NaN or infinite"):
    channels.channel_keep(cnn, 0.5)


@pytest.mark.parametrize("name", ["lenet5", "lenet300", "cnn", "vgg11", "resnet20"])
def test_describe_model_rebuilds_the_slimmed_architecture(name):
  model = MODELS[name]()
  v = _init(model, seed=2)
  small_model, small = hs.slim(model, v, hs.channel_mask(v["params"], 0.5))
  desc = channels.describe_model(small_model)
  assert desc["class"] == type(model).__name__
  rebuilt = channels.model_from_description(json.loads(json.dumps(desc)))  # as a file holds it
  assert rebuilt == small_model
  shapes = jax.eval_shape(lambda k: rebuilt.init(k, jnp.zeros(model.default_input_shape),
                                                 train=False), jax.random.PRNGKey(0))
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, small)
  if name == "lenet5":  # slim_summary records it (compiles for FLOPs: one model is enough)
    summary = channels.slim_summary(model, dict(v, params=hs.apply_mask(
        v["params"], hs.channel_mask(v["params"], 0.5))), model.default_input_shape)
    assert summary["slim_model"] == desc
    assert summary["params_slim"] == sum(int(np.prod(x.shape)) for x in
                                         jax.tree.leaves(shapes["params"]))


def test_model_from_description_refuses_other_classes():
  with pytest.raises(ValueError, match="'create_model' is not one of"):
    channels.model_from_description({"class": "create_model"})


def test_multiple_of_rounds_each_layers_kept_count_up_by_hand():
  """fc1 has 10 units of norms 1..10 (fc2 is the head, never pruned). κ = 0.5 removes the
  channels up to rank floor(0.5·10) = 5, norms 1..6, and keeps 4 (norms 7..10); multiple_of
  8 keeps 8 (norms 3..10), 3 keeps 6 (5..10), 16 keeps all 10 (no more than the layer), 1
  and 4 change nothing."""
  norms = np.arange(1.0, 11.0, dtype=np.float32)
  perm = np.array([3, 7, 0, 9, 5, 1, 8, 2, 6, 4])  # the norms in a shuffled order
  kernel = np.zeros((10, 10), np.float32)
  kernel[0] = norms[perm]  # column c has norm norms[perm[c]]
  params = {"fc1": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(10)},
            "fc2": {"kernel": jnp.ones((10, 2)), "bias": jnp.zeros(2)}}
  by_norm = lambda keep: sorted(norms[perm][np.asarray(keep)].tolist())  # noqa: E731
  assert by_norm(channels.channel_keep(params, 0.5)["fc1"]) == [7, 8, 9, 10]
  for multiple_of, lowest in ((8, 3), (3, 5), (16, 1), (1, 7), (4, 7)):
    keep = channels.channel_keep(params, 0.5, multiple_of=multiple_of)["fc1"]
    assert by_norm(keep) == list(range(lowest, 11)), multiple_of
    mask = hs.channel_mask(params, 0.5, multiple_of=multiple_of)
    np.testing.assert_array_equal(np.asarray(mask["fc1"]["bias"]), np.asarray(keep))


@pytest.mark.parametrize("name,kappa,distribution", [
    ("vgg11", 0.5, "global"), ("vgg11", 0.9, "global"), ("lenet5", 0.75, "global"),
    ("vgg11", 0.75, "uniform")])
def test_multiple_of_matches_numpy_and_slims_to_multiples(name, kappa, distribution):
  """Against a NumPy restatement: each layer keeps what it kept, plus its largest removed
  channels (stable order) up to min(n, ⌈k/8⌉·8); the slimmed widths are those counts."""
  model = MODELS[name]()
  v = _init(model, seed=2)
  params = v["params"]
  groups = channels.channel_groups(params)
  plain = channels.channel_keep(params, kappa, distribution=distribution)
  rounded = channels.channel_keep(params, kappa, distribution=distribution, multiple_of=8)
  mags = [np.asarray(m) for m in channels.channel_magnitudes(params, groups=groups)]
  for g, m in zip(groups, mags):
    keep = np.asarray(plain[g.name])
    k, n = int(keep.sum()), keep.size
    want = keep.copy()
    extra = [c for c in np.argsort(-m, kind="stable") if not keep[c]]
    want[extra[:min(n, -(-k // 8) * 8) - k]] = True
    np.testing.assert_array_equal(np.asarray(rounded[g.name]), want, err_msg=g.name)
  small_model, small = hs.slim(model, v, hs.channel_mask(
      params, kappa, distribution=distribution, multiple_of=8))
  for g in groups:
    width = channels._get(small["params"], g.producer)["kernel"].shape[-1]
    full = channels._get(params, g.producer)["kernel"].shape[-1]
    assert width % 8 == 0 or width == full, (g.name, width)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_multiple_of_bad_values_are_named(bad):
  v = _init(models.LeNet5())
  with pytest.raises(ValueError, match=f"multiple_of must be None or a positive integer.*{bad!r}"):
    hs.channel_mask(v["params"], 0.5, multiple_of=bad)
