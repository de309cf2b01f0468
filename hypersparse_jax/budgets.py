"""Where the sparsity goes: per-layer budgets (uniform, ERK) and N:M patterns.

The paper, and :func:`hypersparse_jax.magnitude_mask` by default, prune with one global
magnitude threshold (``distribution='global'``). This module adds the two other patterns of the
pruning literature and gives HyperSparse and ART to each.

**Per-layer budgets** (:func:`layer_sparsities`). ``'uniform'``: every prunable leaf loses the
same fraction κ. ``'erk'`` (Erdős–Rényi-Kernel, Evci et al. 2020, "Rigging the Lottery"): the
density (kept fraction) of a leaf is proportional to ``sum(shape) / prod(shape)`` (all its
dimensions, kernel sizes included), scaled so that the kept weights total ``(1 − κ)·n``; a leaf
whose density would exceed 1 stays dense and the others are rescaled, repeatedly, as RigL's code
does. Each leaf ``l`` then has its own exact threshold ``t_l = sort(|w_l|)[floor(κ_l·n_l)]``
and its mask keeps ``|w| > t_l`` (the reference's rule, per leaf). A leaf with budget
``κ_l = 0`` (ERK's dense leaves) stays dense: it has no threshold, no mask and no HyperSparse
term.

**N:M** (:func:`nm_mask`). Along the input axis of a kernel (:func:`nm_axis`), every group of
``M`` consecutive weights keeps its ``N`` of largest magnitude; among equal magnitudes the weight
earlier in the group is kept. A leaf whose input size is not a multiple of ``M`` (LeNet-5's first
convolution has one input channel) cannot be grouped: it **stays dense**, and
:func:`nm_dense_leaves` / :func:`hypersparse_jax.sparsity_report` name it.

**HyperSparse under a pattern.** The global form (:mod:`hypersparse_jax.penalties`) over weights
``a = |w|`` with threshold ``t``, ``s = c/t``, ``A = Σ a``, ``T = Σ tanh(s·a)`` is::

    HS(w) = A · T / stop_gradient(T) − A,    ∂HS/∂w_i = sign(w_i) · s · sech²(s·a_i) · A / T

Under a pattern the weights fall into *units*, each with its own threshold, and the penalty is
the sum of the global form over the units::

    HS_pattern(w) = Σ_u HS_{κ_u}(w_u),   ∂/∂w_i = sign(w_i) · s_u · sech²(s_u·a_i) · A_u / T_u

with ``u`` the unit of weight ``i``, ``t_u`` its threshold (detached), ``s_u = c/t_u``,
``A_u = Σ_{j∈u} a_j`` and ``T_u = Σ_{j∈u} tanh(s_u·a_j)``. The units are the leaves for a
per-layer budget (``t_l`` as above) and the groups of ``M`` for N:M. For N:M the threshold of a
group is the largest magnitude its mask removes (``sort(a_g)[M−N−1]``), as the global
threshold is the largest magnitude the global mask removes (``sort(a)[floor(κn)]``): the
``M − N`` smallest weights lie at or below the steepest fall of ``sech²`` and are pushed towards
zero, the ``N`` largest above it are left free. Within a unit the gradient is the global form's
exactly, so its behaviour carries over: about ``s_u·A_u/T_u`` (L1-like) far below ``t_u``,
about 0 far above it; ``t_u = 0`` or ``T_u = 0`` switches the unit's term off. Per unit,
``s_u·A_u/T_u`` does not change when the unit's weights are scaled, so every unit is pushed
with the same strength whatever its magnitude.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hypersparse_jax import masking, threshold
from hypersparse_jax.masking import Predicate

DISTRIBUTIONS = ("global", "uniform", "erk")


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def check_distribution(distribution) -> str:
  """Returns ``distribution`` if it is one of :data:`DISTRIBUTIONS`, else raises ValueError."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                     f"got {distribution!r}")
  return distribution


