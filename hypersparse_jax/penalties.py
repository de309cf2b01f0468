"""Sparsity penalties over any parameter pytree: HyperSparse and the L1 / L2 baselines.

HyperSparse (Glandorf, Kaiser, Rosenhahn, "HyperSparse Neural Networks: Shifting Exploration to
Exploitation through Adaptive Regularization", ICCV 2023 workshops, arXiv:2308.07163).

With ``a = |w|`` over all prunable weights, ``t`` the global magnitude threshold for sparsity
``κ`` (:func:`hypersparse_jax.magnitude_threshold`), ``s = c / t``, ``T = Σ_j tanh(s·a_j)`` and
``A = Σ_j a_j``, the HyperSparse gradient of weight ``i`` is::

    g_i = sign(w_i) · s · sech²(s·a_i) · A / T

Weights far below ``t`` receive about ``sign(w_i)`` (like L1), weights far above it almost
nothing. In loss form ``HS(w) = A · T / stop_gradient(T) − A`` (value 0), whose autodiff
gradient is exactly ``g`` (``s`` comes from a detached threshold and carries no gradient).

The constant ``c`` puts the steepest fall of ``sech²`` at the pruning boundary, which is
``c = atanh(1/√3) = 0.658479…`` (:data:`EXACT_SCALE`). The authors' code writes the literal
``0.6585`` (:data:`REFERENCE_SCALE`), and so do we by default (``scale_constant``), so that the
gradient equals theirs to float32 rounding; the two differ by 2e-5 relative at κ = 0.995.

Numerical conventions (the reference divides by ``t`` and by ``T`` unguarded):

* ``t == 0`` (at least ``floor(κ·n)+1`` weights are exactly zero): ``s`` is taken as
  ``0.6585 / tiny`` with ``tiny`` the smallest normal float32, a finite, huge scale. Then every
  nonzero weight lies far above the threshold and gets gradient 0, and zero weights get
  ``sign(0) = 0``: the regulariser is off, which is right, since the target sparsity is met.
* ``T == 0`` (all prunable weights zero): the gradient is 0 (not NaN).
* ``tanh`` saturates instead of overflowing, so huge ``s·a`` gives ``sech² = 0``; all sums are
  float32, whatever the parameter dtype. The gradient is computed in float32 and cast back to
  each leaf's dtype saturating at its largest finite value (a 1e-7 weight in a float16 tree
  has a float32 gradient far beyond float16's 65504: it becomes ±65504, not ±inf).
  :func:`hypersparse_jax.art` scales by ``λ`` in float32 before that cast.
* NaN/inf weights: outside ``jit`` the threshold functions raise. Under ``jit`` they cannot
  (see :func:`hypersparse_jax.magnitude_threshold`): ``A`` and ``T`` are then NaN or inf, and
  the gradient is 0 on every weight for that step (the ``T > 0`` guard), i.e. the regulariser
  silently switches itself off. :func:`hypersparse_jax.art` counts such steps in
  ``ARTState.nonfinite_steps``, so a training loop can see it without an extra pass.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from hypersparse_jax import masking, threshold
from hypersparse_jax.masking import Predicate

REFERENCE_SCALE = 0.6585  # the literal of the authors' code (loss/HyperSparse.py): the default
EXACT_SCALE = math.atanh(1.0 / math.sqrt(3.0))  # 0.658479...: steepest fall of sech² exactly
_TINY = float(jnp.finfo(jnp.float32).tiny)


def _select(params, where):
  """Tree-map helper: ``fn(leaf)`` on prunable leaves, zeros elsewhere."""
  where = masking.default_where if where is None else where

  def apply(fn):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x) if where(p, x) else jnp.zeros_like(x), params)

  return apply


def _f32_abs(x):
  return jnp.abs(jnp.asarray(x).astype(jnp.float32))


def check_scale_constant(scale_constant) -> float:
  """Returns ``scale_constant`` as a float if it is a finite number > 0, else raises."""
  if isinstance(scale_constant, (bool, str)) or not isinstance(scale_constant, (int, float)):
    raise TypeError(f"scale_constant must be a number, got {scale_constant!r}")
  if not (math.isfinite(scale_constant) and scale_constant > 0):
    raise ValueError(f"scale_constant must be a finite number > 0 (the reference's is "
                     f"{REFERENCE_SCALE}), got {scale_constant!r}")
  return float(scale_constant)


def hypersparse_scale(threshold: jax.Array, scale_constant: float = REFERENCE_SCALE) -> jax.Array:
  """``s = c / t`` with ``t`` floored at the smallest normal float32 (finite for ``t = 0``)."""
  return jnp.float32(scale_constant) / jnp.maximum(threshold.astype(jnp.float32), _TINY)


def saturating_cast(x: jax.Array, dtype) -> jax.Array:
  """``x.astype(dtype)`` with finite values clipped to ``dtype``'s finite range (no overflow)."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < jnp.finfo(x.dtype).bits:
    big = float(jnp.finfo(dtype).max)
    x = jnp.clip(x, -big, big)
  return x.astype(dtype)


