"""Prunable-leaf selection, the global magnitude threshold and mask, and sparsity figures.

The *prunable* weights of a parameter pytree are the leaves selected by a ``where`` predicate
on ``(path, leaf)``; by default every leaf named ``kernel`` with ``ndim >= 2`` (the convolution
and dense kernels of a Flax model; biases and normalisation parameters are never pruned).

For a sparsity (prune rate) ``κ`` and the ``n`` prunable weights ``w`` taken together, the global
magnitude threshold is ``t = sort(|w|)[floor(κ·n)]`` (0-based) and the pruning mask keeps
``|w| > t``. Both are computed over all layers at once, in float32, whatever the parameter dtype.
The threshold is exact (bit-identical to a sort) but sorts nothing large: the selection
algorithm lives in :mod:`hypersparse_jax.threshold`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hypersparse_jax import threshold
from hypersparse_jax.threshold import rank_of_threshold  # noqa: F401 (part of this module's API)

Predicate = Callable[[tuple, Any], bool]


# ----------------------------------------------------------------------------------------------
# Selecting prunable leaves
# ----------------------------------------------------------------------------------------------


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _strip_variable(path: Sequence) -> tuple:
  """Drops the ``.value`` attribute that Flax NNX ``Variable`` leaves add to a path."""
  path = tuple(path)
  while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in (
      "value", "raw_value"):
    path = path[:-1]
  return path


def path_name(path: Sequence) -> str:
  """Readable name of a pytree path, e.g. ``('params', 'Conv_0', 'kernel')`` -> ``params/Conv_0/kernel``."""
  return "/".join(_key_name(k) for k in _strip_variable(path))


def default_where(path: Sequence, leaf: Any) -> bool:
  """Default prunable-leaf predicate: leaves named ``kernel`` with ``ndim >= 2``.

  Works for Flax Linen ``params`` dicts, Flax NNX ``nnx.State`` (whose paths end in ``.value``)
  and plain nested dicts.
  """
  path = _strip_variable(path)
  return bool(path) and _key_name(path[-1]) == "kernel" and jnp.ndim(leaf) >= 2


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _all_finite(x) -> bool:
  # Concrete arrays closed over by a traced function (e.g. inside lax.cond) are still checked
  # eagerly; traced leaves cannot be checked without a host sync and are not.
  with jax.ensure_compile_time_eval():
    return bool(jnp.all(jnp.isfinite(x)))


def check_sparsity(sparsity) -> float:
  """Validates a sparsity (prune rate) and returns it as a Python float in ``[0, 1)``."""
  if isinstance(sparsity, jax.core.Tracer):
    raise TypeError(
        "sparsity must be a concrete Python number in [0, 1), not a traced value: it fixes the "
        "rank floor(sparsity * n) at trace time")
  if isinstance(sparsity, (str, bytes, bool)):
    raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
  try:
    value = float(sparsity)
  except (TypeError, ValueError):
    raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
  if not (0.0 <= value < 1.0) or math.isnan(value):
    raise ValueError(f"sparsity must be in [0, 1) (fraction of weights removed), got {sparsity!r}")
  return value


def prunable_leaves(params, where: Optional[Predicate] = None):
  """Returns ``[(path, leaf), ...]`` of the prunable leaves of ``params``, validated.

  Raises:
    ValueError: if the tree has no leaves, no leaf is selected by ``where``, a selected leaf is
      empty, or (for concrete arrays) holds NaN or infinite values.
    TypeError: if a selected leaf is not a floating-point array.
  """
  where = default_where if where is None else where
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  if not flat:
    raise ValueError("params is an empty pytree: there are no weights to prune")
  selected = [(p, x) for p, x in flat if where(p, x)]
  if not selected:
    names = ", ".join(path_name(p) for p, _ in flat[:8])
    raise ValueError(
        "no prunable leaf in params: the `where` predicate selected none of the leaves "
        f"({names}{', ...' if len(flat) > 8 else ''}); the default selects leaves named 'kernel' "
        "with ndim >= 2")
  for p, x in selected:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"prunable leaf {path_name(p)} has dtype {dtype}; allowed: floating point "
          "(float32, bfloat16, float16, float64)")
    if jnp.size(x) == 0:
      raise ValueError(f"prunable leaf {path_name(p)} is empty (shape {jnp.shape(x)})")
    if _is_concrete(x) and not _all_finite(x):
      raise ValueError(
          f"prunable leaf {path_name(p)} contains NaN or infinite weights; magnitudes must be "
          "finite")
  return selected


def num_prunable(leaves) -> int:
  """Total number of weights (a Python int, never overflows) in ``[(path, leaf)]``."""
  return sum(int(np.prod(jnp.shape(x), dtype=np.int64)) for _, x in leaves)


def _threshold(leaves, sparsity: float, hint=None) -> jax.Array:
  """The exact global threshold of validated ``leaves`` (``[(path, leaf)]``); ``hint``: ART's."""
  n = num_prunable(leaves)
  return threshold.kth_magnitude([x for _, x in leaves], rank_of_threshold(sparsity, n),
                                 hint=hint)