def check_nm(n, m) -> tuple[int, int]:
  """``(n, m)`` as ints if ``1 <= n < m`` (integers), else raises ValueError/TypeError."""
  for name, v in (("n", n), ("m", m)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise TypeError(f"N:M pattern: {name} must be an integer, got {v!r}")
  n, m = int(n), int(m)
  if not 1 <= n < m:
    raise ValueError(f"N:M pattern: need 1 <= N < M (N weights kept of every M), got {n}:{m}")
  return n, m


def parse_nm(text: str) -> tuple[int, int]:
  """``'2:4'`` -> ``(2, 4)`` (the CLI's ``--nm``); raises ValueError naming the text."""
  parts = str(text).split(":")
  try:
    if len(parts) != 2:
      raise ValueError
    n, m = int(parts[0]), int(parts[1])
  except ValueError:
    raise ValueError(f"N:M pattern must be written N:M with integers, e.g. 2:4, got "
                     f"{text!r}") from None
  return check_nm(n, m)


def nm_sparsity(n: int, m: int) -> float:
  """The sparsity of an N:M pattern, ``1 − N/M`` (of the leaves it groups)."""
  n, m = check_nm(n, m)
  return 1.0 - n / m


# ------------------------------------------------------------------------------------------------
# Per-layer budgets
# ------------------------------------------------------------------------------------------------


def erk_densities(shapes: Sequence[tuple], sparsity: float) -> list[float]:
  """ERK densities (kept fractions) of leaves of the given shapes for total sparsity κ.

  ``density_l = ε · sum(shape_l) / prod(shape_l)`` with ``ε`` such that
  ``Σ density_l · n_l = (1 − κ) · Σ n_l``; leaves whose density would exceed 1 are made dense
  (density 1) and ``ε`` is solved again for the others, until none exceeds 1 (RigL's rule:
  each round makes dense the leaves with the largest raw density). Computed in float64.
  """
  sparsity = masking.check_sparsity(sparsity)
  sizes = [float(np.prod(s, dtype=np.float64)) for s in shapes]
  raw = [float(sum(s)) / size for s, size in zip(shapes, sizes)]
  dense: set[int] = set()
  while True:
    free = [i for i in range(len(shapes)) if i not in dense]
    if not free:  # every leaf dense (only when κ is ~0)
      return [1.0] * len(shapes)
    kept = (1.0 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
    eps = kept / sum(raw[i] * sizes[i] for i in free)
    top = max(raw[i] for i in free)
    if eps * top <= 1.0:
      return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
    dense.update(i for i in free if raw[i] == top)


def _leaf_budgets(leaves, sparsity: float, distribution: str) -> list[float]:
  """Per-leaf sparsities of validated ``leaves`` for ``'uniform'`` / ``'erk'``."""
  if distribution == "uniform":
    return [sparsity] * len(leaves)
  densities = erk_densities([tuple(jnp.shape(x)) for _, x in leaves], sparsity)
  return [max(0.0, 1.0 - d) for d in densities]  # ERK's dense leaves: 0


def layer_sparsities(params, sparsity: float, distribution: str = "global", *,
                     where: Optional[Predicate] = None):
  """Per-leaf sparsities of a budget, as a pytree shaped like ``params``.

  Args:
    params: any pytree of arrays.
    sparsity: total sparsity κ in ``[0, 1)`` over the prunable leaves.
    distribution: ``'uniform'`` (κ in every prunable leaf), ``'erk'`` (see the module doc) or
      ``'global'`` (the paper's; its per-leaf sparsities depend on the weights: those that the
      global mask :func:`hypersparse_jax.magnitude_mask` gives, computed from ``params``).
    where: prunable-leaf predicate (default: leaves named ``kernel`` with ``ndim >= 2``).

  Returns:
    A pytree with the structure of ``params``: a Python float per prunable leaf (its fraction of
    weights to remove; ERK's dense leaves get 0.0) and ``None`` at the other leaves.

  Example (hand-worked ERK, total sparsity 0.9 over a 10×10 and a 100×10 kernel: raw
  densities 20/100 = 0.2 and 110/1000 = 0.11; ε·(0.2·100 + 0.11·1000) = 110 gives ε = 11/13)::

    >>> import jax.numpy as jnp, hypersparse_jax as hs
    >>> params = {"a": {"kernel": jnp.ones((10, 10))}, "b": {"kernel": jnp.ones((100, 10))}}
    >>> s = hs.layer_sparsities(params, 0.9, "erk")
    >>> round(s["a"]["kernel"], 6), round(s["b"]["kernel"], 6)   # 1 − 0.2ε, 1 − 0.11ε
    (0.830769, 0.906923)
  """
  sparsity = masking.check_sparsity(sparsity)
  check_distribution(distribution)
  leaves = masking.prunable_leaves(params, where)
  if distribution == "global":
    mask = masking.magnitude_mask(params, sparsity, where=where)
    flat_mask = {tuple(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    values = [1.0 - float(np.mean(np.asarray(flat_mask[tuple(p)]))) for p, _ in leaves]
  else:
    values = _leaf_budgets(leaves, sparsity, distribution)
  return _on_prunable(params, leaves, values, where)


def _on_prunable(params, leaves, values, where):
  """A pytree like ``params``: ``values`` (one per prunable leaf, in order) there, None else."""
  by_path = {tuple(p): v for (p, _), v in zip(leaves, values)}
  where = masking.default_where if where is None else where
  return jax.tree_util.tree_map_with_path(
      lambda p, x: by_path[tuple(p)] if where(p, x) else None, params)


def _leaf_thresholds(leaves, budgets, hints=None):
  """Exact per-leaf thresholds ``sort(|w_l|)[floor(κ_l·n_l)]`` (float32; 0 for dense leaves,
  which have no threshold). ``hints``: optional float32 array (one per leaf), speed only."""
  out = []
  for i, ((_, x), kappa) in enumerate(zip(leaves, budgets)):
    if kappa <= 0.0:
      out.append(jnp.zeros([], jnp.float32))
      continue
    n = int(np.prod(jnp.shape(x), dtype=np.int64))
    hint = None if hints is None else lax.bitcast_convert_type(
        jnp.asarray(hints[i], jnp.float32), jnp.int32)
    out.append(threshold.kth_magnitude([x], threshold.rank_of_threshold(kappa, n), hint=hint))
  return out


def layer_thresholds(params, sparsity: float, distribution: str = "global", *,
                     where: Optional[Predicate] = None):
  """The thresholds of a budget: a float32 scalar for ``'global'``
  (:func:`hypersparse_jax.magnitude_threshold`), else a pytree like ``params`` with each
  prunable leaf's exact threshold ``sort(|w_l|)[floor(κ_l·n_l)]`` (float32 scalar; ``None``
  for leaves with budget 0, which stay dense, and for the other leaves)."""
  sparsity = masking.check_sparsity(sparsity)
  if check_distribution(distribution) == "global":
    return masking.magnitude_threshold(params, sparsity, where=where)
  leaves = masking.prunable_leaves(params, where)
  budgets = _leaf_budgets(leaves, sparsity, distribution)
  ts = _leaf_thresholds(leaves, budgets)
  return _on_prunable(params, leaves, [t if k > 0 else None for t, k in zip(ts, budgets)],
                      where)


def _budget_mask(params, sparsity, distribution, where):
  leaves = masking.prunable_leaves(params, where)
  budgets = _leaf_budgets(leaves, sparsity, distribution)
  ts = _leaf_thresholds(leaves, budgets)
  by_path = {tuple(p): (t, k) for (p, _), t, k in zip(leaves, ts, budgets)}
  where_ = masking.default_where if where is None else where

  def leaf_mask(path, x):
    if not where_(path, x) or by_path[tuple(path)][1] <= 0.0:
      return jnp.ones(jnp.shape(x), bool)
    t = by_path[tuple(path)][0]
    return (threshold.magnitude_bits(x).reshape(jnp.shape(x))
            > lax.bitcast_convert_type(t, jnp.int32))

  return jax.tree_util.tree_map_with_path(leaf_mask, params)


# ------------------------------------------------------------------------------------------------
# N:M
# ------------------------------------------------------------------------------------------------


def nm_axis(path, leaf) -> int:
  """The input (contracted) axis along which N:M groups a prunable leaf.

  ``(in, out)`` dense kernels: 0. Convolution kernels ``(*spatial, I, O)`` of any rank (Flax's
  ``nn.Conv`` layout: ``(W, I, O)`` for 1-D, HWIO for 2-D, ``(D, H, W, I, O)`` for 3-D): the
  ``I`` axis, ``ndim - 2``. Flax attention projections are told apart by their module name:
  ``query`` / ``key`` / ``value`` kernels ``(d_model, heads, head_dim)`` contract axis 0 (the
  model axis); ``out`` ``(heads, head_dim, d_model)`` contracts heads and head_dim, and its
  groups run along axis 1 (consecutive weights within a head), which is ``ndim - 2`` as for a
  convolution. An embedding ``(vocab, d_model)`` used as the output layer contracts
  ``d_model``: axis 1.
  """
  names = [masking._key_name(k) for k in masking._strip_variable(path)]
  ndim = jnp.ndim(leaf)
  if names and names[-1] == "embedding":
    return 1
  if ndim <= 2:
    return 0
  if ndim == 3 and len(names) >= 2 and names[-2] in ("query", "key", "value"):
    return 0
  return ndim - 2


def _groups(x, axis: int, m: int):
  """``|x|`` in float32 as groups ``(..., G, m)`` of ``m`` consecutive entries along ``axis``."""
  a = jnp.moveaxis(jnp.abs(jnp.asarray(x).astype(jnp.float32)), axis, -1)
  return a.reshape(a.shape[:-1] + (a.shape[-1] // m, m))


def _ungroup(g, shape, axis: int):
  """Inverse of :func:`_groups` for an array of the grouped shape."""
  moved = tuple(np.moveaxis(np.empty(shape, bool), axis, -1).shape)
  return jnp.moveaxis(g.reshape(moved), -1, axis)


def _nm_keep(a, n: int):
  """Bool of the grouped magnitudes ``a`` (..., m): the ``n`` largest of each group (ties: the
  earlier entry). Rank of entry i = #{j: a_j > a_i} + #{j < i: a_j = a_i}; kept if rank < n."""
  m = a.shape[-1]
  ai, aj = a[..., :, None], a[..., None, :]
  earlier = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]: j < i
  rank = jnp.sum((aj > ai) | ((aj == ai) & earlier), axis=-1)
  return rank < n


def _groupable(x, axis: int, m: int) -> bool:
  return jnp.ndim(x) >= 1 and jnp.shape(x)[axis] % m == 0


def nm_dense_leaves(params, n: int, m: int, *, where: Optional[Predicate] = None) -> list:
  """``[(name, shape, axis)]`` of the prunable leaves N:M cannot group (their input size is
  not a multiple of ``m``): they stay dense under :func:`nm_mask` and get no HyperSparse term."""
  n, m = check_nm(n, m)
  out = []
  for p, x in masking.prunable_leaves(params, where):
    axis = nm_axis(p, x)
    if not _groupable(x, axis, m):
      out.append((masking.path_name(p), tuple(jnp.shape(x)), axis))
  return out


def nm_mask(params, n: int, m: int, *, where: Optional[Predicate] = None):
  """N:M mask: in every group of ``m`` consecutive weights along each prunable kernel's input
  axis (:func:`nm_axis`), True for the ``n`` of largest magnitude.

  Ties are broken deterministically: of equal magnitudes, the weight earlier in the group is
  kept, so exactly ``n`` of every ``m`` are True. Leaves whose input size is not a multiple of
  ``m`` stay dense (all True; :func:`nm_dense_leaves` lists them), as do non-prunable leaves.

  Example:
    >>> import jax.numpy as jnp, hypersparse_jax as hs
    >>> params = {"dense": {"kernel": jnp.array([[0.1], [-0.4], [0.2], [0.8]])}}
    >>> hs.nm_mask(params, 2, 4)["dense"]["kernel"].ravel().tolist()
    [False, True, False, True]
  """
  n, m = check_nm(n, m)
  masking.prunable_leaves(params, where)
  where_ = masking.default_where if where is None else where

  def leaf_mask(path, x):
    if not where_(path, x):
      return jnp.ones(jnp.shape(x), bool)
    axis = nm_axis(path, x)
    if not _groupable(x, axis, m):
      return jnp.ones(jnp.shape(x), bool)
    return _ungroup(_nm_keep(_groups(x, axis, m), n), jnp.shape(x), axis)

  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def nm_violations(params, n: int, m: int, *, where: Optional[Predicate] = None) -> int:
  """Number of groups of ``m`` (along each groupable prunable leaf's input axis) that hold more
  than ``n`` non-zero weights: 0 for a model that really has the N:M pattern."""
  n, m = check_nm(n, m)
  bad = 0
  for p, x in masking.prunable_leaves(params, where):
    axis = nm_axis(p, x)
    if _groupable(x, axis, m):
      nonzero = np.asarray(_groups(x, axis, m)) != 0
      bad += int(np.sum(nonzero.sum(axis=-1) > n))
  return bad


# ------------------------------------------------------------------------------------------------
# Masks of any pattern
# ------------------------------------------------------------------------------------------------


def pattern_mask(params, sparsity: float, *, where: Optional[Predicate] = None,
                 distribution: str = "global", nm: Optional[tuple] = None):
  """The mask of a pattern: :func:`nm_mask` when ``nm=(n, m)`` is given (then ``sparsity``
  must be ``1 − n/m``), else :func:`hypersparse_jax.magnitude_mask` with ``distribution``."""
  sparsity = masking.check_sparsity(sparsity)
  if nm is not None:
    check_pattern(sparsity, distribution, nm)
    return nm_mask(params, *nm, where=where)
  return masking.magnitude_mask(params, sparsity, where=where, distribution=distribution)


def check_pattern(sparsity: float, distribution: str, nm) -> Optional[tuple]:
  """Validates a pattern; returns ``nm`` as ``(n, m)`` or None."""
  check_distribution(distribution)
  if nm is None:
    return None
  n, m = check_nm(*nm)
  if distribution != "global":
    raise ValueError(f"an N:M pattern ({n}:{m}) fixes the sparsity of every group; it does not "
                     f"combine with distribution={distribution!r} (leave it 'global')")
  if not math.isclose(sparsity, 1.0 - n / m, rel_tol=0, abs_tol=1e-9):
    raise ValueError(f"an N:M pattern {n}:{m} has sparsity 1 - {n}/{m} = {1 - n / m:g}; got "
                     f"sparsity {sparsity!r}")
  return n, m


# ------------------------------------------------------------------------------------------------
# HyperSparse under a pattern
# ------------------------------------------------------------------------------------------------


def _unit_terms(a, t, scale_constant):
  """Per unit (the last axis of ``a`` holds a unit's magnitudes... or the whole array for a
  scalar ``t``): ``s``, and the factor ``s·A/T`` (0 where ``T = 0``), float32."""
  from hypersparse_jax import penalties
  s = penalties.hypersparse_scale(t, scale_constant)
  if jnp.ndim(t) == 0:
    total_a, total_t = jnp.sum(a), jnp.sum(jnp.tanh(s * a))
  else:
    total_a = jnp.sum(a, axis=-1)
    total_t = jnp.sum(jnp.tanh(s[..., None] * a), axis=-1)
  ratio = jnp.where(total_t > 0, total_a / jnp.where(total_t > 0, total_t, 1.0), 0.0)
  factor = jnp.minimum(s * ratio, jnp.finfo(jnp.float32).max)
  return s, factor, total_a, total_t


def pattern_hypersparse(params, sparsity: float, *, where: Optional[Predicate] = None,
                        distribution: str = "global", nm: Optional[tuple] = None,
                        scale_constant: float, hints=None):
  """HyperSparse under a per-layer budget or an N:M pattern (see the module doc).

  Returns ``(grads, value, thresholds, finite)``: the float32 gradient tree (zeros on leaves
  that are not prunable or stay dense), the penalty's value (≈ 0), a float32 vector of the
  per-leaf thresholds (per-layer budgets; empty for N:M) and whether every ``A_u, T_u`` was
  finite. ``hints``: per-leaf threshold guesses (speed only).
  """
  from hypersparse_jax import penalties
  leaves = masking.prunable_leaves(params, where)
  grads, value, ts, finite = {}, jnp.zeros([], jnp.float32), [], jnp.bool_(True)
  if nm is not None:
    n, m = check_pattern(sparsity, distribution, nm)
    for p, x in leaves:
      axis = nm_axis(p, x)
      if not _groupable(x, axis, m):
        continue
      a = _groups(x, axis, m)
      keep = _nm_keep(a, n)
      t = jnp.max(jnp.where(keep, 0.0, a), axis=-1)  # the largest magnitude the mask removes
      s, factor, total_a, total_t = _unit_terms(a, t, scale_constant)
      g = factor[..., None] * penalties._sech2(s[..., None] * a)
      grads[tuple(p)] = jnp.sign(x).astype(jnp.float32) * _ungroup(g, jnp.shape(x), axis)
      value = value + jnp.sum(penalties._value_from_terms(
          penalties.HyperSparseTerms(t, s, total_a, total_t)))
      finite = finite & jnp.all(jnp.isfinite(total_a) & jnp.isfinite(total_t))
  else:
    sparsity = masking.check_sparsity(sparsity)
    budgets = _leaf_budgets(leaves, sparsity, check_distribution(distribution))
    ts = _leaf_thresholds(leaves, budgets, hints)
    for (p, x), t, kappa in zip(leaves, ts, budgets):
      if kappa <= 0.0:
        continue
      a = jnp.abs(jnp.asarray(x).astype(jnp.float32))
      s, factor, total_a, total_t = _unit_terms(a, t, scale_constant)
      grads[tuple(p)] = jnp.sign(x).astype(jnp.float32) * factor * penalties._sech2(s * a)
      value = value + penalties._value_from_terms(
          penalties.HyperSparseTerms(t, s, total_a, total_t))
      finite = finite & jnp.isfinite(total_a) & jnp.isfinite(total_t)
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: grads.get(tuple(p), jnp.zeros(jnp.shape(x), jnp.float32)), params)
  thresholds = jnp.stack(ts) if ts else jnp.zeros([0], jnp.float32)
  return tree, value, thresholds, finite


def num_leaf_thresholds(params, distribution: str, nm, where) -> int:
  """Length of the threshold vector :func:`pattern_hypersparse` returns."""
  if nm is not None or distribution == "global":
    return 0
  return len(masking.prunable_leaves(params, where))
