"""Channel pruning: HyperSparse over channels, and models that are physically smaller.

Unstructured zeros make a model smaller on disk but not faster in XLA or onnxruntime; removing
whole channels does: the pruned network is a smaller dense network (:func:`slim`).

**Groups.** A prunable *channel* is an output channel of a convolution or an output unit of a
dense layer whose output feeds exactly one next layer (:class:`ChannelGroup`: the producer, its
bias and BatchNorm, the consumer). The last layer's outputs (the logits) are never pruned. In a
ResNet only the first convolution of a BasicBlock (the first two of a Bottleneck) can lose
channels freely: the others write to the residual stream, whose channels every block shares;
they are **left dense** (so are the stem and the shortcut convolutions). :func:`channel_groups`
finds the groups of the library's models from their parameter names; pass ``groups=`` for
other models.

**A channel's magnitude** ``m_c`` is the L2 norm of the parameters that carry its scale: its
weights (the producer kernel's slice ``[..., c]``) when no BatchNorm follows, and its BatchNorm
scale ``|γ_c|`` when one does — BatchNorm divides the weights' scale away, so their norm says
nothing about what the channel contributes, while ``γ_c`` scales its output (network slimming's
criterion, Liu et al. 2017).

**One global threshold, fairly.** Layers of different fan-in have weight norms of different
sizes, so each magnitude is divided by the mean magnitude of its layer: ``m̃_c = m_c / μ_l``
(``μ_l`` detached, as the threshold is). The threshold is the exact
``t = sort(m̃)[floor(κ·N)]`` over the ``N`` prunable channels (:mod:`hypersparse_jax.threshold`,
bit-exact as for weights) and the mask keeps ``m̃_c > t``; then **every layer keeps at least its
largest channel** (ties: the first), so no layer is cut, and the achieved fraction may fall
short of ``floor(κ·N) + 1`` channels by the number of layers so rescued.

**Or the same fraction from every layer** (``distribution='uniform'``, an option; the
default is the global threshold above): each prunable layer of ``n_l`` channels loses its
``floor(κ·n_l)`` channels of smallest magnitude (ties: the stable sort removes the earlier
channel first), Li et al.'s (2017) count, so at equal κ the slimmed layers are as wide as theirs.
Not the reference's ``floor(κ·n)+1`` rule: for a layer of 6 channels it would remove 4 at
κ = 0.5. ``κ < 1`` keeps at least one channel per layer.

**The mask** (:func:`channel_mask`) is shaped like the parameters: a removed channel's producer
weights, bias, BatchNorm scale and bias are False, so after its activation it is exactly 0 (the
consumer's weights that read it are left True: they multiply zeros; :func:`slim` drops them).

**Group HyperSparse.** The paper's gradient applied to the normalised magnitudes, with
``s = c/t``, ``A = Σ m̃``, ``T = Σ tanh(s·m̃)``::

    ∂HS/∂m̃_c = s · sech²(s·m̃_c) · A / T

and pulled back to the parameters ``θ_c`` (the weights or ``γ_c``) by the chain rule,
``∂m̃_c/∂θ_c = θ_c / (‖θ_c‖ · μ_l)``::

    ∂HS/∂θ_c = s · sech²(s·m̃_c) · (A / T) · θ_c / (‖θ_c‖ · μ_l)     (0 where ‖θ_c‖ = 0)

— a group lasso whose push fades above the channel threshold. With ``distribution='uniform'``
every layer ``l`` is a unit with its own term, as a per-layer weight budget is
(:mod:`hypersparse_jax.budgets`): ``t_l`` is the largest normalised magnitude its mask removes
(``sort(m̃_l)[floor(κ·n_l) − 1]``; no term where ``floor(κ·n_l) = 0``), ``s_l = c/t_l``,
``A_l, T_l`` sum over the layer, and ``∂HS/∂m̃_c = s_l · sech²(s_l·m̃_c) · A_l / T_l``, pulled back
as above; the penalty is the sum of the layers' loss forms. In loss form
``HS = A·T/stop_gradient(T) − A`` over ``m̃`` (value ≈ 0), its gradient is exactly this. The
L1 baseline on channels is ``Σ m̃_c`` (group lasso; with BatchNorm, network slimming's L1 on
the scales).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hypersparse_jax import masking, penalties, threshold


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """The channels of one producer layer.

  Attributes:
    producer: path (tuple of names in ``params``) of the producer module; its ``kernel`` has
      the channels on its last axis, its ``bias`` (if any) one entry per channel.
    consumer: path of the module that reads the producer's output (its kernel's input axis:
      axis -2; a dense layer reading a flattened conv map reads ``repeat`` rows per channel,
      in NHWC flattening order).
    norm: path of the BatchNorm after the producer, or None.
  """
  producer: tuple
  consumer: tuple
  norm: Optional[tuple] = None

  @property
  def name(self) -> str:
    return "/".join(self.producer)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _natural(name):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def channel_groups(params) -> list:
  """The prunable channel groups of the library's models, found from ``params``' names.

  LeNet-300-100 / digits MLP (``fc1 … fcK``): each hidden layer, consumed by the next.
  LeNet-5: ``conv1`` → ``conv2`` → ``fc1`` (flattened) → ``fc2``. Digits CNN: ``conv1`` (+
  ``bn1``) → ``conv2`` (+ ``bn2``) → ``fc``. VGG: every conv (+ its BatchNorm), consumed by the
  next conv or by the classifier. CIFAR ResNet: inside every block, ``conv1`` (+ ``bn1``) →
  ``conv2`` (Bottleneck also ``conv2`` → ``conv3``); the stem, the blocks' last convs and the
  shortcuts write to the residual stream and are not prunable.

  Raises:
    ValueError: for parameters of another architecture (pass ``groups=`` explicitly).
  """
  top = {k: v for k, v in params.items() if isinstance(v, dict)}
  names = set(top)
  has_kernel = lambda k: "kernel" in top[k]  # noqa: E731
  has_scale = lambda k: "scale" in top[k] and "kernel" not in top[k]  # noqa: E731
  if any(re.fullmatch(r"layer\d+_\d+", k) for k in names):  # CIFAR ResNet
    groups = []
    for b in sorted((k for k in names if re.fullmatch(r"layer\d+_\d+", k)), key=_natural):
      block = top[b]
      chain = ["conv1", "conv2"] + (["conv3"] if "conv3" in block else [])
      for i in range(len(chain) - 1):
        groups.append(ChannelGroup((b, chain[i]), (b, chain[i + 1]), (b, f"bn{i + 1}")))
    return groups
  if any(k.startswith("features_") for k in names) and "classifier" in names:  # VGG
    feats = sorted((k for k in names if k.startswith("features_")), key=_natural)
    convs = [k for k in feats if has_kernel(k)]
    groups = []
    for i, c in enumerate(convs):
      nxt = convs[i + 1] if i + 1 < len(convs) else "classifier"
      bn = f"features_{int(c.split('_')[1]) + 1}"
      groups.append(ChannelGroup((c,), (nxt,), (bn,) if bn in names and has_scale(bn) else None))
    return groups
  if names == {"conv1", "conv2", "fc1", "fc2"}:  # LeNet-5
    return [ChannelGroup(("conv1",), ("conv2",)), ChannelGroup(("conv2",), ("fc1",)),
            ChannelGroup(("fc1",), ("fc2",))]
  if {"conv1", "conv2", "fc"} <= names and names <= {"conv1", "conv2", "fc", "bn1", "bn2"}:
    bn = lambda i: (f"bn{i}",) if f"bn{i}" in names else None  # noqa: E731
    return [ChannelGroup(("conv1",), ("conv2",), bn(1)), ChannelGroup(("conv2",), ("fc",), bn(2))]
  if names and all(re.fullmatch(r"fc\d+", k) for k in names):  # MLPs
    fcs = sorted(names, key=_natural)
    return [ChannelGroup((a,), (b,)) for a, b in zip(fcs, fcs[1:])]
  raise ValueError(f"cannot tell the channel structure of these parameters (top-level modules "
                   f"{sorted(names)}); pass groups=[ChannelGroup(...)] for this model")


def _select_groups(params, groups, where):
  groups = channel_groups(params) if groups is None else list(groups)
  if where is not None:
    groups = [g for g in groups if where(
        tuple(jax.tree_util.DictKey(k) for k in g.producer + ("kernel",)),
        _get(params, g.producer)["kernel"])]
  if not groups:
    raise ValueError("no prunable channel group: the `where` predicate selected none")
  for g in groups:
    k = _get(params, g.producer)["kernel"]
    if not jnp.issubdtype(jnp.result_type(k), jnp.floating):
      raise TypeError(f"{g.name}/kernel has dtype {jnp.result_type(k)}; allowed: floating point")
  return groups


def _carriers(params, g):
  """The parameters that carry the channels' scale, as ``(channels, -1)`` float32: γ when a
  BatchNorm follows, else the kernel's slices."""
  if g.norm is not None:
    return jnp.asarray(_get(params, g.norm)["scale"], jnp.float32)[:, None]
  k = jnp.asarray(_get(params, g.producer)["kernel"], jnp.float32)
  return jnp.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)