def magnitude_threshold(params, sparsity: float, *, where: Optional[Predicate] = None,
                        distribution: str = "global") -> jax.Array:
  """Exact global magnitude threshold ``t = sort(|w|)[floor(sparsity · n)]`` (float32 scalar).

  ``w`` is the concatenation of all prunable leaves (``n`` weights). The result equals the
  sort-based value bit for bit, for float32, bfloat16 and float16 parameters (magnitudes are
  compared in float32), and is computed without sorting all weights.

  Args:
    params: any pytree of arrays (Flax ``params``, ``nnx.State``, nested dicts).
    sparsity: fraction of prunable weights to remove, a Python float in ``[0, 1)``.
    where: predicate ``(path, leaf) -> bool`` selecting the prunable leaves; default
      :func:`default_where` (leaves named ``kernel`` with ``ndim >= 2``).
    distribution: ``'global'`` (default); ``'uniform'`` / ``'erk'`` return a pytree of the
      per-leaf thresholds instead (:func:`hypersparse_jax.budgets.layer_thresholds`).

  Returns:
    float32 scalar ``t``; :func:`magnitude_mask` keeps ``|w| > t``. ``t == 0`` when more than
    ``floor(sparsity·n)`` weights are exactly zero.

  Raises:
    ValueError: sparsity outside ``[0, 1)``, empty tree, no prunable leaf, NaN/inf weights
      (NaN/inf only when the weights are concrete, i.e. outside ``jit``).
    TypeError: non-float prunable leaf, traced sparsity.

  Under ``jit`` the weights cannot be inspected, and NaN/inf are not refused: magnitudes are
  ordered by their float32 bit patterns, so ``inf`` and then NaN count as larger than every
  number (NumPy's sort puts NaN last too): ``t`` is NaN when ``floor(sparsity·n)`` reaches into
  the NaNs, and :func:`magnitude_mask` keeps NaN weights (they are "largest").

  Example:
    >>> import jax.numpy as jnp, hypersparse_jax as hs
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -0.4], [0.2, 0.8]]), "bias": jnp.ones(2)}}
    >>> float(hs.magnitude_threshold(params, 0.5))  # sorted |w|: 0.1 0.2 0.4 0.8; index 2
    0.4000000059604645
  """
  sparsity = check_sparsity(sparsity)
  if distribution != "global":  # a pytree of per-leaf thresholds
    from hypersparse_jax import budgets
    return budgets.layer_thresholds(params, sparsity, distribution, where=where)
  return _threshold(prunable_leaves(params, where), sparsity)