def _sech2(x):
  """``sech²(x) = 1 − tanh²(x)``: as autodiff of ``tanh`` computes it (XLA's tanh is the fast
  path); its absolute error (~1e-7) is far below the gradient scale ``s·A/T``."""
  return 1.0 - jnp.square(jnp.tanh(x))


def _sums(leaves, s):
  """``A = Σ a`` and ``T = Σ tanh(s·a)`` in float32 over the prunable leaves.

  Over the selection's chunks (:func:`hypersparse_jax.threshold._flat_chunks`): the small
  leaves' concatenation is the selection's own (XLA computes it once), so a tree of many small
  leaves costs two reductions over one array instead of two per leaf.
  """
  chunks = threshold._flat_chunks(leaves)
  total_t = sum(jnp.sum(jnp.tanh(s * jnp.abs(c))) for c in chunks)
  # XLA:CPU fuses the two reductions into one loop that runs ~3x slower than both apart.
  separate = lax.optimization_barrier(chunks)
  total_a = sum(jnp.sum(jnp.abs(c)) for c in separate)
  return total_a, total_t


class HyperSparseTerms(NamedTuple):
  """The scalars of one HyperSparse gradient (float32): see :func:`hypersparse_terms`."""
  threshold: jax.Array  # t
  scale: jax.Array      # s = c / t
  total_a: jax.Array    # A = Σ |w|
  total_t: jax.Array    # T = Σ tanh(s·|w|)


def _terms(leaves, sparsity: float, hint=None,
           scale_constant: float = REFERENCE_SCALE) -> HyperSparseTerms:
  """The threshold and the two sums that both the gradient and the loss form need (one pass)."""
  t = masking._threshold(leaves, sparsity, hint)
  s = hypersparse_scale(t, scale_constant)
  return HyperSparseTerms(t, s, *_sums(leaves, s))


def hypersparse_terms(params, sparsity: float, *, where: Optional[Predicate] = None,
                      threshold_hint: Optional[jax.Array] = None,
                      scale_constant: float = REFERENCE_SCALE) -> HyperSparseTerms:
  """The scalars of the HyperSparse gradient: threshold ``t``, ``s``, ``A`` and ``T``.

  With :func:`hypersparse_grad_from_terms` this splits :func:`hypersparse_grad` into its
  reductions and its elementwise map (:func:`hypersparse_jax.art` computes the first only in
  the regularisation phase and fuses the second into the optimiser's own pass).
  ``threshold_hint`` (a float32 scalar, e.g. the previous step's ``t``) only speeds up the exact
  selection: the result is identical with or without it.
  """
  sparsity = masking.check_sparsity(sparsity)
  scale_constant = check_scale_constant(scale_constant)
  leaves = masking.prunable_leaves(params, where)
  hint = None if threshold_hint is None else lax.bitcast_convert_type(
      jnp.asarray(threshold_hint, jnp.float32), jnp.int32)
  return _terms(leaves, sparsity, hint, scale_constant)


def hypersparse_grad_from_terms(params, terms: HyperSparseTerms, *,
                                where: Optional[Predicate] = None, float32: bool = False):
  """``g_i = sign(w_i)·s·sech²(s·a_i)·A/T`` from :func:`hypersparse_terms` (0 where ``T = 0``).

  Computed in float32; returned in each leaf's dtype with a saturating cast, or in float32 on
  every leaf with ``float32=True`` (what :func:`hypersparse_jax.art` scales by λ before casting).
  """
  s, total_a, total_t = terms.scale, terms.total_a, terms.total_t
  ratio = jnp.where(total_t > 0, total_a / jnp.where(total_t > 0, total_t, 1.0), 0.0)
  factor = jnp.minimum(s * ratio, jnp.finfo(jnp.float32).max)  # t == 0: s·A/T may overflow

  def leaf_grad(x):
    g = jnp.sign(x).astype(jnp.float32) * factor * _sech2(s * _f32_abs(x))
    return g if float32 else saturating_cast(g, jnp.result_type(x))

  where = masking.default_where if where is None else where
  return jax.tree_util.tree_map_with_path(
      lambda p, x: leaf_grad(x) if where(p, x) else jnp.zeros(
          jnp.shape(x), jnp.float32 if float32 else jnp.result_type(x)), params)


