"""The core API on Flax NNX state (paths end in ``.value``) and on plain nested dicts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hypersparse_jax as hs


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(20, 30, rngs=rngs)
    self.l2 = nnx.Linear(30, 5, rngs=rngs)


def _kernels(state):
  return np.concatenate([np.abs(np.asarray(state["l1"]["kernel"][...])).ravel(),
                         np.abs(np.asarray(state["l2"]["kernel"][...])).ravel()])


def test_threshold_and_mask_on_nnx_state_match_numpy():
  state = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
  a = _kernels(state)
  t_ref = np.sort(a)[int(np.floor(0.7 * a.size))]
  assert float(hs.magnitude_threshold(state, 0.7)) == t_ref
  mask = hs.magnitude_mask(state, 0.7)
  np.testing.assert_array_equal(np.asarray(mask["l1"]["kernel"][...]),
                                np.abs(np.asarray(state["l1"]["kernel"][...])) > t_ref)
  assert bool(jnp.all(mask["l1"]["bias"][...]))  # biases are never pruned
  report = hs.sparsity_report(hs.apply_mask(state, mask))
  assert [layer.name for layer in report.layers] == ["l1/kernel", "l2/kernel"]
  assert report.kept == int(np.sum(a > t_ref))


def test_art_chain_updates_nnx_state_like_a_dict():
  state = nnx.state(_Net(nnx.Rngs(1)), nnx.Param)
  plain = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  grads = jax.tree.map(jnp.zeros_like, state)
  grads_plain = jax.tree.map(jnp.zeros_like, plain)
  tx = optax.chain(hs.art(0.5, 1e-2, 2.0, steps_per_epoch=1, warmup_epochs=0),
                   optax.sgd(0.1))
  upd, _ = tx.update(grads, tx.init(state), state)
  upd_plain, _ = tx.update(grads_plain, tx.init(plain), plain)
  for name in ("l1", "l2"):
    np.testing.assert_allclose(np.asarray(upd[name]["kernel"][...]),
                               np.asarray(upd_plain[name]["kernel"]), rtol=1e-6, atol=1e-9)
    assert not np.any(np.asarray(upd[name]["bias"][...]))
  # Independent check: with zero loss gradient, the update is -lr * λ * g_HyperSparse.
  a = np.concatenate([np.abs(plain["l1"]["kernel"]).ravel(), np.abs(plain["l2"]["kernel"]).ravel()])
  t = np.sort(a.astype(np.float64))[int(np.floor(0.5 * a.size))]
  s = np.arctanh(1 / np.sqrt(3)) / t
  w = plain["l1"]["kernel"].astype(np.float64)
  g = np.sign(w) * s / np.cosh(s * np.abs(w)) ** 2 * a.sum() / np.tanh(s * a).sum()
  np.testing.assert_allclose(np.asarray(upd["l1"]["kernel"][...]), -0.1 * 1e-2 * g,
                             rtol=1e-4, atol=1e-4 * np.abs(0.1 * 1e-2 * g).max())