def _mask_from_threshold(params, t, where):
  where = default_where if where is None else where

  def leaf_mask(path, x):
    if where(path, x):
      return (threshold.magnitude_bits(x).reshape(jnp.shape(x))
              > lax.bitcast_convert_type(t, jnp.int32))
    return jnp.ones(jnp.shape(x), bool)

  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def magnitude_mask(params, sparsity: float, *, where: Optional[Predicate] = None,
                   distribution: str = "global"):
  """Global magnitude pruning mask: ``|w| > t`` on prunable leaves, all-True elsewhere.

  With ``distribution='uniform'`` or ``'erk'`` each prunable leaf has its own budget
  (:func:`hypersparse_jax.layer_sparsities`) and its own exact threshold, and keeps
  ``|w| > t_l`` (leaves with budget 0 stay dense); ``'global'`` (default) is the paper's.

  ``t`` is :func:`magnitude_threshold`. With ties at ``t``, fewer weights than
  ``floor(sparsity·n)`` may be kept pruned... exactly the strict rule of the reference: every
  weight equal to ``t`` is removed, so the achieved sparsity is ``>= floor(sparsity·n)/n``.

  Returns:
    A bool pytree with the structure and shapes of ``params``.

  Example:
    >>> import jax.numpy as jnp, hypersparse_jax as hs
    >>> params = {"dense": {"kernel": jnp.array([[0.1, -0.4], [0.2, 0.8]]), "bias": jnp.ones(2)}}
    >>> mask = hs.magnitude_mask(params, 0.5)
    >>> mask["dense"]["kernel"].tolist(), mask["dense"]["bias"].tolist()
    ([[False, False], [False, True]], [True, True])
    >>> hs.apply_mask(params, mask)["dense"]["kernel"].tolist()
    [[0.0, 0.0], [0.0, 0.800000011920929]]
  """
  sparsity = check_sparsity(sparsity)
  if distribution != "global":
    from hypersparse_jax import budgets
    budgets.check_distribution(distribution)
    return budgets._budget_mask(params, sparsity, distribution, where)
  leaves = prunable_leaves(params, where)
  return _mask_from_threshold(params, _threshold(leaves, sparsity), where)


def _check_same_structure(tree, mask):
  t_def, m_def = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(mask)
  if t_def != m_def:
    raise ValueError(f"mask structure does not match the tree: tree {t_def} vs mask {m_def}")
  for (p, x), m in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(mask)):
    if jnp.shape(m) != jnp.shape(x):
      raise ValueError(
          f"mask leaf {path_name(p)} has shape {jnp.shape(m)} but the tree leaf has {jnp.shape(x)}")
    if jnp.result_type(m) != jnp.bool_:
      raise TypeError(f"mask leaf {path_name(p)} has dtype {jnp.result_type(m)}; allowed: bool")


def apply_mask(tree, mask):
  """Zeroes the entries of ``tree`` (parameters or updates) where ``mask`` is False.

  Args:
    tree: pytree of arrays; ``None`` leaves (e.g. ``optax.MaskedNode``-free updates) are kept.
    mask: bool pytree with the same structure and shapes.

  Raises:
    ValueError / TypeError: if the structures, shapes or mask dtype do not match.
  """
  _check_same_structure(tree, mask)
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), jnp.result_type(x))), tree, mask)


def sparsity(params, *, where: Optional[Predicate] = None) -> float:
  """Fraction of prunable weights that are exactly zero (a Python float)."""
  leaves = prunable_leaves(params, where)
  zeros = sum(int(np.sum(np.asarray(x) == 0)) for _, x in leaves)
  return zeros / num_prunable(leaves)


class LayerSparsity(NamedTuple):
  name: str
  shape: tuple
  kept: int
  total: int
  target: Optional[float] = None  # the layer's budget under a per-layer or N:M pattern

  @property
  def sparsity(self) -> float:
    return 1.0 - self.kept / self.total


