"""Exact selection of the k-th smallest magnitude: the global threshold's algorithm.

:func:`kth_magnitude` returns ``sort(|w|)[k]`` of the weights of several arrays taken together,
computed in float32 and bit-identical to a sort, without sorting all weights.
:mod:`hypersparse_jax.masking` (which selects and validates the prunable leaves) calls it with
``k = floor(κ·n)`` for :func:`hypersparse_jax.magnitude_threshold`, the masks and the
HyperSparse gradient; ``art()`` passes a hint (its extrapolation of the previous step's threshold).

It is a selection on the bit patterns of ``|w|`` (non-negative float32 values order like their
int32 bit patterns). A sorted sample (int32 keys sort an order of magnitude faster than floats
on XLA:CPU), or a fan of split points around a hint, brackets the answer; a few fused passes
count, per pass, how many weights lie below several split points and narrow the bracket; once
it holds few weights they are gathered (only the rows of ``_ROW`` weights that can hold one,
found from the per-row counts of the one or two passes that got there; a later pass, rare,
needs a pass of its own for them) and sorted. Any failed guess only costs another pass: the
loop always ends on the exact value. Large float32 leaves are read in place (each pass forms
the magnitudes' bit patterns as it reads), small ones are concatenated once.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def rank_of_threshold(sparsity: float, n: int) -> int:
  """``floor(sparsity * n)`` (0-based rank of ``t``) in float64, as the reference computes it.

  (So ``0.98 * 100`` gives 98, as a user expects, not 97 from the exact binary value of 0.98.)
  """
  return min(int(math.floor(sparsity * n)), n - 1)


# ----------------------------------------------------------------------------------------------
# Exact counting that does not overflow
# ----------------------------------------------------------------------------------------------
# Counts of a tree of billions of weights do not fit int32, and int64 needs jax x64. A count is
# kept as two int32 words, value = high * 2**16 + low with 0 <= low < 2**16: each leaf's count
# (< 2**31) is split before the leaves are summed, so sums stay far from overflow.

_WORD = 1 << 16


class Count(NamedTuple):
  """A non-negative integer ``high * 2**16 + low`` held as two int32 arrays (any shape)."""
  high: jax.Array
  low: jax.Array

  @staticmethod
  def of(value: int) -> "Count":
    return Count(jnp.int32(value // _WORD), jnp.int32(value % _WORD))

  @staticmethod
  def sum(parts: Sequence[jax.Array]) -> "Count":
    """Sum of int32 partial counts (each ``< 2**31``), exactly."""
    high = sum(p // _WORD for p in parts)
    low = sum(p % _WORD for p in parts)
    return Count(high + low // _WORD, low % _WORD)

  def le(self, value: int) -> jax.Array:
    """``self <= value`` for a Python int ``value``."""
    vh, vl = value // _WORD, value % _WORD
    return (self.high < vh) | ((self.high == vh) & (self.low <= vl))

  def gt(self, value: int) -> jax.Array:
    return ~self.le(value)

  def minus_int(self, value: int) -> jax.Array:
    """``self - value`` as int32; valid where the difference fits int32."""
    return (self.high - value // _WORD) * _WORD + (self.low - value % _WORD)

  def minus(self, other: "Count") -> jax.Array:
    """``self - other`` as int32; valid where the difference fits int32."""
    return (self.high - other.high) * _WORD + (self.low - other.low)


# ----------------------------------------------------------------------------------------------
# Exact k-th smallest magnitude
# ----------------------------------------------------------------------------------------------

_ROW = 32           # weights per row in the counting passes (int8 row sums cannot overflow)
_SPLITS = 8         # split points per counting pass
_SAMPLE = 16384     # sorted sample size used to bracket the answer (int32 sort: ~1 ms) ...
_SAMPLE_LARGE = 65536  # ... and from _LARGE weights on, where its ~3 ms buys a narrower bracket
_LARGE = 1 << 23
_DIRECT = 32768     # at most this many weights: sort them all (cheap as int32 keys)
_MAX_BITS = 0x7F800000  # bit pattern of +inf: upper end of any finite magnitude


def magnitude_bits(leaf) -> jax.Array:
  """int32 bit patterns of ``|leaf|`` in float32 (monotone in the magnitude), flattened."""
  return lax.bitcast_convert_type(jnp.abs(jnp.asarray(leaf).astype(jnp.float32)),
                                  jnp.int32).reshape(-1)


_SIGN_OFF = 0x7FFFFFFF  # clears a float32 pattern's sign bit: the pattern of its magnitude


def _abs_bits(chunk: jax.Array) -> jax.Array:
  """Magnitude patterns (int32) of a chunk's entries: ``chunk`` holds either such patterns
  (:func:`magnitude_bits`; then this is a no-op, padding and fill values included) or float32
  values. Every read of a chunk goes through it, so that a large float32 leaf is counted where
  it lies: XLA:CPU copies even a plain bitcast of a leaf that a loop or branch carries, and the
  sign bit is cleared in the pass that reads it instead of in a copy."""
  if chunk.dtype == jnp.float32:
    chunk = lax.bitcast_convert_type(chunk, jnp.int32)
  return chunk & _SIGN_OFF


def _count_below(bits_leaves, splits: jax.Array):
  """Number of weights whose bit pattern is ``< s`` for each split ``s`` (shape (K,)).

  Returns ``(Count, [row_counts])``: also each chunk's per-row counts ``(len // _ROW, K)`` int8
  (rows of whole ``_ROW``-blocks; a chunk's tail is not in them; None for a chunk shorter than a
  row). Callers that ignore them cost nothing extra: they are the pass's intermediate anyway.
  """
  parts, row_parts = [], []
  for bits in bits_leaves:
    size = bits.shape[0]
    body = size - size % _ROW
    per_split = jnp.zeros(splits.shape, jnp.int32)
    row_counts = None
    if body:
      rows = _abs_bits(bits[:body].reshape(-1, _ROW))
      # int8 sums over short rows vectorise far better on XLA:CPU than one long bool sum.
      row_counts = jnp.sum((rows[:, None, :] < splits[None, :, None]).astype(jnp.int8),
                           axis=2, dtype=jnp.int8)
      per_split = per_split + jnp.sum(row_counts.astype(jnp.int32), axis=0)
    if body < size:
      tail = _abs_bits(bits[body:])
      per_split = per_split + jnp.sum((tail[:, None] < splits[None, :]).astype(jnp.int32), axis=0)
    parts.append(per_split)
    row_parts.append(row_counts)
  return Count.sum(parts), row_parts


def _strided_sample(bits_leaves, n: int, m: int) -> jax.Array:
  """About ``m`` bit patterns taken evenly across all leaves (proportional to leaf size)."""
  samples = []
  for bits in bits_leaves:
    size = bits.shape[0]
    take = max(1, round(m * size / n))
    stride = max(1, size // take)
    samples.append(_abs_bits(bits[(stride // 2)::stride][:take]))
  return jnp.concatenate(samples)


class _Bracket(NamedTuple):
  lo: jax.Array         # int32 bit pattern; the answer is >= lo
  hi: jax.Array         # int32 bit pattern; the answer is <= hi
  below_lo: Count       # number of weights with bits < lo
  upto_hi: Count        # number of weights with bits <= hi


def _narrow(bits_leaves, k: int, br: _Bracket, splits: jax.Array) -> _Bracket:
  """One counting pass at sorted ``splits`` inside ``[lo, hi]``; keeps the piece holding rank k."""
  return _narrow_by_counts(k, br, splits, _count_below(bits_leaves, splits)[0])


def _narrow_by_counts(k: int, br: _Bracket, splits: jax.Array, counts: Count) -> _Bracket:
  # counts[j] = #(bits < splits[j]). The answer b satisfies #(bits < b) <= k < #(bits <= b):
  # b >= s_j iff #(bits < s_j) <= k.
  at_or_above = counts.le(k) & (splits > br.lo) & (splits <= br.hi)
  j_lo = jnp.sum(at_or_above.astype(jnp.int32)) - 1  # last split with count <= k (splits sorted)
  has_lo = j_lo >= 0
  new_lo = jnp.where(has_lo, splits[jnp.maximum(j_lo, 0)], br.lo)
  new_below = Count(jnp.where(has_lo, counts.high[jnp.maximum(j_lo, 0)], br.below_lo.high),
                    jnp.where(has_lo, counts.low[jnp.maximum(j_lo, 0)], br.below_lo.low))
  above = counts.gt(k) & (splits > br.lo) & (splits <= br.hi)
  j_hi = jnp.argmax(above)  # first split with count > k: the answer is < that split
  has_hi = jnp.any(above)
  new_hi = jnp.where(has_hi, splits[j_hi] - 1, br.hi)
  new_upto = Count(jnp.where(has_hi, counts.high[j_hi], br.upto_hi.high),
                   jnp.where(has_hi, counts.low[j_hi], br.upto_hi.low))
  return _Bracket(new_lo, new_hi, new_below, new_upto)


def _uniform_splits(br: _Bracket) -> jax.Array:
  width = (br.hi - br.lo).astype(jnp.float32)
  frac = jnp.arange(1, _SPLITS + 1, dtype=jnp.float32) / (_SPLITS + 1)
  offs = jnp.floor(width * frac).astype(jnp.int32)
  return jnp.maximum(br.lo + offs, br.lo + 1)


# "Rows" below: every chunk cut into rows of _ROW patterns, the last one short where the chunk
# has a tail, all chunks' rows numbered in order; a row is read past a chunk's end as a pattern
# above +inf (never a candidate).


def _inside(x, br: _Bracket):
  return (x >= br.lo) & (x <= br.hi)


def _row_flags_by_pass(bits_leaves, br: _Bracket) -> jax.Array:
  """Rows holding a pattern in ``[lo, hi]``: one pass over the weights."""
  flags = []
  for bits in bits_leaves:
    size = bits.shape[0]
    body = size - size % _ROW
    if body:
      rows = _abs_bits(bits[:body].reshape(-1, _ROW))
      flags.append(jnp.sum(_inside(rows, br).astype(jnp.int8), axis=1, dtype=jnp.int8) > 0)
    if body < size:
      flags.append(jnp.any(_inside(_abs_bits(bits[body:]), br))[None])
  return jnp.concatenate(flags)


def _row_flags_from_counts(bits_leaves, br: _Bracket, passes) -> jax.Array:
  """The same flags from counting passes' per-row counts, without a pass of their own.

  ``passes``: ``[(splits, row_counts)]`` of the passes that narrowed the bracket, as returned
  by :func:`_count_below`. Valid when ``lo`` is 0 or a split of one of them and ``hi + 1`` is a
  split of one of them or ``hi`` is ``_MAX_BITS``, as after those passes' :func:`_narrow`. A
  chunk's tail row is always flagged (at most one extra row per chunk; the gather checks every
  value).
  """
  def at_split(value, default, chunk):
    # Each row's count below `value` from the pass that has `value` as a split, else `default`.
    out = jnp.int8(default)
    for splits, row_counts in passes:
      j = jnp.argmax(splits == value)
      out = jnp.where(jnp.any(splits == value), row_counts[chunk][:, j], out)
    return out

  flags = []
  for chunk, bits in enumerate(bits_leaves):
    if passes[0][1][chunk] is not None:
      flags.append(at_split(br.hi + 1, _ROW, chunk) > at_split(br.lo, 0, chunk))
    if bits.shape[0] % _ROW:
      flags.append(jnp.ones((1,), bool))
  return jnp.concatenate(flags)


def _true_indices(flags: jax.Array, size: int) -> jax.Array:
  """``jnp.nonzero(flags, size=size, fill_value=len(flags))[0]`` in two levels.

  XLA:CPU's prefix sum (inside ``nonzero``) is slow on long arrays (7 ms for 625k flags); here
  it runs over blocks of ``_ROW`` flags, then over the (at most ``size``) blocks holding one.
  """
  n = flags.shape[0]
  num_blocks = -(-n // _ROW)
  if num_blocks <= size:
    return jnp.nonzero(flags, size=size, fill_value=n)[0]
  blocks = jnp.pad(flags, (0, num_blocks * _ROW - n)).reshape(num_blocks, _ROW)
  picked = jnp.nonzero(jnp.any(blocks, axis=1), size=size, fill_value=num_blocks)[0]
  sub = blocks.at[picked].get(mode="fill", fill_value=False).reshape(-1)
  pos = jnp.nonzero(sub, size=size, fill_value=sub.shape[0])[0]
  block = picked.at[pos // _ROW].get(mode="fill", fill_value=num_blocks)
  return jnp.where(pos < sub.shape[0], block * _ROW + pos % _ROW, n)


def _gather_candidates(bits_leaves, br: _Bracket, row_flags: jax.Array,
                       capacity: int) -> jax.Array:
  """The bit patterns in ``[lo, hi]``, sorted, padded with 2³¹−1 to ``capacity`` entries.

  ``row_flags`` marks the rows (see above) that may hold one (at most ``capacity`` rows); only
  those rows are gathered and searched.
  """
  row_idx = _true_indices(row_flags, capacity)
  picked = jnp.full((capacity, _ROW), _MAX_BITS + 1, jnp.int32)
  offset = 0
  for bits in bits_leaves:
    num_rows = -(-bits.shape[0] // _ROW)
    local = row_idx - offset
    valid = (local >= 0) & (local < num_rows)
    if bits.shape[0] % _ROW == 0:
      # Whole rows (a free reshape of the chunk): a gather of row slices, several times
      # faster on XLA:CPU than one of single elements; rows of other chunks are dropped below.
      got = _abs_bits(bits.reshape(-1, _ROW)[jnp.clip(local, 0, num_rows - 1)])
    else:
      # Elements of the flagged rows, read in place (no padded copy of the chunk).
      elements = local[:, None] * _ROW + jnp.arange(_ROW, dtype=local.dtype)[None, :]
      fill = np.float32(np.nan) if bits.dtype == jnp.float32 else _MAX_BITS + 1  # above +inf
      got = _abs_bits(bits.at[elements].get(mode="fill", fill_value=fill))
    picked = jnp.where(valid[:, None], got, picked)
    offset += num_rows
  flat = picked.reshape(-1)
  pos = jnp.nonzero(_inside(flat, br), size=capacity, fill_value=flat.shape[0])[0]
  return jnp.sort(flat.at[pos].get(mode="fill", fill_value=2**31 - 1))


def _sample_splits(bits_leaves, n: int, k: int) -> jax.Array:
  """Sorted split points at quantiles of a sorted sample around the expected rank of ``k``."""
  sample = jnp.sort(_strided_sample(bits_leaves, n, _SAMPLE_LARGE if n >= _LARGE else _SAMPLE))
  m = sample.shape[0]
  p = k / n
  sd = math.sqrt(max(p * (1 - p), 1.0 / m) / m) * m
  offsets = np.array([-6, -3, -1.5, -0.5, 0.5, 1.5, 3, 6]) * max(sd, 1.0)
  pos = np.clip(np.round(p * m + offsets).astype(np.int64), 0, m - 1)
  splits = sample[pos] + jnp.array([0] * (len(pos) // 2) + [1] * (len(pos) - len(pos) // 2),
                                   jnp.int32)
  return jnp.clip(jnp.sort(splits), 1, _MAX_BITS)


# Relative offsets of the first pass's split points around a hint: the central pieces are
# narrow enough (3e-4 and 4.5e-4 of t) that, for a VGG-sized tree of Gaussian-like weights, the
# piece holding the answer is small enough to gather at once when the hint is within 6e-4.
_FAN = (-1e-2, -2e-3, -6e-4, -1.5e-4, 1.5e-4, 6e-4, 2e-3, 1e-2)


def _fan_splits(hint: jax.Array) -> jax.Array:
  """Sorted split points in a geometric fan around ``hint`` (int32 bit pattern)."""
  hint_value = lax.bitcast_convert_type(jnp.asarray(hint, jnp.int32), jnp.float32)
  fan = lax.bitcast_convert_type(
      jnp.maximum(hint_value * (1 + jnp.array(_FAN, jnp.float32)), 0.0), jnp.int32)
  splits = fan.at[len(_FAN) // 2:].add(1)
  return jnp.clip(jnp.sort(splits), 1, _MAX_BITS)


def _kth_bits(bits_leaves, n: int, k: int, hint: Optional[jax.Array] = None) -> jax.Array:
  """Exact int32 bit pattern of the k-th smallest (0-based) magnitude.

  ``bits_leaves``: flat chunks, each either int32 magnitude patterns (:func:`magnitude_bits`)
  or float32 values (a large float32 leaf, flattened): read through :func:`_abs_bits`.
  """
  if n <= _DIRECT:
    return jnp.sort(jnp.concatenate([_abs_bits(b) for b in bits_leaves]))[k]
  full = _Bracket(jnp.int32(0), jnp.int32(_MAX_BITS), Count.of(0), Count.of(n))
  # Split points for the first pass: sample quantiles around the expected rank, or a
  # geometric fan around a hint (ART's extrapolation of the previous step's threshold).
  if hint is None:
    splits = _sample_splits(bits_leaves, n, k)
  else:
    splits = _fan_splits(hint)
  counts, row_counts = _count_below(bits_leaves, splits)
  first = _narrow_by_counts(k, full, splits, counts)

  # Candidates left for the final gather and sort (rows holding them are gathered whole).
  capacity = int(min(4096, max(64, (n / _ROW) ** (2 / 3) / 2)))
  rows_capacity = capacity + len(bits_leaves)  # + the always-flagged tail rows

  def pending(br):
    return (br.lo < br.hi) & (br.upto_hi.minus(br.below_lo) > capacity)

  # The rows that may hold the answer come from the per-row counts of the pass that narrowed
  # the bracket last, so the gather needs no pass of its own. That is the first pass when it
  # got there alone (the usual case with ART's hint), else a second one at uniform splits
  # inside its bracket (a sample's bracket holds a few times `capacity` weights, and a second
  # pass cuts it ninefold).
  def second_pass(_):
    splits2 = _uniform_splits(first)
    if hint is not None:
      # The answer lies outside the fan (the hint was more than 1 % off): quantiles of a
      # sample instead, as without a hint (only those inside the bracket count).
      outside = (first.lo == 0) | (first.hi == _MAX_BITS)
      splits2 = lax.cond(outside, lambda: _sample_splits(bits_leaves, n, k), lambda: splits2)
    counts2, row_counts2 = _count_below(bits_leaves, splits2)
    br2 = _narrow_by_counts(k, first, splits2, counts2)
    # Its ends are splits of either pass (or 0 / +inf): both passes' row counts serve.
    return br2, _row_flags_from_counts(bits_leaves, br2, [(splits, row_counts),
                                                          (splits2, row_counts2)])

  def first_only(_):
    return first, _row_flags_from_counts(bits_leaves, first, [(splits, row_counts)])

  counted, counted_flags = lax.cond(pending(first), second_pass, first_only, None)
  # Rarely more is needed (a bracket far off, crowded ties): more passes, then one flag pass.
  # The loop sits in a branch: XLA hoists the loop-invariant reads of the chunks (the sign
  # bit cleared) out of the loop body, which would copy every float32 chunk on every call.
  br = lax.cond(pending(counted),
                lambda: lax.while_loop(
                    pending, lambda br: _narrow(bits_leaves, k, br, _uniform_splits(br)),
                    counted),
                lambda: counted)

  def gathered(br):
    # The loop left at most `capacity` weights in [lo, hi], and rank k is among them.
    from_counts = (br.lo == counted.lo) & (br.hi == counted.hi)
    flags = lax.cond(from_counts, lambda: counted_flags,
                     lambda: _row_flags_by_pass(bits_leaves, br))
    index = jnp.clip(Count.of(k).minus(br.below_lo), 0, rows_capacity - 1)
    return _gather_candidates(bits_leaves, br, flags, rows_capacity)[index]

  return lax.cond(br.lo == br.hi, lambda: br.lo, lambda: gathered(br))


_CHUNK = 1 << 30     # elements per counting chunk: int32 counts of one chunk cannot overflow
_SEPARATE = 1 << 20  # leaves at least this large are counted in place, not copied


def _flat_chunks(leaves):
  """All weights as a few flat float32 arrays ("chunks"), read by the passes through
  :func:`_abs_bits`.

  Small leaves are concatenated into one array (converted to float32): that keeps the
  selection's program small (short compile times) whatever the number of leaves, at the price
  of one copy of those leaves (which :mod:`hypersparse_jax.penalties` reuses for its sums).
  Large float32 leaves are read in place, where the copy would cost more than the extra code
  (they are flattened, a free reshape; their magnitudes' patterns are formed inside each pass).
  A chunk's length need not be a multiple of ``_ROW`` (its tail is counted apart). No chunk
  exceeds ``_CHUNK`` elements.
  """
  small, chunks = [], []
  for _, x in leaves:
    x = jnp.asarray(x).astype(jnp.float32).reshape(-1)
    (chunks if x.shape[0] >= _SEPARATE else small).append(x)
  if small:
    chunks.insert(0, jnp.concatenate(small) if len(small) > 1 else small[0])
  return [c[i:i + _CHUNK] for c in chunks for i in range(0, c.shape[0], _CHUNK)]


# ----------------------------------------------------------------------------------------------
# Alternatives without data-dependent control flow (``method="radix"`` and ``"sort"``)
# ----------------------------------------------------------------------------------------------
# On XLA:GPU every `while_loop` iteration and `cond` reads its predicate back to the host.
# "radix" finds the answer digit by digit instead: a fixed number of counting passes, each
# fixing the next RADIX_BITS bits of the bit pattern with 2**RADIX_BITS − 1 split points.
# Measured on an H200 (benchmarks/README.md, 2026-11-26) it does not pay there: XLA's counting
# pass is compute-bound (~0.1–0.17 ms per pass over 20 M weights), so 8 passes cost more than
# the round trips they avoid (ART step on VGG-19-BN 1.51× the plain step against 1.28× with
# the bracketing search); "sort" (one int32 sort, CUB on GPU) is sync-free and about as fast as
# "bracket" there (ResNet-32 step 1.114× against 1.130×). Neither is the default: both are
# kept, tested, for programs that must not hold loops (export, some transformations).

RADIX_BITS = 4  # bits fixed per pass: 8 passes of 15 split points cover the 31 bits


def _kth_bits_radix(bits_leaves, k: int, bits_per_pass: int = RADIX_BITS) -> jax.Array:
  """Exact int32 bit pattern of the k-th smallest (0-based) magnitude, in fixed passes.

  Invariant: ``#(bits < lo) <= k`` and the answer lies in ``[lo, lo + 2**shift)``; a pass
  splits that range into ``2**b`` equal buckets and moves ``lo`` to the start of the bucket
  holding rank ``k`` (the number of splits ``s`` with ``#(bits < s) <= k``). After the last
  pass the range holds one pattern: the answer. No split exceeds ``lo + 2**shift − 1 < 2**31``.
  """
  if not 1 <= bits_per_pass <= 8:
    raise ValueError(f"bits_per_pass must lie in [1, 8], got {bits_per_pass}")
  lo = jnp.int32(0)
  shift = 31
  while shift > 0:
    new_shift = max(0, shift - bits_per_pass)
    width = 1 << new_shift
    splits = lo + jnp.arange(1, 1 << (shift - new_shift), dtype=jnp.int32) * width
    counts, _ = _count_below(bits_leaves, splits)
    lo = lo + jnp.sum(counts.le(k).astype(jnp.int32)) * width
    shift = new_shift
  return lo


METHODS = ("bracket", "radix", "sort")


def _select_bits(chunks, n: int, k: int, hint, method: str) -> jax.Array:
  if method == "sort" and n > _DIRECT:  # int32 keys of the magnitudes
    return jnp.sort(jnp.concatenate([_abs_bits(c) for c in chunks]))[k]
  if method == "radix" and n > _DIRECT:
    return _kth_bits_radix(chunks, k)
  return _kth_bits(chunks, n, k, hint)  # (all methods sort directly up to _DIRECT weights)


@functools.partial(jax.jit, static_argnames=("n", "k", "method"))
def _kth_magnitude(arrays, hint, *, n: int, k: int, method: str = "bracket") -> jax.Array:
  # jit-compiled on its own so that eager calls hit the compilation cache (its loops would
  # otherwise be traced and compiled anew on every call); inside a caller's jit it is inlined.
  bits = _select_bits(_flat_chunks([(None, x) for x in arrays]), n, k, hint, method)
  return lax.bitcast_convert_type(bits, jnp.float32)


def kth_magnitude(arrays: Sequence[jax.Array], k: int, *,
                  hint: Optional[jax.Array] = None, method: str = "bracket") -> jax.Array:
  """The k-th smallest (0-based) of ``|w|`` over all entries of ``arrays``, as float32.

  Bit-identical to ``jnp.sort(jnp.concatenate([jnp.abs(a.astype(float32)).ravel() for a in
  arrays]))[k]`` for float32, bfloat16 and float16 arrays; works under ``jax.jit``.

  Args:
    arrays: non-empty sequence of floating-point arrays with finite values (not checked here:
      :func:`hypersparse_jax.masking.prunable_leaves` validates them).
    k: Python int in ``[0, n)``, ``n`` the total number of entries.
    hint: optional int32 scalar, the bit pattern of a float32 magnitude close to the answer
      (ART passes its extrapolation of the previous step's threshold); only the speed depends
      on it (the ``"bracket"`` search uses it; ``"radix"`` does not).
    method: ``"bracket"`` (default; what :func:`hypersparse_jax.magnitude_threshold`, the masks
      and ``art()`` use): a sample or the hint brackets the answer, counting passes narrow it
      in a ``while_loop``, the last few candidates are sorted. ``"radix"``: 8 fixed counting
      passes of 15 split points; ``"sort"``: one sort of all magnitudes (int32 keys) — both
      without data-dependent control flow, slower on CPU and not faster on GPU (see above).
      All give the same bits.

  Raises:
    ValueError: if ``k`` is outside ``[0, n)`` or ``method`` is unknown.

  Example:
    >>> import jax.numpy as jnp
    >>> from hypersparse_jax import threshold
    >>> arrays = [jnp.array([0.1, -0.4]), jnp.array([[0.2], [0.8]])]  # |w| sorted: .1 .2 .4 .8
    >>> float(threshold.kth_magnitude(arrays, 2))
    0.4000000059604645
  """
  n = sum(int(np.prod(jnp.shape(x), dtype=np.int64)) for x in arrays)
  if not 0 <= k < n:
    raise ValueError(f"k must lie in [0, {n}) (the number of weights), got {k}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return _kth_magnitude(list(arrays), hint, n=n, k=k, method=method)