def channel_magnitudes(params, *, groups=None, where=None, normalized: bool = True) -> list:
  """Per group, the channels' magnitudes ``m_c`` (or ``m̃_c = m_c / mean(m)`` with
  ``normalized``), float32 vectors in the order of the groups."""
  groups = _select_groups(params, groups, where)
  out = []
  for g in groups:
    m = jnp.sqrt(jnp.sum(jnp.square(_carriers(params, g)), axis=1))
    if normalized:
      m = m / jnp.maximum(jax.lax.stop_gradient(jnp.mean(m)), jnp.finfo(jnp.float32).tiny)
    out.append(m)
  return out


DISTRIBUTIONS = ("global", "uniform")


def check_distribution(distribution) -> str:
  """Returns ``distribution`` if channels can be pruned with it, else raises ValueError."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"channel distribution must be 'global' (one threshold over all prunable "
                     f"channels) or 'uniform' (the same fraction from every layer), got "
                     f"{distribution!r}")
  return distribution


def _uniform_drop(sparsity, n):
  """Channels a layer of ``n`` loses under ``distribution='uniform'``: ``floor(κ·n)``
  (``<= n − 1``)."""
  return threshold.rank_of_threshold(sparsity, n)


def _uniform_keep(m, sparsity):
  """``(keep, t)`` of one layer under ``distribution='uniform'``: all but its ``floor(κ·n)``
  smallest (stable order), and the largest magnitude removed (0 if none is)."""
  n = int(m.shape[0])
  drop = _uniform_drop(sparsity, n)
  order = jnp.argsort(m, stable=True)
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  t = m[order[drop - 1]] if drop > 0 else jnp.zeros([], m.dtype)
  return rank >= drop, t


def _keep(mags, sparsity, distribution="global"):
  """Kept channels per group: ``m̃ > t`` globally, then each group's largest rescued; or, for
  ``'uniform'``, per group (then ``t`` is the vector of the groups' thresholds)."""
  if distribution == "uniform":
    pairs = [_uniform_keep(m, sparsity) for m in mags]
    return [k for k, _ in pairs], jnp.stack([t for _, t in pairs]).astype(jnp.float32)
  n = sum(int(m.shape[0]) for m in mags)
  t = threshold.kth_magnitude(mags, threshold.rank_of_threshold(sparsity, n))
  keeps = []
  for m in mags:
    keep = m > t
    top = jnp.arange(m.shape[0]) == jnp.argmax(m)
    keeps.append(keep | top)
  return keeps, t


def check_multiple_of(multiple_of):
  """Returns ``multiple_of`` (None or a positive int), else raises ValueError naming it."""
  if multiple_of is not None and (isinstance(multiple_of, bool) or not isinstance(
      multiple_of, (int, np.integer)) or multiple_of < 1):
    raise ValueError(f"multiple_of must be None or a positive integer (e.g. 8), got "
                     f"{multiple_of!r}")
  return None if multiple_of is None else int(multiple_of)


def _round_keep(keeps, mags, multiple_of):
  """Each group's kept count ``k`` raised to ``min(n, ⌈k / multiple_of⌉·multiple_of)``: the
  kept channels stay, and the largest removed ones (the lower index first among equals) come
  back until the count is reached."""
  out = []
  for keep, m in zip(keeps, mags):
    n = int(m.shape[0])
    k = jnp.sum(keep.astype(jnp.int32))
    target = jnp.minimum(n, -(-k // multiple_of) * multiple_of)
    order = jnp.argsort(-jnp.where(keep, jnp.inf, m), stable=True)
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    out.append(rank < target)
  return out


def _checked_keep(params, sparsity, groups, where, normalized, distribution, multiple_of=None):
  """The argument checks of the public selections, then ``(groups, keep vectors)``."""
  sparsity = masking.check_sparsity(sparsity)
  check_distribution(distribution)
  multiple_of = check_multiple_of(multiple_of)
  groups = _select_groups(params, groups, where)
  _check_finite(params, groups)
  mags = channel_magnitudes(params, groups=groups, normalized=normalized)
  keeps, _ = _keep(mags, sparsity, distribution)
  if multiple_of is not None:
    keeps = _round_keep(keeps, mags, multiple_of)
  return groups, keeps


def channel_keep(params, sparsity: float, *, groups=None, where=None,
                 normalized: bool = True, distribution: str = "global",
                 multiple_of: Optional[int] = None) -> dict:
  """``{group name: bool vector}`` of the channels :func:`channel_mask` keeps."""
  groups, keeps = _checked_keep(params, sparsity, groups, where, normalized, distribution,
                                multiple_of)
  return {g.name: k for g, k in zip(groups, keeps)}


def _mask_from_keep(params, groups, keeps):
  mask = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)

  def put(path, fn):
    node = mask
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = fn(node[path[-1]])

  for g, keep in zip(groups, keeps):
    prod = _get(params, g.producer)
    put(g.producer + ("kernel",), lambda m, keep=keep: m & keep)
    if "bias" in prod:
      put(g.producer + ("bias",), lambda m, keep=keep: m & keep)
    if g.norm is not None:
      for leaf in ("scale", "bias"):
        if leaf in _get(params, g.norm):
          put(g.norm + (leaf,), lambda m, keep=keep: m & keep)
  return mask


def _check_finite(params, groups):
  """The producers' weights and the BatchNorm scales (the magnitudes' carriers) are finite."""
  for g in groups:
    named = [(g.name, x) for x in jax.tree.leaves(_get(params, g.producer))]
    if g.norm is not None:
      named.append(("/".join(g.norm) + "/scale", _get(params, g.norm)["scale"]))
    for name, x in named:
      if masking._is_concrete(x) and not masking._all_finite(x):
        raise ValueError(f"{name} contains NaN or infinite values; magnitudes must be finite")


def channel_mask(params, sparsity: float, *, where=None, groups=None, normalized: bool = True,
                 distribution: str = "global", multiple_of: Optional[int] = None):
  """Channel pruning mask, shaped like ``params`` (see the module doc).

  Args:
    params: a library model's parameters (or any, with ``groups``).
    sparsity: fraction κ of the prunable channels to remove, in ``[0, 1)``.
    where: predicate ``(path, kernel) -> bool`` on the producers' kernels: which groups may be
      pruned (default: all of :func:`channel_groups`).
    groups: the :class:`ChannelGroup` list (default: :func:`channel_groups`).
    normalized: threshold the magnitudes divided by their layer's mean (the default: fair
      across layers of different fan-in); False thresholds the raw magnitudes, as network
      slimming (Liu et al. 2017) does with the BatchNorm scales. Either way every layer keeps
      its largest channel.
    distribution: ``'global'`` (default: one threshold over all prunable channels) or
      ``'uniform'`` (every layer loses ``floor(κ·n_l)`` of its ``n_l`` channels).
    multiple_of: None (default: the selection above, exactly) or a positive integer: every
      layer's kept count rounded up to a multiple of it (or to the whole layer), its largest
      removed channels coming back, so fewer than κ go. For speed: onnxruntime and XLA run a
      slimmed model whose widths are multiples of 8 much faster than one with odd widths
      (``benchmarks/results/slim_widths.json``: a VGG-11 with widths 7-15-31-31-63-… takes
      2.8× the time of 8-16-32-32-64-… in onnxruntime). Not in the method's reference code.

  Returns:
    A bool pytree like ``params``: False on the producer kernel slices, biases and BatchNorm
    scales/biases of the removed channels, True elsewhere.

  Example: an MLP whose hidden layer has channel norms 1, 2, 3. As for weights, the channels
  at or below the one of rank ``floor(κ n)`` (0-based, ascending) go: κ = 0.3 of 3 removes one.

    >>> import jax.numpy as jnp, hypersparse_jax as hs
    >>> params = {"fc1": {"kernel": jnp.array([[1., 0., 3.], [0., 2., 0.]]), "bias": jnp.zeros(3)},
    ...           "fc2": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> mask = hs.channel_mask(params, 0.3)
    >>> mask["fc1"]["kernel"].tolist()
    [[False, True, True], [False, True, True]]
    >>> mask["fc1"]["bias"].tolist(), bool(mask["fc2"]["kernel"].all())
    ([False, True, True], True)
  """
  groups, keeps = _checked_keep(params, sparsity, groups, where, normalized, distribution,
                                multiple_of)
  return _mask_from_keep(params, groups, keeps)


def channel_hypersparse(params, sparsity: float, *, groups=None, where=None,
                        scale_constant: float = penalties.REFERENCE_SCALE, penalty="hypersparse",
                        normalized: bool = True, distribution: str = "global"):
  """Group HyperSparse (or ``penalty='l1'``: ``Σ m̃``) over channels: ``(grads, value, t)``,
  the float32 gradient tree (zeros outside the groups' carriers), the loss form's value and the
  channel threshold ``t`` (see the module doc; for ``distribution='uniform'`` a vector, one
  threshold per group, 0 for a group that loses no channel). ``normalized=False`` uses the raw
  magnitudes ``m_c`` (``μ_l = 1``): with ``penalty='l1'`` and BatchNorm this is network
  slimming's ``Σ |γ_c|`` (gradient ``sign(γ_c)``), without it the group lasso ``Σ ‖θ_c‖``. The
  L1 form does not depend on ``distribution``."""
  sparsity = masking.check_sparsity(sparsity)
  check_distribution(distribution)
  groups = _select_groups(params, groups, where)
  raw = [jnp.sqrt(jnp.sum(jnp.square(_carriers(params, g)), axis=1)) for g in groups]
  mus = [jnp.maximum(jnp.mean(m), jnp.finfo(jnp.float32).tiny) if normalized
         else jnp.ones([], jnp.float32) for m in raw]
  mags = [m / mu for m, mu in zip(raw, mus)]
  if penalty == "l1":
    t = jnp.zeros([], jnp.float32)
    dm = [jnp.ones_like(m) for m in mags]
    value = sum(jnp.sum(m) for m in mags)
    if distribution == "uniform":
      t = jnp.zeros([len(mags)], jnp.float32)
  elif penalty == "hypersparse" and distribution == "uniform":
    from hypersparse_jax import budgets
    _, t = _keep([jax.lax.stop_gradient(m) for m in mags], sparsity, "uniform")
    dm, value = [], jnp.zeros([], jnp.float32)
    for m, t_l in zip(mags, t):
      if _uniform_drop(sparsity, int(m.shape[0])) == 0:  # the layer loses nothing: no term
        dm.append(jnp.zeros_like(m))
        continue
      s, factor, total_a, total_t = budgets._unit_terms(m, t_l, scale_constant)
      dm.append(factor * penalties._sech2(s * m))
      value = value + penalties._value_from_terms(
          penalties.HyperSparseTerms(t_l, s, total_a, total_t))
  elif penalty == "hypersparse":
    n = sum(int(m.shape[0]) for m in mags)
    t = threshold.kth_magnitude(mags, threshold.rank_of_threshold(sparsity, n))
    s = penalties.hypersparse_scale(t, scale_constant)
    total_a = sum(jnp.sum(m) for m in mags)
    total_t = sum(jnp.sum(jnp.tanh(s * m)) for m in mags)
    ratio = jnp.where(total_t > 0, total_a / jnp.where(total_t > 0, total_t, 1.0), 0.0)
    factor = jnp.minimum(s * ratio, jnp.finfo(jnp.float32).max)
    dm = [factor * penalties._sech2(s * m) for m in mags]
    value = penalties._value_from_terms(penalties.HyperSparseTerms(t, s, total_a, total_t))
  else:
    raise ValueError(f"channel penalties are 'hypersparse' and 'l1', got {penalty!r}")
  grads = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
  for g, d, m, mu in zip(groups, dm, raw, mus):
    unit = jnp.where(m > 0, d / (jnp.where(m > 0, m, 1.0) * mu), 0.0)  # ∂/∂θ = d·θ/(‖θ‖μ)
    if g.norm is not None:
      gamma = jnp.asarray(_get(params, g.norm)["scale"], jnp.float32)
      _get(grads, g.norm)["scale"] = unit * gamma
    else:
      k = jnp.asarray(_get(params, g.producer)["kernel"], jnp.float32)
      _get(grads, g.producer)["kernel"] = unit * k
  return grads, value, t


# ------------------------------------------------------------------------------------------------
# Physically smaller models
# ------------------------------------------------------------------------------------------------


def _kept_indices(pmask, groups):
  """Per group, the indices of the channels whose producer kernel slice ``pmask`` keeps."""
  out = []
  for g in groups:
    km = np.asarray(_get(pmask, g.producer)["kernel"])
    out.append(np.flatnonzero(km.reshape(-1, km.shape[-1]).any(axis=0)))
  return out


def slim(model, variables, mask, *, groups=None):
  """The physically smaller model of a channel-masked one: ``(smaller_model, smaller_variables)``.

  The removed channels (those whose producer kernel slice is all False in ``mask``) disappear:
  fewer filters / units in the producer, its bias and BatchNorm entries (scale, bias, running
  mean and variance) go, and the consumer loses the matching inputs (for a dense layer reading a
  flattened conv map, the rows of that channel at every position). The variables are first
  masked, so the smaller model's logits equal those of ``apply_mask(variables, mask)`` within
  float rounding. Works for the library's LeNet-300-100, LeNet-5, digits MLP/CNN, VGG and
  CIFAR ResNet.

  Args:
    model: the Flax model of ``variables``.
    variables: ``{'params': ..., 'batch_stats': ...}`` (or bare params).
    mask: a channel mask like :func:`channel_mask`'s, over the params (or a tree with
      ``'params'``).
  """
  from hypersparse_jax import models as lib
  bare = "params" not in variables
  variables = {"params": variables} if bare else dict(variables)
  pmask = mask["params"] if isinstance(mask, dict) and "params" in mask and not bare else mask
  params = masking.apply_mask(variables["params"], pmask)
  groups = channel_groups(params) if groups is None else list(groups)
  kept = _kept_indices(pmask, groups)
  new = jax.tree.map(np.asarray, {**variables, "params": params})
  for g, idx in zip(groups, kept):
    prod = _get(new["params"], g.producer)
    n_out = prod["kernel"].shape[-1]
    prod["kernel"] = prod["kernel"][..., idx]
    if "bias" in prod:
      prod["bias"] = prod["bias"][idx]
    if g.norm is not None:
      for coll in ("params", "batch_stats"):
        if coll in new:
          node = _get(new[coll], g.norm)
          for leaf in list(node):
            node[leaf] = node[leaf][idx]
    cons = _get(new["params"], g.consumer)
    k = cons["kernel"]
    if k.ndim == 4:  # conv consumer: input channels
      cons["kernel"] = k[:, :, idx, :]
    else:  # dense consumer: rows, NHWC-flattened (position, channel) when repeat > 1
      repeat = k.shape[0] // n_out
      cons["kernel"] = k.reshape(repeat, n_out, k.shape[1])[:, idx, :].reshape(-1, k.shape[1])
  widths = {g.producer: len(idx) for g, idx in zip(groups, kept)}
  if isinstance(model, lib.LeNet300):
    smaller = dataclasses.replace(model, hidden=(widths[("fc1",)], widths[("fc2",)]))
  elif isinstance(model, lib.DigitsMLP):
    smaller = dataclasses.replace(model, hidden=tuple(
        widths[(f"fc{i}",)] for i in range(1, len(model.hidden) + 1)))
  elif isinstance(model, lib.LeNet5):
    smaller = dataclasses.replace(model, widths=(widths[("conv1",)], widths[("conv2",)],
                                                 widths[("fc1",)]))
  elif isinstance(model, lib.DigitsCNN):
    smaller = dataclasses.replace(model, widths=(widths[("conv1",)], widths[("conv2",)]))
  elif isinstance(model, lib.VGG):
    smaller = dataclasses.replace(model, widths=tuple(widths[g.producer] for g in groups))
  elif isinstance(model, lib.CIFARResNet):
    blocks = sorted({g.producer[0] for g in groups}, key=_natural)
    inner = []
    for b in blocks:
      convs = ["conv1", "conv2"] if (b, "conv2") in widths else ["conv1"]
      inner.append(tuple(widths[(b, c)] for c in convs))
    smaller = dataclasses.replace(model, inner=tuple(inner))
  else:
    raise ValueError(f"slim does not know how to rebuild a {type(model).__name__}; the "
                     "library's LeNet-300-100, LeNet-5, MLP, CNN, VGG and CIFAR ResNet it does")
  new = jax.tree.map(jnp.asarray, new)
  return smaller, (new["params"] if bare else new)


def slim_summary(model, variables, input_shape: Sequence[int]) -> dict:
  """What channel pruning bought, for ``variables`` whose removed channels are exactly zero
  (as :func:`channel_mask` and the masked fine-tuning leave them): channels kept per group,
  removed and in all, the parameters and XLA FLOPs (one input of ``input_shape``, batch
  included) of the dense and of the :func:`slim` model, and the slim model's architecture
  (``slim_model``, :func:`describe_model`)."""
  mask = jax.tree.map(lambda x: np.asarray(x) != 0, variables["params"])
  groups = channel_groups(variables["params"])
  small_model, small = slim(model, variables, mask, groups=groups)
  width = lambda params, g: int(_get(params, g.producer)["kernel"].shape[-1])  # noqa: E731
  kept = {g.name: width(small["params"], g) for g in groups}  # what slim() kept
  total = sum(width(variables["params"], g) for g in groups)
  count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))  # noqa: E731
  removed = total - sum(kept.values())
  return {"channels_removed": removed, "channels_total": total,
          "channel_sparsity_achieved": removed / total, "channels_kept": kept,
          "params_dense": count(variables["params"]), "params_slim": count(small["params"]),
          "flops_dense": count_flops(model, variables, input_shape),
          "flops_slim": count_flops(small_model, small, input_shape),
          "slim_model": describe_model(small_model)}