def hypersparse_grad_and_threshold(params, sparsity: float, *, where: Optional[Predicate] = None,
                                   threshold_hint: Optional[jax.Array] = None,
                                   scale_constant: float = REFERENCE_SCALE):
  """:func:`hypersparse_grad` and the threshold ``t`` it used (float32 scalar)."""
  terms = hypersparse_terms(params, sparsity, where=where, threshold_hint=threshold_hint,
                            scale_constant=scale_constant)
  return hypersparse_grad_from_terms(params, terms, where=where), terms.threshold


def hypersparse_grad(params, sparsity: float, *, where: Optional[Predicate] = None,
                     scale_constant: float = REFERENCE_SCALE, distribution: str = "global",
                     nm: Optional[tuple] = None):
  """Closed-form HyperSparse gradient ``g_i = sign(w_i)·s·sech²(s·a_i)·A/T`` (see module doc).

  Args:
    params: any pytree of arrays.
    sparsity: target prune rate ``κ`` in ``[0, 1)`` (Python float) that fixes the threshold.
    where: prunable-leaf predicate (default: leaves named ``kernel`` with ``ndim >= 2``).
    scale_constant: ``c`` in ``s = c / t``: 0.6585 as the reference (default), or
      :data:`EXACT_SCALE` = atanh(1/√3).
    distribution: ``'global'`` (default, the paper's), ``'uniform'`` or ``'erk'``: each leaf
      its own budget, threshold and term (:mod:`hypersparse_jax.budgets`).
    nm: ``(n, m)`` for an N:M pattern (then ``sparsity`` must be ``1 − n/m``): a threshold and
      a term per group of ``m`` (:mod:`hypersparse_jax.budgets`).

  Returns:
    A pytree like ``params``: ``g`` on prunable leaves (in each leaf's dtype), zeros elsewhere.
    It equals ``jax.grad(hypersparse_penalty)``.

  Raises:
    ValueError / TypeError: as :func:`hypersparse_jax.magnitude_threshold`.

  Example:
    >>> import jax, jax.numpy as jnp, hypersparse_jax as hs
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -0.4], [0.2, 0.8]]), "bias": jnp.ones(2)}}
    >>> g = hs.hypersparse_grad(params, 0.5)
    >>> [round(v, 3) for v in g["dense"]["kernel"].ravel().tolist()]  # small weights pushed most
    [1.249, -0.855, 1.154, 0.321]
    >>> g["dense"]["bias"].tolist()
    [0.0, 0.0]
    >>> abs(float(hs.hypersparse_penalty(params, 0.5))) < 1e-6  # the loss form's value is ~0
    True
  """
  if distribution != "global" or nm is not None:
    grads = _pattern(params, sparsity, where, scale_constant, distribution, nm)[0]
    return jax.tree.map(lambda g, x: saturating_cast(g, jnp.result_type(x)), grads, params)
  return hypersparse_grad_and_threshold(params, sparsity, where=where,
                                        scale_constant=scale_constant)[0]


def _pattern(params, sparsity, where, scale_constant, distribution, nm):
  from hypersparse_jax import budgets
  sparsity = masking.check_sparsity(sparsity)
  scale_constant = check_scale_constant(scale_constant)
  nm = budgets.check_pattern(sparsity, distribution, nm)
  return budgets.pattern_hypersparse(params, sparsity, where=where, distribution=distribution,
                                     nm=nm, scale_constant=scale_constant)


