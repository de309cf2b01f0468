"""Adaptive Regularized Training (ART) as optax transformations.

ART (Glandorf, Kaiser, Rosenhahn, ICCV 2023 workshops, arXiv:2308.07163) trains in three phases:

1. warm-up: dense training, no regulariser (``warmup_epochs`` epochs);
2. regularisation: the gradient of a sparsity penalty, scaled by an exponentially growing
   ``λ_e = λ_init · η^(e − warmup_epochs)`` for epoch ``e``, is added to the loss gradient until
   the :class:`hypersparse_jax.ARTController` stop rule fires;
3. fine-tuning of the remembered magnitude-pruned model with its mask fixed.

:func:`art` covers phases 1–2 (λ is 0 during warm-up, so one optimiser serves both, and its step
count, λ and last threshold live in :class:`ARTState`). Phase 3 re-creates the optimiser as the
reference does (momentum reset) with :func:`fixed_mask` first in the chain: it zeroes the
gradient of every pruned weight, so momentum buffers and weight decay (``wd · 0``) of pruned
weights stay exactly zero, and pruned weights stay exactly zero as long as the fine-tune starts
from ``apply_mask(params, mask)``. The mask is held in the transformation's state (checkpointed
with it, sharded like the parameters).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from hypersparse_jax import masking, penalties
from hypersparse_jax.masking import Predicate

PenaltySpec = Union[str, Callable[[Any], jax.Array]]


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def lambda_overflow_epoch(lambda_init: float, eta: float) -> Optional[int]:
  """The first regularisation epoch ``k`` (0-based) whose ``λ_init · η^k`` exceeds float32's
  largest value (3.4e38), or None if λ never grows (``η <= 1``).

  E.g. ``lambda_overflow_epoch(5e-6, 2.0) == 146``; with the reference's η = 1.05 it is 2,069.
  """
  if eta <= 1:
    return None
  k = math.floor((math.log(_F32_MAX) - math.log(lambda_init)) / math.log(eta)) + 1
  while k > 0 and lambda_init * eta ** (k - 1) > _F32_MAX:  # guard the log rounding
    k -= 1
  while lambda_init * eta ** k <= _F32_MAX:
    k += 1
  return max(k, 0)


def lambda_schedule(lambda_init: float = 5e-6, eta: float = 1.05, *, steps_per_epoch: int,
                    warmup_epochs: int = 60, staircase: bool = True) -> optax.Schedule:
  """ART's λ as a function of the step count (float32).

  ``λ(step) = 0`` for epochs ``e < warmup_epochs``, else ``λ_init · η^(e − warmup_epochs)`` with
  ``e = step // steps_per_epoch`` (staircase: constant within an epoch, as the reference) or
  ``e = step / steps_per_epoch`` (smooth, ``staircase=False``).

  λ saturates at float32's largest value instead of becoming ``inf`` (which would turn the
  updates into inf/NaN); from :func:`lambda_overflow_epoch` on it stops growing. A training loop
  should not get there: ``hypersparse-train`` refuses a schedule that would within its
  ``--max-art-epochs``.
  """
  if steps_per_epoch <= 0 or int(steps_per_epoch) != steps_per_epoch:
    raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
  if warmup_epochs < 0:
    raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
  if not lambda_init > 0:
    raise ValueError(f"lambda_init must be > 0, got {lambda_init!r}")
  if not eta > 0:
    raise ValueError(f"eta must be > 0, got {eta!r}")

  def schedule(count):
    count = jnp.asarray(count)
    if staircase:
      epoch = (count // steps_per_epoch).astype(jnp.float32)
    else:
      epoch = count.astype(jnp.float32) / steps_per_epoch
    exponent = epoch - warmup_epochs
    power = jnp.power(jnp.float32(eta), exponent)
    # η^k may overflow while λ_init·η^k is still finite: then take it through the logarithms
    lam = jnp.where(jnp.isfinite(power), lambda_init * power,
                    jnp.exp(jnp.float32(math.log(lambda_init))
                            + exponent * jnp.float32(math.log(eta))))
    lam = jnp.minimum(lam, _F32_MAX)
    return jnp.where(exponent >= 0 if staircase else epoch >= warmup_epochs, lam, 0.0)

  return schedule


class ARTState(NamedTuple):
  """State of :func:`art`: step count, last λ, last threshold and its last relative change,
  and the number of regularised steps that met non-finite weights."""
  count: chex.Array      # int32 number of updates so far
  lambda_: chex.Array    # float32 λ used by the last update (0 in warm-up)
  threshold: chex.Array  # float32 global magnitude threshold at the last regularised step
  # float32 t_last / t_before − 1 over the last regularised step (0 before two of them): the
  # next threshold is searched first around t·(1 + change), where momentum usually carries it.
  threshold_change: chex.Array
  # int32 HyperSparse steps (λ > 0) whose Σ|w| or Σ tanh(s|w|) was NaN/inf, i.e. a prunable
  # weight was NaN/inf: the regulariser added nothing in those steps (it cannot raise under
  # jit). Free: it reads the sums the gradient needs anyway. Always 0 for L1/L2/callables.
  nonfinite_steps: chex.Array


def _penalty_grad_fn(penalty: PenaltySpec, sparsity: float, where):
  """``fn(params) -> grad_tree`` for L1, L2 or a user penalty; None for HyperSparse.

  (HyperSparse is split into its reductions and its elementwise map inside :func:`art`.)
  """
  if callable(penalty):
    return jax.grad(penalty)
  if penalty == "hypersparse":
    return None
  if penalty in ("l1", "l2"):
    grad = penalties.PENALTY_GRADS[penalty]
    return lambda params: grad(params, sparsity, where=where)
  raise ValueError(f"penalty must be 'hypersparse', 'l1', 'l2' or a callable, got {penalty!r}")


def _add_scaled(updates, grads, lam):
  """``updates + λ·grads`` in float32, cast back to each update's dtype without overflow."""
  return jax.tree.map(
      lambda u, g: penalties.saturating_cast(
          u.astype(jnp.float32) + lam * g.astype(jnp.float32), u.dtype), updates, grads)