# the attributes that give a library model its architecture (describe_model)
_ARCH_KEYS = ("depth", "num_classes", "batch_norm", "hidden", "widths", "inner", "stage_widths")
_DESCRIBABLE = ("LeNet300", "LeNet5", "DigitsMLP", "DigitsCNN", "VGG", "CIFARResNet")


def describe_model(model) -> dict:
  """JSON-ready ``{'class': ..., <width attributes>}`` of a library model (a slimmed one
  included): :func:`model_from_description` rebuilds the same architecture. The speed of a
  slimmed model depends on this alone, not on its weights."""
  out = {"class": type(model).__name__}
  for k in _ARCH_KEYS:
    if hasattr(model, k):
      v = getattr(model, k)
      out[k] = [list(x) if isinstance(x, (tuple, list)) else x for x in v] if isinstance(
          v, (tuple, list)) else v
  return out


def model_from_description(desc: dict):
  """The model of :func:`describe_model`'s ``desc`` (unbound; initialise or load its
  variables). Raises ValueError for a class that is not one of the library's image models."""
  from hypersparse_jax import models as lib
  desc = dict(desc)
  name = desc.pop("class", None)
  if name not in _DESCRIBABLE:
    raise ValueError(f"model class {name!r} is not one of {', '.join(_DESCRIBABLE)}")
  for k in ("hidden", "widths", "stage_widths"):
    if desc.get(k) is not None:
      desc[k] = tuple(desc[k])
  if desc.get("inner") is not None:
    desc["inner"] = tuple(tuple(x) for x in desc["inner"])
  return getattr(lib, name)(**desc)


def count_flops(model, variables, input_shape: Sequence[int]) -> float:
  """Floating-point operations of one forward pass in eval mode, as XLA counts them."""
  x = jnp.zeros(tuple(input_shape), jnp.float32)
  from hypersparse_jax import conv
  with conv.plain_convolutions():
    fn = jax.jit(functools.partial(model.apply, train=False))
    cost = fn.lower(variables, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])
