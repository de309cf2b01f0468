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


def _numpy_keep(params, groups, kappa):
  """Magnitudes (BN scale or weight norm) / layer mean, global sort, then rescue each layer's
  largest channel."""
  mags = []
  for g in groups:
    if g.norm is not None:
      m = np.abs(np.asarray(channels._get(params, g.norm)["scale"], np.float32))
    else:
      k = np.asarray(channels._get(params, g.producer)["kernel"], np.float32)
      m = np.sqrt((np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1) ** 2).sum(1))
    mags.append((m / m.mean()).astype(np.float32))
  allm = np.concatenate(mags)
  t = np.sort(allm)[min(int(math.floor(kappa * allm.size)), allm.size - 1)]
  keeps = []
  for m in mags:
    keep = m > t
    keep[np.argmax(m)] = True
    keeps.append(keep)
  return keeps


@pytest.mark.parametrize("name,kappa", [("lenet5", 0.5), ("lenet5", 0.9), ("cnn", 0.9),
                                        ("vgg11", 0.5), ("resnet20", 0.9)])
def test_channel_mask_matches_numpy(name, kappa):
  v = _init(MODELS[name]())
  params = v["params"]
  groups = channels.channel_groups(params)
  mask = hs.channel_mask(params, kappa)
  keeps = _numpy_keep(params, groups, kappa)
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


def test_a_layer_never_loses_all_its_channels():
  v = _init(models.LeNet300())
  params = jax.tree.map(lambda x: x, v["params"])
  # fc1's weights ×1e-3: still comparable after the per-layer normalisation, so scale only
  # one channel up and make the rest of fc2 tiny relative to it
  k = np.asarray(params["fc2"]["kernel"]).copy()
  k[:, 0] *= 1000.0
  params["fc2"]["kernel"] = jnp.asarray(k)
  mask = hs.channel_mask(params, 0.9)
  alive = np.asarray(mask["fc2"]["kernel"]).any(0)
  assert alive.sum() >= 1 and alive[0]


def _plain_group_penalty(groups, t, kappa_unused=None):
  """A·T/sg(T) − A over m̃ = ‖θ‖/sg(mean ‖θ‖), written with jnp only."""
  def f(params):
    mags = []
    for g in groups:
      if g.norm is not None:
        th = channels._get(params, g.norm)["scale"][:, None]
      else:
        k = channels._get(params, g.producer)["kernel"]
        th = jnp.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)
      m = jnp.sqrt(jnp.sum(th ** 2, axis=1))
      mags.append(m / jax.lax.stop_gradient(jnp.mean(m)))
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
