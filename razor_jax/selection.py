"""Exact top-K selection: which K elements of each row of an activation Back Razor keeps.

The search runs on the bit pattern of |x|: for non-negative IEEE floats the unsigned
bit pattern orders like the value, so the K-th largest magnitude is the largest
pattern t with at least K elements >= t. A strided sample of each group brackets t
(lo <= t < hi) with high probability; one pass counts the elements >= hi and marks
those in [lo, hi), which are gathered into a small buffer (about 2% of the group)
where the exact search runs bit by bit. When the bracket misses, the same bit-by-bit
search runs over the whole group instead (one fused compare-and-count pass per bit).
Ties at the threshold keep the lowest flat positions, so exactly K elements are kept
in every group. `topk_words` returns the kept set as a bitmask (`codecs.bitmask`).

Why the code looks the way it does (XLA:CPU, measured with experiments/): a
reduction over more than 32 elements is rewritten into reduce-windows over a
materialized input, so counts are nested short reductions.

Token rows (`topk_rows`, the default on accelerators) order elements by their
bfloat16 magnitude, the precision of the stored values, and break ties by position
(the lower one is kept), so every key is distinct and exactly K are kept. On GPU one
sort of 32-bit keys (magnitude above reversed position) per row does it in one
kernel with no data-dependent loop or conditional; XLA:CPU sorts a row at a time, so
there the same set comes from a 15-pass bit search like the one above.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import barriers, codecs

# Groups at least this long search for the threshold from a sampled bracket.
_BRACKET_MIN = 1 << 14
# A prime stride (in runs of 16 elements): the sample visits every channel of any
# width that 31 * 16 does not divide.
_SAMPLE_STRIDE = 31
# Half-width of the bracket in binomial standard deviations of the sample's count.
_BRACKET_Z = 4.0
# Leading bits of the bracket's ends searched in the sample (sign, exponent and 11
# mantissa bits of a float32): rounding them outwards costs a few % more candidates,
# a third of the passes.
_BRACKET_BITS = 20


def _magnitude_bits(x: jax.Array) -> jax.Array:
  """Unsigned integers that order like |x| (NaN above inf); the top bit is clear."""
  utype = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
  return lax.bitcast_convert_type(jnp.abs(x), utype)


def _count_at_least(u: jax.Array, t: jax.Array) -> jax.Array:
  """Per row of `u` (groups, L), the number of elements >= t (groups,), as int32.

  Nested sums over 16 elements (uint8, then uint16) fuse with the compare; one sum
  over the row is rewritten by XLA:CPU into reduce-windows over a materialized
  int32 copy of the compare, about 10x slower.
  """
  groups, length = u.shape
  main = length - length % 256
  total = jnp.zeros((groups,), jnp.int32)
  if main:
    hit = u[:, :main].reshape(groups, -1, 16, 16) >= t[:, None, None, None]
    per16 = jnp.sum(hit.astype(jnp.uint8), axis=3, dtype=jnp.uint8)
    per256 = jnp.sum(per16.astype(jnp.uint16), axis=2, dtype=jnp.uint16)
    total = jnp.sum(per256, axis=1, dtype=jnp.int32)
  tail = length - main
  if tail >= 16:  # short rows (token groups, candidates): sums over 16, then the rest
    hit = u[:, main:main + tail - tail % 16].reshape(groups, -1, 16) >= t[:, None, None]
    per16 = jnp.sum(hit.astype(jnp.uint8), axis=2, dtype=jnp.uint8)
    total = total + jnp.sum(per16.astype(jnp.int32), axis=1, dtype=jnp.int32)
    main += tail - tail % 16
  if main < length:
    total = total + jnp.sum(u[:, main:] >= t[:, None], axis=1, dtype=jnp.int32)
  return total


def _kth_largest(values_fn, operands, k, nbits: Optional[int] = None,
                 low_bits: int = 0) -> jax.Array:
  """Per row of the unsigned (groups, L) `values_fn(*operands)`, the k-th largest value.

  Found bit by bit from the top: a candidate bit stays set if at least k elements
  are >= the candidate, one compare-and-count pass per bit. The values are built
  inside the loop, fused into each pass: a loop's operands are materialized, and the
  bit patterns of a whole activation would be the largest transient of all. `k` is
  an int or an int32 (groups,) array; `nbits` bounds the values (default: all bits
  but the sign bit). With `low_bits` the search stops early and returns the k-th
  largest rounded down to a multiple of 2**low_bits.
  """
  out = jax.eval_shape(values_fn, *operands)
  dtype = out.dtype
  if nbits is None:
    nbits = dtype.itemsize * 8 - 1

  def step(i, t):
    cand = t | (jnp.asarray(1, dtype) << (nbits - 1 - i).astype(dtype))
    # Tied to the loop state, or XLA hoists the values out of the loop and stores them.
    values = values_fn(*barriers.depend(operands, t))
    return jnp.where(_count_at_least(values, cand) >= k, cand, t)

  return lax.fori_loop(0, nbits - low_bits, step, jnp.zeros(out.shape[:1], dtype))


def _kth_largest_between(u: jax.Array, k, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """`_kth_largest` when it is known to lie in [lo, hi) (per row, lo < hi).

  Bisects the integer range: about log2(hi - lo) passes (as many as the widest row
  needs), fewer than searching every bit below those lo and hi - 1 share when the
  range straddles a power of two.
  """
  one = jnp.asarray(1, u.dtype)

  def body(state):
    low, high = state  # count(u >= low) >= k > count(u >= high)
    mid = low + (high - low) // 2
    take = (high - low > one) & (_count_at_least(u, mid) >= k)
    return jnp.where(take, mid, low), jnp.where((high - low > one) & ~take, mid, high)

  low, _ = lax.while_loop(lambda state: jnp.any(state[1] - state[0] > one), body, (lo, hi))
  return low


def _tie_cut(flipped_fn, operands, excess: jax.Array, need: jax.Array,
             group_size: int) -> jax.Array:
  """The largest position kept among elements tied at the threshold.

  Ties keep the lowest positions: the cut is the need-th smallest tied position
  (`need` (groups,) of them are kept), found bit by bit as the need-th largest of
  `flipped_fn(*operands)`: group_size - position for tied elements, 0 elsewhere.
  Exact ties beyond `need` are rare except for exact zeros, so the search runs only
  when `excess` says some row has them; computed inside that branch, the flipped
  array is never materialized.
  """
  def search(operands):
    flipped = lambda *a: flipped_fn(*a).astype(jnp.uint32)
    cut = _kth_largest(flipped, operands, need, group_size.bit_length())
    return group_size - cut.astype(jnp.int32)

  keep_all = lambda _: jnp.full(need.shape, group_size, jnp.int32)
  return lax.cond(excess, search, keep_all, operands)


def _sample_size(n: int) -> int:
  """Elements in the sample of `_bracket`."""
  if n % 16 == 0:
    return -(-(n // 16) // _SAMPLE_STRIDE) * 16
  return -(-n // _SAMPLE_STRIDE)


def _bracket_plan(n: int, k: int):
  """Sample ranks (a, b) whose values bracket the K-th largest, and the candidate capacity.

  None when the group is too short for a sample to pay off: with many short groups
  (granularity "token") the candidate bookkeeping cost more than the 31 passes of
  the whole-group search saved (measured on (32 * 197, 3072)).
  """
  if n < _BRACKET_MIN:
    return None
  m = _sample_size(n)
  q = k / n
  delta = _BRACKET_Z * math.sqrt(m * q * (1 - q)) + 2
  a = math.floor(q * m - delta)
  b = math.ceil(q * m + delta)
  # Expected candidates are (b - a) strides; room for 1.75x that, for ties at the
  # bracket's ends in discrete data (bfloat16 inputs) and rounding the ends outwards
  # (at most 84% full at 1.5x over normal, GELU, softmax, Cauchy and bfloat16 data).
  capacity = -(-int(1.75 * (min(b, m) - max(a, 0)) * n / m + 256) // 256) * 256
  if capacity >= n // 4:
    return None
  return a, b, capacity


def threshold_full(x: jax.Array, k: int):
  """(t, cut) for the 2-D `x`: keep |x| > t and |x| == t at positions <= cut (bit patterns).

  Searched over whole groups.
  """
  groups, n = x.shape
  u = _magnitude_bits(x)
  t = _kth_largest(_magnitude_bits, (x,), k)
  above = _count_at_least(u, t + 1)
  tied = _count_at_least(u, t) - above

  def flipped(x, t):
    pos = jnp.arange(n, dtype=jnp.int32)[None, :]
    return jnp.where(_magnitude_bits(x) == t[:, None], n - pos, 0)

  return t, _tie_cut(flipped, (x, t), jnp.any(tied > k - above), k - above, n)


def _bracket(x: jax.Array, k: int, plan):
  """The candidates of the sampled bracket lo <= |x| < hi (bit patterns) of each group.

  Returns (lo, hi, above: count >= hi, candidate positions, valid, count, ok); `ok`
  says the bracket holds in every group (above < k <= above + count) and its
  candidates fit. The bit patterns are recomputed from `x` by each pass rather than
  stored: a copy of the whole activation would be the largest transient of all.
  """
  groups, n = x.shape
  a, b, capacity = plan
  u = _magnitude_bits(x)
  if n % 16 == 0:
    # Runs of 16 (one cache line of float32) every 31 runs: the same sample size as
    # every 31st element, reading 1/31 of the group instead of every other line.
    sample = u.reshape(groups, -1, 16)[:, ::_SAMPLE_STRIDE].reshape(groups, -1)
  else:
    sample = u[:, ::_SAMPLE_STRIDE]
  m = sample.shape[1]
  # The a-th and b-th largest of the sample, rounded outwards to their leading bits,
  # in one search over both copies.
  low_bits = max(0, u.dtype.itemsize * 8 - _BRACKET_BITS)
  ranks = jnp.repeat(jnp.asarray([max(a, 1), min(b, m)], jnp.int32), groups)
  both = _kth_largest(lambda s: s, (jnp.concatenate([sample, sample]),), ranks,
                      low_bits=low_bits)
  top = jnp.asarray(1 << (u.dtype.itemsize * 8 - 1), u.dtype)  # above every |x|
  step = jnp.asarray(1 << low_bits, u.dtype)
  hi = both[:groups] + step if a >= 1 else jnp.full((groups,), top)
  lo = both[groups:] if b <= m else jnp.zeros((groups,), u.dtype)
  above = _count_at_least(u, hi)
  # lo <= u < hi in one unsigned compare.
  in_range = lambda x, lo, hi: (_magnitude_bits(x) - lo[:, None]) < (hi - lo)[:, None]
  pos, valid, count = codecs.select(codecs.bitmask(in_range, x, lo, hi), capacity, n)
  ok = jnp.all((above < k) & (above + count >= k) & (count <= capacity))
  return lo, hi, above, pos, valid, count, ok


def threshold(x: jax.Array, k: int):
  """(t, cut) as `threshold_full`, through a sampled bracket where it pays off."""
  groups, n = x.shape
  plan = _bracket_plan(n, k)
  if plan is None:
    return threshold_full(x, k)
  lo, hi, above, pos, valid, _, ok = _bracket(x, k, plan)

  def from_candidates(x):
    cand = jnp.take_along_axis(_magnitude_bits(x), pos, axis=1)
    cand = jnp.where(valid, cand, 0)
    t = _kth_largest_between(cand, k - above, lo, hi)
    over = above + jnp.sum(cand > t[:, None], axis=1, dtype=jnp.int32)
    tied = valid & (cand == t[:, None])
    excess = jnp.any(jnp.sum(tied, axis=1, dtype=jnp.int32) > k - over)
    flipped = lambda tied, pos: jnp.where(tied, n - pos, 0)
    return t, _tie_cut(flipped, (tied, pos), excess, k - over, n)

  # A conditional's operands are materialized: it takes x, not its bit patterns.
  return lax.cond(ok, from_candidates, lambda x: threshold_full(x, k), x)


def topk_words(x: jax.Array, k: int) -> jax.Array:
  """Bitmask (`codecs.bitmask`) of exactly the k largest |x| per row of the 2-D `x`.

  Ties keep the lowest positions.
  """
  t, cut = threshold(x, k)

  def kept(x, t, cut):
    u, tu = _magnitude_bits(x), t[:, None]
    pos = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    return (u > tu) | ((u == tu) & (pos <= cut[:, None]))

  return codecs.bitmask(kept, x, t, cut)


# ----------------------------------------------------------------- token rows

# Bits of a magnitude's ordering key: bfloat16(|x|) without its sign.
MAGNITUDE_BITS = 15


def magnitude_keys(x: jax.Array) -> jax.Array:
  """uint32 keys that order like bfloat16(|x|) (the stored precision); NaN above inf."""
  return lax.bitcast_convert_type(
      jnp.abs(x).astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)


def _topk_rows_sort(x: jax.Array, k: int) -> jax.Array:
  """The k kept positions of each row by one sort: distinct keys, magnitude over position."""
  rows, n = x.shape
  if n <= 1 << 16:
    pos = jnp.arange(n, dtype=jnp.uint32)[None, :]
    key = (magnitude_keys(x) << 16) | (0xFFFF - pos)
    # Keys are distinct, so stability buys nothing; a stable sort costs an iota operand
    # on GPU (XLA's bitonic sort is not stable, so it sorts (key, position) pairs).
    top = ~lax.sort(~key, dimension=1, is_stable=False)[:, :k]
    return (0xFFFF - (top & 0xFFFF)).astype(jnp.int32)
  iota = lax.broadcasted_iota(jnp.int32, (rows, n), 1)
  _, idx = lax.sort((0x7FFF - magnitude_keys(x), iota), dimension=1, num_keys=1,
                    is_stable=True)
  return idx[:, :k]


def _topk_rows_search(x: jax.Array, k: int) -> jax.Array:
  """The same k positions by a bit search over the 15-bit keys, then a tie cut."""
  rows, n = x.shape
  t = _kth_largest(magnitude_keys, (x,), k, MAGNITUDE_BITS)
  u = magnitude_keys(x)
  above = _count_at_least(u, t + 1)
  tied = _count_at_least(u, t) - above

  def flipped(x, t):
    pos = jnp.arange(n, dtype=jnp.int32)[None, :]
    return jnp.where(magnitude_keys(x) == t[:, None], n - pos, 0)

  cut = _tie_cut(flipped, (x, t), jnp.any(tied > k - above), k - above, n)

  def kept(x, t, cut):
    u, tu = magnitude_keys(x), t[:, None]
    pos = jnp.arange(n, dtype=jnp.int32)[None, :]
    return (u > tu) | ((u == tu) & (pos <= cut[:, None]))

  pos, _, _ = codecs.select(codecs.bitmask(kept, x, t, cut), k, n)
  return pos


def topk_rows(x: jax.Array, k: int) -> jax.Array:
  """Positions (rows, k) int32, increasing, of the k largest bfloat16 magnitudes of each row.

  Ties keep the lower positions. The sort on accelerators and the search on CPU give
  the same set (chosen when the program is lowered).
  """
  # The sort on accelerators and across processes (`barriers.straight_line`).
  pos = barriers.per_platform((x,), lambda a: _topk_rows_search(a, k),
                              lambda a: _topk_rows_sort(a, k))
  # Increasing: the search gives bitmask order, the sort magnitude order.
  return lax.sort(pos, dimension=1, is_stable=False)  # distinct positions


def rows_mask_reference(x: jax.Array, k: int) -> jax.Array:
  """`topk_rows`'s kept set as a bool mask, from lax.top_k on the bfloat16 magnitudes."""
  rows, n = x.shape
  key = jnp.abs(x).astype(jnp.bfloat16).astype(jnp.float32)
  _, idx = lax.top_k(key, k)  # ties: the lower index first
  return jnp.zeros((rows, n), bool).at[jnp.arange(rows)[:, None], idx].set(True)


def mask_reference(x: jax.Array, k: int) -> jax.Array:
  """The kept set of each row of the 2-D `x` from a sort (`lax.top_k`), written
  independently of `topk_words`; for tests."""
  groups, n = x.shape
  # top_k breaks ties by lower index, the same rule as `topk_words`.
  _, idx = lax.top_k(jnp.abs(x).astype(jnp.float32), k)
  return jnp.zeros((groups, n), bool).at[jnp.arange(groups)[:, None], idx].set(True)