def art(sparsity: float, lambda_init: float = 5e-6, eta: float = 1.05, *, steps_per_epoch: int,
        warmup_epochs: int = 60, penalty: PenaltySpec = "hypersparse", staircase: bool = True,
        where: Optional[Predicate] = None,
        scale_constant: float = penalties.REFERENCE_SCALE, distribution: str = "global",
        nm: Optional[tuple] = None, structure: str = "weight",
        groups=None, normalized: bool = True) -> optax.GradientTransformation:
  """ART's regulariser as an optax transformation: ``updates + λ_t · ∇penalty(params)``.

  Put it first in the chain so that weight decay and momentum see the regularised gradient, as
  in the reference (where the penalty is part of the loss)::

      tx = optax.chain(hypersparse.art(0.98, steps_per_epoch=782, warmup_epochs=60),
                       optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

  Args:
    sparsity: target prune rate ``κ`` in ``[0, 1)``; fixes the HyperSparse threshold.
    lambda_init: ``λ`` of the first regularisation epoch (reference: 5e-6).
    eta: growth factor of ``λ`` per epoch (reference: 1.05).
    steps_per_epoch: optimiser steps one epoch really makes (``ceil(num_train / batch_size)``
      if the last partial batch is kept, ``floor`` if it is dropped); the epoch, hence λ and
      the end of the warm-up, is ``count // steps_per_epoch``. A wrong value raises nothing:
      :func:`check_steps_per_epoch` makes it visible.
    warmup_epochs: epochs of dense training before regularisation starts (reference: 60).
    penalty: ``'hypersparse'`` (default), ``'l1'``, ``'l2'``, or a callable
      ``penalty(params) -> scalar`` whose ``jax.grad`` is used.
    staircase: ``λ`` constant within an epoch (reference) or growing smoothly per step.
    where: prunable-leaf predicate (default: leaves named ``kernel`` with ``ndim >= 2``).
    scale_constant: HyperSparse's ``c`` in ``s = c / t`` (reference: 0.6585; see
      :func:`hypersparse_jax.hypersparse_grad`).
    distribution: ``'global'`` (the paper's, default), ``'uniform'`` or ``'erk'``: HyperSparse
      with a threshold and a term per leaf (:mod:`hypersparse_jax.budgets`); then
      ``ARTState.threshold`` holds one threshold per prunable leaf (0 for dense ones).
    nm: ``(n, m)``: HyperSparse for an N:M pattern, a threshold and a term per group of ``m``
      (``sparsity`` must be ``1 − n/m``); L1 / L2 do not depend on the pattern.
    structure: ``'weight'`` (default) or ``'channel'``: group HyperSparse over channels
      (:mod:`hypersparse_jax.channels`; ``sparsity`` is then the fraction of prunable channels
      removed; ``penalty='l1'`` is the group lasso ``Σ m̃``, L2 is refused; ``distribution``
      ``'global'`` or ``'uniform'``, the same fraction from every layer, with a term and a
      threshold per layer in ``ARTState.threshold``). ``groups``: the
      channel groups (default: :func:`hypersparse_jax.channels.channel_groups`).
      ``normalized`` (channels only): the magnitudes divided by their layer's mean (default)
      or raw; ``penalty='l1', normalized=False`` with ``eta=1`` and ``warmup_epochs=0`` is
      network slimming's fixed-λ ``Σ|γ|`` (Liu et al. 2017) on layers with BatchNorm.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` requires ``params``. Its state is
    :class:`ARTState`. The threshold of the previous step speeds up the exact selection of the
    next (the result does not depend on it). During warm-up no threshold is selected.
    ``λ · gradient`` is formed in float32 and added to the updates in float32, then cast to the
    update's dtype saturating at its finite range (float16/bfloat16 updates never become inf
    through the regulariser). A NaN/inf prunable weight cannot raise under ``jit``: the
    HyperSparse term is then 0 for that step, counted in ``ARTState.nonfinite_steps``.

  Example:
    >>> import jax.numpy as jnp, optax, hypersparse_jax as hs
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -0.4], [0.2, 0.8]]), "bias": jnp.ones(2)}}
    >>> tx = optax.chain(hs.art(0.5, lambda_init=0.1, eta=2.0, steps_per_epoch=1,
    ...                         warmup_epochs=1), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> zero = {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
    >>> for epoch in range(3):
    ...   updates, state = tx.update(zero, state, params)
    ...   print(epoch, float(state[0].lambda_))
    0 0.0
    1 0.10000000149011612
    2 0.20000000298023224
  """
  sparsity = masking.check_sparsity(sparsity)
  scale_constant = penalties.check_scale_constant(scale_constant)
  from hypersparse_jax import budgets
  nm = budgets.check_pattern(sparsity, distribution, nm)
  patterned = penalty == "hypersparse" and (nm is not None or distribution != "global")
  if structure not in ("weight", "channel"):
    raise ValueError(f"structure must be 'weight' or 'channel', got {structure!r}")
  channel = structure == "channel"
  if channel and nm is not None:
    raise ValueError("structure='channel' removes whole channels; it does not combine with an "
                     "N:M pattern (nm)")
  if channel:
    from hypersparse_jax import channels
    channels.check_distribution(distribution)
  if not normalized and not channel:
    raise ValueError("normalized=False applies to structure='channel' only")
  if channel and penalty not in ("hypersparse", "l1"):
    raise ValueError(f"structure='channel' takes penalty 'hypersparse' or 'l1' (group lasso), "
                     f"got {penalty!r}")
  schedule = lambda_schedule(lambda_init, eta, steps_per_epoch=steps_per_epoch,
                             warmup_epochs=warmup_epochs, staircase=staircase)
  grad_fn = _penalty_grad_fn(penalty, sparsity, where)

  def init_fn(params):
    if channel:
      from hypersparse_jax import channels
      selected = channels._select_groups(params, groups, where)  # fail early on a bad tree
      threshold = jnp.zeros([len(selected)] if distribution == "uniform" else [], jnp.float32)
      return ARTState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), threshold,
                      jnp.zeros(jnp.shape(threshold), jnp.float32), jnp.zeros([], jnp.int32))
    leaves = masking.prunable_leaves(params, where)  # fail early on an unusable tree
    if patterned:
      if nm is not None:
        threshold = jnp.zeros([], jnp.float32)  # N:M: per-group thresholds, nothing to keep
      else:
        ts = budgets._leaf_thresholds(leaves, budgets._leaf_budgets(leaves, sparsity,
                                                                   distribution))
        threshold = jnp.stack(ts).astype(jnp.float32)
    else:
      threshold = jnp.asarray(masking.magnitude_threshold(params, sparsity, where=where),
                              jnp.float32)
    return ARTState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), threshold,
                    jnp.zeros(jnp.shape(threshold), jnp.float32), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("art() needs the parameters: call tx.update(grads, state, params)")
    lam = schedule(state.count).astype(jnp.float32)
    if channel:
      from hypersparse_jax import channels

      def regularised(_):
        grads, value, t = channels.channel_hypersparse(
            params, sparsity, groups=groups, where=where, scale_constant=scale_constant,
            penalty=penalty, normalized=normalized, distribution=distribution)
        return _add_scaled(updates, grads, lam), t.astype(jnp.float32), jnp.isfinite(value)

      def warmup(_):
        return updates, state.threshold, jnp.bool_(True)

      new_updates, threshold, finite = lax.cond(lam > 0, regularised, warmup, None)
      nonfinite = (lam > 0) & ~finite
      change = state.threshold_change
    elif patterned:
      # A threshold and a term per leaf (budgets) or per group (N:M): the branch returns the
      # gradient tree (no selection and no map in warm-up).
      def regularised(_):
        hints = state.threshold * (1 + state.threshold_change)
        grads, _, ts, finite = budgets.pattern_hypersparse(
            params, sparsity, where=where, distribution=distribution, nm=nm,
            scale_constant=scale_constant, hints=None if nm is not None else hints)
        ts = ts.reshape(jnp.shape(state.threshold)) if nm is None else state.threshold
        return _add_scaled(updates, grads, lam), ts, finite

      def warmup(_):
        return updates, state.threshold, jnp.bool_(True)

      new_updates, threshold, finite = lax.cond(lam > 0, regularised, warmup, None)
      nonfinite = (lam > 0) & ~finite
      moved = (lam > 0) & (state.lambda_ > 0) & (state.threshold > 0)
      change = jnp.where(moved, threshold / jnp.where(moved, state.threshold, 1.0) - 1,
                         state.threshold_change)
      change = jnp.where(jnp.abs(change) < 0.05, change, 0.0).astype(jnp.float32)
    elif grad_fn is None:
      # HyperSparse: only the reductions (threshold, A, T) sit in the branch; the elementwise
      # map below is fused by XLA into the optimiser's pass over the updates (λ = 0 in warm-up:
      # a zero factor, no selection). A branch returning whole update trees makes XLA copy them.
      def terms_of(_):
        hint = state.threshold * (1 + state.threshold_change)  # only speeds up the search
        return penalties.hypersparse_terms(params, sparsity, where=where, threshold_hint=hint,
                                           scale_constant=scale_constant)

      def warmup(_):
        zero = jnp.zeros([], jnp.float32)
        return penalties.HyperSparseTerms(state.threshold, zero, zero, zero)

      terms = lax.cond(lam > 0, terms_of, warmup, None)
      grads = penalties.hypersparse_grad_from_terms(params, terms, where=where, float32=True)
      threshold = terms.threshold
      nonfinite = (lam > 0) & ~(jnp.isfinite(terms.total_a) & jnp.isfinite(terms.total_t))
      new_updates = _add_scaled(updates, grads, lam)
      moved = (lam > 0) & (state.lambda_ > 0) & (state.threshold > 0)
      change = jnp.where(moved, threshold / jnp.where(moved, state.threshold, 1.0) - 1,
                         state.threshold_change)
      # A change that is not finite or implausibly large (t jumped) is not carried forward.
      change = jnp.where(jnp.abs(change) < 0.05, change, 0.0).astype(jnp.float32)
    else:
      # L1, L2, user penalty: no threshold; the gradient only where λ > 0 (a user penalty
      # may be costly), so the branch returns the update tree.
      new_updates = lax.cond(lam > 0, lambda _: _add_scaled(updates, grad_fn(params), lam),
                             lambda _: updates, None)
      threshold, change = state.threshold, state.threshold_change
      nonfinite = jnp.zeros([], bool)
    return new_updates, ARTState(optax.safe_int32_increment(state.count), lam, threshold, change,
                                 state.nonfinite_steps + nonfinite.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


class FixedMaskState(NamedTuple):
  """State of :func:`fixed_mask`: the bool mask (True = kept)."""
  mask: Any


def fixed_mask(mask) -> optax.GradientTransformation:
  """Zeroes the updates of pruned weights (``mask`` False) — masked fine-tuning.

  Place it first in the fine-tune chain, and start from ``apply_mask(params, mask)``: then no
  gradient, momentum or weight-decay term ever reaches a pruned weight and it stays exactly 0.

  Args:
    mask: bool pytree with the structure of the parameters (e.g. from
      :func:`hypersparse_jax.magnitude_mask`).
  """

  def init_fn(params):
    masking._check_same_structure(params, mask)
    return FixedMaskState(jax.tree.map(lambda m: jnp.asarray(m, bool), mask))

  def update_fn(updates, state, params=None):
    del params
    return masking.apply_mask(updates, state.mask), state

  return optax.GradientTransformation(init_fn, update_fn)


def check_steps_per_epoch(opt_state, epochs_done: int, steps_per_epoch: int) -> int:
  """Warns if :func:`art`'s step count does not match ``epochs_done · steps_per_epoch``.

  ``art()`` derives the epoch (hence λ and the end of the warm-up) from its step count divided
  by ``steps_per_epoch``; if a loop makes another number of optimiser steps per epoch (e.g. it
  drops the last partial batch while ``steps_per_epoch`` was computed with ``ceil``), λ changes
  at the wrong steps without any error. Call this once per epoch (a host sync of one integer)
  with the same ``steps_per_epoch`` as given to ``art()``.

  Args:
    opt_state: the state of a chain holding one :func:`art` (searched in the pytree).
    epochs_done: epochs trained with this optimiser state so far.
    steps_per_epoch: the value passed to ``art()``.

  Returns:
    The step count of the ``art()`` state.
  """
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ARTState))
            if isinstance(s, ARTState)]
  if len(states) != 1:
    raise ValueError(f"opt_state must hold exactly one art() state, found {len(states)}")
  count = int(states[0].count)
  expected = int(epochs_done) * int(steps_per_epoch)
  if count != expected:
    per_epoch = f"{count / epochs_done:g}" if epochs_done else "?"
    warnings.warn(
        f"art() made {count} optimiser steps in {epochs_done} epochs, but steps_per_epoch="
        f"{steps_per_epoch} expects {expected}: λ and the warm-up end move at the wrong steps. "
        f"Pass art(steps_per_epoch=...) the steps one epoch really makes ({per_epoch} here).",
        stacklevel=2)
  return count