def hypersparse_penalty(params, sparsity: float, *, where: Optional[Predicate] = None,
                        scale_constant: float = REFERENCE_SCALE, distribution: str = "global",
                        nm: Optional[tuple] = None) -> jax.Array:
  """HyperSparse in loss form, ``A · T / stop_gradient(T) − A`` (value ≈ 0, float32 scalar).

  Add ``λ · hypersparse_penalty(params, κ)`` to a loss to regularise through autodiff. Its
  gradient is :func:`hypersparse_grad` exactly: the derivative is supplied in closed form
  (a custom VJP), which also gives the right value, 0, at weights that are exactly zero (where
  autodiff of ``|w|`` would give ±1) and stays finite when ``t = 0``. The threshold (and so
  ``s``) is detached, as in the reference. ``scale_constant``, ``distribution`` and ``nm``
  as in :func:`hypersparse_grad` (under a pattern: the sum of the terms of its units).
  """
  sparsity = masking.check_sparsity(sparsity)
  scale_constant = check_scale_constant(scale_constant)
  masking.prunable_leaves(params, where)
  if distribution != "global" or nm is not None:
    from hypersparse_jax import budgets
    nm = budgets.check_pattern(sparsity, distribution, nm)
    return _pattern_penalty(params, sparsity, where, scale_constant, distribution, nm)
  return _penalty(params, sparsity, where, scale_constant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _pattern_penalty(params, sparsity, where, scale_constant, distribution, nm):
  return _pattern(params, sparsity, where, scale_constant, distribution, nm)[1]


def _pattern_penalty_fwd(params, sparsity, where, scale_constant, distribution, nm):
  grads, value, _, _ = _pattern(params, sparsity, where, scale_constant, distribution, nm)
  dtypes = jax.tree.map(lambda x: jnp.zeros([], jnp.result_type(x)), params)
  return value, (grads, dtypes)


def _pattern_penalty_bwd(sparsity, where, scale_constant, distribution, nm, residuals,
                         cotangent):
  del sparsity, where, scale_constant, distribution, nm
  grads, dtypes = residuals
  return (jax.tree.map(lambda g, d: saturating_cast(cotangent * g, d.dtype), grads, dtypes),)


_pattern_penalty.defvjp(_pattern_penalty_fwd, _pattern_penalty_bwd)


def _value_from_terms(terms: HyperSparseTerms):
  # A·T/stop_gradient(T) − A: the value (≈ 0) of the reference's loss form.
  safe_t = jnp.where(terms.total_t > 0, terms.total_t, 1.0)
  return terms.total_a * terms.total_t / safe_t - terms.total_a


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _penalty(params, sparsity, where, scale_constant):
  leaves = masking.prunable_leaves(params, where)
  return _value_from_terms(_terms(leaves, sparsity, None, scale_constant))


def _penalty_fwd(params, sparsity, where, scale_constant):
  leaves = masking.prunable_leaves(params, where)
  terms = _terms(leaves, sparsity, None, scale_constant)  # threshold selected once
  grads = hypersparse_grad_from_terms(params, terms, where=where, float32=True)
  dtypes = jax.tree.map(lambda x: jnp.zeros([], jnp.result_type(x)), params)
  return _value_from_terms(terms), (grads, dtypes)


def _penalty_bwd(sparsity, where, scale_constant, residuals, cotangent):
  del sparsity, where, scale_constant
  grads, dtypes = residuals
  return (jax.tree.map(lambda g, d: saturating_cast(cotangent * g, d.dtype), grads, dtypes),)


_penalty.defvjp(_penalty_fwd, _penalty_bwd)


def l1_penalty(params, sparsity: float = 0.0, *, where: Optional[Predicate] = None) -> jax.Array:
  """L1 baseline ``Σ |w_i|`` over prunable leaves (float32). ``sparsity`` is accepted and unused."""
  masking.check_sparsity(sparsity)
  return sum(jnp.sum(_f32_abs(x)) for _, x in masking.prunable_leaves(params, where))


def l1_grad(params, sparsity: float = 0.0, *, where: Optional[Predicate] = None):
  """Gradient of :func:`l1_penalty`: ``sign(w)`` on prunable leaves, zeros elsewhere."""
  masking.check_sparsity(sparsity)
  masking.prunable_leaves(params, where)
  return _select(params, where)(jnp.sign)


def l2_penalty(params, sparsity: float = 0.0, *, where: Optional[Predicate] = None) -> jax.Array:
  """L2 baseline ``Σ w_i²`` over prunable leaves (float32). ``sparsity`` is accepted and unused."""
  masking.check_sparsity(sparsity)
  return sum(jnp.sum(jnp.square(jnp.asarray(x).astype(jnp.float32)))
             for _, x in masking.prunable_leaves(params, where))


def l2_grad(params, sparsity: float = 0.0, *, where: Optional[Predicate] = None):
  """Gradient of :func:`l2_penalty`: ``2·w`` on prunable leaves, zeros elsewhere."""
  masking.check_sparsity(sparsity)
  masking.prunable_leaves(params, where)
  return _select(params, where)(lambda x: 2 * x)


PENALTY_GRADS = {"hypersparse": hypersparse_grad, "l1": l1_grad, "l2": l2_grad}