class SparsityReport(NamedTuple):
  """Per-layer and global sparsity figures; ``str(report)`` is a printable table."""
  layers: list
  kept: int
  total: int
  # the pattern pruned for (see sparsity_report): None, or a dict with "kind" ("global",
  # "uniform", "erk" or "nm") and its figures
  pattern: Optional[dict] = None

  @property
  def sparsity(self) -> float:
    return 1.0 - self.kept / self.total

  def __str__(self) -> str:
    width = max([len(l.name) for l in self.layers] + [6])
    targets = self.pattern is not None and self.pattern["kind"] != "global"
    head = f"{'layer':<{width}}  {'shape':>20}  {'kept':>10}  {'total':>10}  {'sparsity':>8}"
    lines = [head + (f"  {'target':>8}" if targets else "")]
    for l in self.layers:
      line = (f"{l.name:<{width}}  {str(l.shape):>20}  {l.kept:>10,}  {l.total:>10,}  "
              f"{l.sparsity:>8.2%}")
      if targets:
        line += f"  {'dense' if not l.target else format(l.target, '.2%'):>8}"
      lines.append(line)
    lines.append(f"{'global':<{width}}  {'':>20}  {self.kept:>10,}  {self.total:>10,}  "
                 f"{self.sparsity:>8.2%}")
    p = self.pattern
    if p is not None and p["kind"] == "nm":
      lines.append(f"pattern {p['n']}:{p['m']} along each kernel's input axis; groups holding "
                   f"more than {p['n']} non-zeros: {p['groups_over_n']:,}"
                   + (f"; dense (input not a multiple of {p['m']}): "
                      f"{', '.join(p['dense_leaves'])}" if p["dense_leaves"] else ""))
    elif p is not None and p["kind"] != "global":
      lines.append(f"budget {p['kind']} at {p['sparsity']:.2%} overall")
    return "\n".join(lines)

  def as_dict(self) -> dict:
    return {"kept": self.kept, "total": self.total, "sparsity": self.sparsity,
            "pattern": self.pattern,
            "layers": [{"name": l.name, "shape": list(l.shape), "kept": l.kept, "total": l.total,
                        "sparsity": l.sparsity, "target": l.target} for l in self.layers]}


def sparsity_report(params, mask=None, *, where: Optional[Predicate] = None,
                    sparsity: Optional[float] = None, distribution: str = "global",
                    nm: Optional[tuple] = None) -> SparsityReport:
  """Per-layer and global counts of kept (nonzero, or mask-True) prunable weights.

  Args:
    params: parameter pytree.
    mask: optional bool pytree (same structure); when given, "kept" counts mask-True entries,
      otherwise nonzero weights.
    where: prunable-leaf predicate (default :func:`default_where`).
    sparsity, distribution, nm: the pattern pruned for, if any: with ``sparsity`` and a
      per-layer ``distribution`` each layer shows its budget; with ``nm=(n, m)`` the report
      names the pattern, the layers it leaves dense, and counts the groups that hold more than
      ``n`` non-zeros (0 for a model that has the pattern).
  """
  from hypersparse_jax import budgets
  budgets.check_distribution(distribution)
  if nm is not None:
    nm = budgets.check_nm(*nm)
    budgets.check_pattern(1 - nm[0] / nm[1] if sparsity is None else sparsity, distribution, nm)
  elif distribution != "global" and sparsity is None:
    raise ValueError(f"distribution={distribution!r} sets per-layer budgets from a sparsity; "
                     "pass sparsity= too (or leave distribution 'global')")
  leaves = prunable_leaves(params, where)
  if mask is not None:
    _check_same_structure(params, mask)
    where_ = default_where if where is None else where
    by_path = {tuple(p): m for (p, x), m in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                                jax.tree_util.tree_leaves(mask)) if where_(p, x)}
  layers = []
  for p, x in leaves:
    kept_arr = np.asarray(by_path[tuple(p)]) if mask is not None else (np.asarray(x) != 0)
    layers.append(LayerSparsity(path_name(p), tuple(jnp.shape(x)), int(np.sum(kept_arr)),
                                int(np.prod(jnp.shape(x), dtype=np.int64))))
  pattern = None
  if nm is not None:
    n, m = nm
    dense = budgets.nm_dense_leaves(params, n, m, where=where)
    counted = params if mask is None else apply_mask(params, mask)
    pattern = {"kind": "nm", "n": n, "m": m,
               "groups_over_n": budgets.nm_violations(counted, n, m, where=where),
               "dense_leaves": [name for name, _, _ in dense]}
    layers = [l._replace(target=None if l.name in pattern["dense_leaves"] else 1 - n / m)
              for l in layers]
  elif distribution != "global":
    targets = budgets._leaf_budgets(leaves, check_sparsity(sparsity), distribution)
    pattern = {"kind": distribution, "sparsity": float(sparsity)}
    layers = [l._replace(target=k) for l, k in zip(layers, targets)]
  elif sparsity is not None:
    pattern = {"kind": "global", "sparsity": float(check_sparsity(sparsity))}
  return SparsityReport(layers, sum(l.kept for l in layers), sum(l.total for l in layers),
                        pattern)
