"""Top-K selection and the packed residual format of Back Razor.

`pack(x, prune_ratio)` keeps the K largest magnitudes of each group of `x` (a batch
sample, or a row of the last axis) and stores them as positions plus values;
`unpack(packed)` rebuilds the dense array with zeros elsewhere. Every shape in the
packed form is static, so it can be a custom-VJP residual inside `jit` and `scan`.

Selection is an exact threshold search on the bit pattern of |x|: for non-negative
IEEE floats the unsigned bit pattern orders like the value, so the K-th largest
magnitude is the largest pattern t with at least K elements >= t. A strided sample
of each group brackets t (lo <= t < hi) with high probability; one pass counts the
elements >= hi and marks those in [lo, hi), which are gathered into a small buffer
(about 2% of the group) where the exact search runs bit by bit. When the bracket
misses, the same bit-by-bit search runs over the whole group instead (one fused
compare-and-count pass per bit). Ties at the threshold keep the lowest flat
positions, so exactly K elements are kept in every group.

Storage (see `Packed`): positions as a bitmask or as indices, whichever is smaller,
or on request Elias-Fano coded (half the bitmask's size at 10% kept, slower);
values by default as bfloat16 numbers in 15 bits (sign, exponent relative to the
group's largest, 7-bit mantissa), optionally int8 with a per-group scale, or
float16 / float32. `bits_per_element` reports what that costs: at 0.9 pruning,
2.50 bits per element by default, 2.03 with Elias-Fano positions.

Why the code looks the way it does (XLA:CPU, measured with experiments/): a
reduction over more than 32 elements is rewritten into reduce-windows over a
materialized input, so counts and maxima are nested short reductions; the bitmask
is packed from 8 contiguous slices into bytes (vectorized) rather than from the 32
minor bits of each word; compaction gathers the K values through a per-slot search
instead of scattering all n; small intermediates are materialized (`materialize`)
where XLA would otherwise recompute them for every element of a large consumer.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

GRANULARITIES = ("sample", "token")
VALUE_FORMATS = ("auto", "bfloat16", "float16", "float32", "int8")
POSITION_FORMATS = ("auto", "bitmask", "indices", "elias_fano")

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
# bfloat16 code: 7 bits of exponent relative to the group's base; 0 means zero and
# 127 means inf or NaN, so 126 binades of finite values are exact.
_REL_ZERO, _REL_SPECIAL = 0, 127
_MANTISSA_BITS = 7


def check_prune_ratio(prune_ratio, name: str = "prune_ratio") -> float:
  """Returns `prune_ratio` as a float, or raises if it is outside [0, 1)."""
  try:
    ratio = float(prune_ratio)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a float in [0, 1), got {prune_ratio!r}") from None
  if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
    raise ValueError(
        f"{name} must be in [0, 1): the fraction of each activation that is pruned"
        f" (0.9 keeps 10%); got {prune_ratio!r}")
  return ratio


def check_granularity(granularity: str) -> str:
  if granularity not in GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  return granularity


def group_shape(shape, granularity: str) -> tuple[int, int]:
  """(number of groups, elements per group) for an array of `shape`."""
  check_granularity(granularity)
  if len(shape) == 0:
    raise ValueError("cannot prune a scalar: expected an array with a batch axis")
  size = math.prod(shape)
  if granularity == "sample":
    groups = shape[0]
  else:
    groups = size // shape[-1] if shape[-1] else 0
  if groups == 0 or size == 0:
    raise ValueError(f"cannot prune an empty array of shape {tuple(shape)}")
  return groups, size // groups


def keep_count(group_size: int, prune_ratio: float) -> int:
  """K = round((1 - prune_ratio) * n); raises if that keeps nothing."""
  ratio = check_prune_ratio(prune_ratio)
  k = int(round((1.0 - ratio) * group_size))
  if k < 1:
    raise ValueError(
        f"prune_ratio={ratio} keeps round({1.0 - ratio:.4g} * {group_size}) = 0 of the"
        f" {group_size} elements in each group; use a prune_ratio below"
        f" {1.0 - 0.5 / group_size:.6g} or granularity='sample' for larger groups")
  return min(k, group_size)


def _value_format(value_format: str, dtype) -> str:
  """The storage actually used: "auto" resolved against the input dtype."""
  if value_format not in VALUE_FORMATS:
    raise ValueError(f"value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
  if value_format == "auto":
    # bf16 keeps float32's range; float16 inputs are stored as they are.
    return "float16" if jnp.dtype(dtype) == jnp.float16 else "bfloat16"
  return value_format


def _storage_dtype(value_format: str, dtype) -> jnp.dtype:
  """The dtype whose numbers the stored values are (int8: before the scale)."""
  return jnp.dtype(_value_format(value_format, dtype))


def _index_dtype(group_size: int):
  return jnp.dtype(jnp.uint16) if group_size <= 2**16 else jnp.dtype(jnp.int32)


# ----------------------------------------------------------------- bitmask layout

def _lanes(group_size: int) -> int:
  """Bytes interleaved in one bitmask block (see `_bitmask`)."""
  # 32 lanes let the packing vectorize; they pad groups to 256 elements, so only
  # groups that are already a multiple of 256 use them.
  return 32 if group_size % 256 == 0 else 4


def _num_words(group_size: int) -> int:
  lanes = _lanes(group_size)
  return -(-group_size // (8 * lanes)) * lanes // 4


def _bitmask(mask_fn, *args) -> jax.Array:
  """The bool (groups, n) `mask_fn(*args)` as a uint32 (groups, num_words) bitmask.

  With L = `_lanes(n)`, element e is bit (e // L) % 8 of byte (e // 8L) L + e % L:
  blocks of 8L elements spread over L bytes, packed by OR-ing 8 contiguous slices,
  which vectorizes over L uint8 lanes (building 32-bit words directly took 2.5x
  longer). Word w is bytes 4w..4w+3, little-endian. The mask is computed inside a
  conditional so that neither it nor the bytes are materialized at full size or
  recomputed per word.
  """
  def to_bytes(*args):
    mask = mask_fn(*args)
    groups, n = mask.shape
    lanes = _lanes(n)
    m = jnp.pad(mask, ((0, 0), (0, _num_words(n) * 32 - n)))
    m = m.reshape(groups, -1, 8, lanes).astype(jnp.uint8)
    packed = m[:, :, 0]
    for j in range(1, 8):
      packed = packed | (m[:, :, j] << j)
    return packed

  # Reshaped outside: as the root of the packing fusion, the reshape made it 3x slower.
  packed = materialize(to_bytes, *args)
  return lax.bitcast_convert_type(packed.reshape(packed.shape[0], -1, 4), jnp.uint32)


def _element_index(word: jax.Array, bit: jax.Array, lanes: int) -> jax.Array:
  """Flat position in its group of bit `bit` of word `word` (the inverse of `_bitmask`)."""
  byte = word * 4 + bit // 8
  return (byte // lanes) * (8 * lanes) + (bit % 8) * lanes + byte % lanes


def _bitmask_bytes(words: jax.Array, group_size: int) -> jax.Array:
  """The bitmask's bytes as (groups, blocks, lanes) uint8."""
  return lax.bitcast_convert_type(words, jnp.uint8).reshape(
      words.shape[0], -1, _lanes(group_size))


def bitmask_to_mask(words: jax.Array, group_size: int) -> jax.Array:
  """(groups, num_words) uint32 bitmask -> (groups, group_size) bool."""
  b = _bitmask_bytes(words, group_size)[:, :, None, :]
  bits = (b >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1
  return bits.astype(bool).reshape(words.shape[0], -1)[:, :group_size]


# ----------------------------------------------------------------- counting and search

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


def _row_max_u8(a: jax.Array) -> jax.Array:
  """Per row of the uint8 (groups, L) `a`, its maximum (int32), in nested short reductions.

  One long reduction is rewritten by XLA:CPU into reduce-windows (see
  `_count_at_least`); the dtype changes between levels keep XLA from merging them.
  """
  groups, length = a.shape
  a = jnp.pad(a, ((0, 0), (0, (-length) % 256))).reshape(groups, -1, 16, 16)
  per256 = jnp.max(jnp.max(a, axis=3).astype(jnp.uint16), axis=2)
  return jnp.max(per256.astype(jnp.int32), axis=1)


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
    values = values_fn(*depend(operands, t))
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


def _prefix_sum(a: jax.Array, bound: int) -> jax.Array:
  """Inclusive prefix sum of the int32 (groups, L) `a` along axis 1.

  `bound` is a static upper bound of any 32 consecutive entries' sum. Within blocks
  of 32 the sum is a float32 matmul with a triangular matrix, exact for integers
  below 2**24; jnp.cumsum over all of L lowers to several full-size reduce-windows.
  The blocks are materialized before they are flattened: as the root of a fusion,
  that reshape made XLA:CPU's loop 4x slower.
  """
  groups, length = a.shape
  if bound >= 2**24 or length < 64:
    return jnp.cumsum(a, axis=1, dtype=jnp.int32)

  def blocks(a):
    pad = (-length) % 32
    b = jnp.pad(a, ((0, 0), (0, pad))).reshape(-1, 32).astype(jnp.float32)
    tri = jnp.triu(jnp.ones((32, 32), jnp.float32))
    inner = jnp.dot(b, tri, precision=lax.Precision.HIGHEST).astype(jnp.int32)
    inner = inner.reshape(groups, -1, 32)
    totals = inner[:, :, -1]
    return inner + (jnp.cumsum(totals, axis=1, dtype=jnp.int32) - totals)[:, :, None]

  return materialize(blocks, a).reshape(groups, -1)[:, :length]


def _select_in_word(w: jax.Array, r: jax.Array) -> jax.Array:
  """Index of the (r+1)-th set bit of each uint32 `w` (r < popcount(w)), by halving."""
  pos = jnp.zeros(r.shape, jnp.int32)
  for half in (16, 8, 4, 2, 1):
    low = w & jnp.uint32((1 << half) - 1)
    c = lax.population_count(low).astype(jnp.int32)
    up = r >= c
    r = jnp.where(up, r - c, r)
    w = jnp.where(up, w >> half, low)
    pos = pos + jnp.where(up, half, 0)
  return pos


def _word_starts(words: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(set bits before each word, set bits in the row), int32."""
  per_word = lax.population_count(words).astype(jnp.int32)
  incl = _prefix_sum(per_word, 32 * 32)
  return incl - per_word, incl[:, -1]


def _select_bits(words: jax.Array, count: int):
  """The first `count` set bits of each row of uint32 words, as 32 * word + bit, in order.

  Returns (index (groups, count) int32, valid (groups, count) bool, set bits per row).
  Slot j belongs to the last word that starts at or before it: a scatter-add of one
  per word at its start, then a prefix sum over the slots, finds it without an
  n-element scatter; its bit is the (j - start)-th set bit of that word. The small
  intermediates are materialized: XLA would fuse them into their broadcast or
  gathering consumers and recompute them per element.
  """
  groups, num_words = words.shape
  start, total = materialize(_word_starts, words)
  rows = jnp.arange(groups, dtype=jnp.int32)[:, None]

  def owners(start):
    starts_here = jnp.zeros((groups, count), jnp.int32).at[rows, start].add(1, mode="drop")
    return _prefix_sum(starts_here, num_words) - 1

  owner = materialize(owners, start)

  def indices(owner, start, words, total):
    slot = jnp.arange(count, dtype=jnp.int32)[None, :]
    rank = slot - jnp.take_along_axis(start, owner, axis=1)
    bit = _select_in_word(jnp.take_along_axis(words, owner, axis=1), rank)
    valid = slot < total[:, None]
    return jnp.where(valid, owner * 32 + bit, 0), valid

  index, valid = materialize(indices, owner, start, words, total)
  return index, valid, total


def _positions(index: jax.Array, group_size: int) -> jax.Array:
  """Flat element positions of bitmask indices (32 * word + bit)."""
  return _element_index(index >> 5, index & 31, _lanes(group_size))


def _select(words: jax.Array, count: int, group_size: int):
  """Flat positions of the first `count` kept elements of a bitmask, in bitmask order.

  Returns (positions (groups, count) int32, valid, kept per row); see `_select_bits`.
  """
  index, valid, total = _select_bits(words, count)
  return _positions(index, group_size), valid, total


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


def _threshold_full(x: jax.Array, k: int):
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
  pos, valid, count = _select(_bitmask(in_range, x, lo, hi), capacity, n)
  ok = jnp.all((above < k) & (above + count >= k) & (count <= capacity))
  return lo, hi, above, pos, valid, count, ok


def _threshold(x: jax.Array, k: int):
  """(t, cut) as `_threshold_full`, through a sampled bracket where it pays off."""
  groups, n = x.shape
  plan = _bracket_plan(n, k)
  if plan is None:
    return _threshold_full(x, k)
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
  return lax.cond(ok, from_candidates, lambda x: _threshold_full(x, k), x)


def topk_words(x: jax.Array, k: int) -> jax.Array:
  """Bitmask (`_bitmask`) of exactly k largest |x| per row of the 2-D `x`; ties keep the first."""
  t, cut = _threshold(x, k)

  def kept(x, t, cut):
    u, tu = _magnitude_bits(x), t[:, None]
    pos = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    return (u > tu) | ((u == tu) & (pos <= cut[:, None]))

  return _bitmask(kept, x, t, cut)


def topk_mask(x: jax.Array, k: int) -> jax.Array:
  """Boolean mask of exactly k largest |x| per row of the 2-D `x`; ties keep low positions."""
  return bitmask_to_mask(topk_words(x, k), x.shape[1])


# ----------------------------------------------------------------- value codes

def _pack_planes(v: jax.Array, nbits: int) -> jax.Array:
  """(groups, K) small unsigned ints -> (groups, nbits * ceil(K / 8)) uint8 bit planes.

  Plane p is bytes [p B, (p + 1) B) with B = ceil(K / 8); value j of a row is bit
  j // B of byte j % B of each plane. The eight values of a byte are B apart, so
  packing ORs eight contiguous slices (vectorized; XLA:CPU emits a slow loop for a
  reduction whose result is reshaped). The planes are flattened outside the fusion
  that packs them: as its root, the reshape cost 2x.
  """
  groups, k = v.shape
  per = -(-k // 8)
  dtype = jnp.uint8 if nbits <= 8 else jnp.uint32

  def planes(v):
    v = jnp.pad(v.astype(dtype), ((0, 0), (0, per * 8 - k))).reshape(groups, 1, 8, per)
    bits = ((v >> jnp.arange(nbits, dtype=dtype)[:, None, None]) & 1).astype(jnp.uint8)
    packed = bits[:, :, 0]
    for j in range(1, 8):
      packed = packed | (bits[:, :, j] << j)
    return packed

  return materialize(planes, v).reshape(groups, -1)


def _unpack_planes(planes: jax.Array, nbits: int, k: int) -> jax.Array:
  """Inverse of `_pack_planes`: (groups, K) int32."""
  groups = planes.shape[0]

  def values(planes):
    bits = (planes.reshape(groups, nbits, 1, -1) >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1
    v = bits[:, 0].astype(jnp.int32)
    for p in range(1, nbits):
      v = v | (bits[:, p].astype(jnp.int32) << p)
    return v

  return materialize(values, planes).reshape(groups, -1)[:, :k]


def _encode_bf16(kept: jax.Array) -> jax.Array:
  """bfloat16(kept) in 15 bits per value, as one uint8 payload per group.

  Payload: [base, K bytes of sign << 7 | relative exponent, 7 bit planes of the
  mantissas (see `_pack_planes`)]. Exponents are stored relative to base = (the
  row's largest finite exponent) - 125: code 1..126 is exponent base..base+125,
  0 is zero and 127 is inf/NaN (exponent 255). Kept magnitudes are all >= the
  threshold, so in practice they span a few binades; only a row whose kept values
  span more than 2**125 loses its smallest ones, which flush to (signed) zero
  (zeros and subnormals kept beside values >= 0.5 among them).
  """
  b = lax.bitcast_convert_type(kept.astype(jnp.bfloat16), jnp.uint16).astype(jnp.int32)
  sign, exp, mant = b >> 15, (b >> 7) & 255, b & 127
  special = exp == 255
  top = _row_max_u8(jnp.where(special, 0, exp).astype(jnp.uint8))[:, None]
  base = jnp.maximum(top - 125, 0)
  rel = jnp.where(special, _REL_SPECIAL, jnp.where(exp >= base, exp - base + 1, _REL_ZERO))
  # The mantissa of a flushed value is left as it was (decoding ignores it), so the
  # planes do not depend on the row's maximum.
  code = ((sign << 7) | rel).astype(jnp.uint8)
  planes = _pack_planes(mant, _MANTISSA_BITS)
  return jnp.concatenate([base.astype(jnp.uint8), code, planes], axis=1)


def _decode_bf16(payload: jax.Array, k: int) -> jax.Array:
  """(groups, K) bfloat16 from the payload of `_encode_bf16`."""
  groups = payload.shape[0]
  base = payload[:, :1].astype(jnp.int32)
  code = payload[:, 1:1 + k].astype(jnp.int32)
  mant = _unpack_planes(payload[:, 1 + k:], _MANTISSA_BITS, k)
  sign, rel = code >> 7, code & 127
  exp = jnp.where(rel == _REL_SPECIAL, 255, base + rel - 1)
  bits = jnp.where(rel == _REL_ZERO, sign << 15, (sign << 15) | (exp << 7) | mant)
  return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


# ----------------------------------------------------------------- Elias-Fano positions

def _ef_layout(group_size: int, k: int) -> tuple[int, int, int]:
  """(low bits L, upper words, low-bit words) of the Elias-Fano code of K bitmask indices.

  Bitmask indices (32 * word + bit, below N = 32 * num_words) are sorted; each keeps
  its L = floor(log2(N / K)) low bits in bit planes, and its high part h as bit
  h + i of an upper bit vector of K + (N >> L) bits (unary gaps). About K (L + 2) +
  N / 2**L bits in all: at 10% kept, 0.53 bits per element instead of the bitmask's 1.
  """
  universe = 32 * _num_words(group_size)
  low = max(0, int(math.floor(math.log2(universe / k))))
  upper_words = -(-(k + (universe >> low)) // 32)
  low_words = -(-low * -(-k // 8) // 4)
  return low, upper_words, low_words


def _set_bits(index: jax.Array, num_words: int) -> jax.Array:
  """(groups, num_words) uint32 words with bits `index` (distinct per row) set."""
  rows = jnp.arange(index.shape[0], dtype=jnp.int32)[:, None]
  # Distinct bits, so adding them is OR-ing.
  return jnp.zeros((index.shape[0], num_words), jnp.uint32).at[rows, index >> 5].add(
      jnp.uint32(1) << (index & 31).astype(jnp.uint32), mode="drop")


def _ef_encode(index: jax.Array, group_size: int) -> jax.Array:
  """(groups, upper + low words) uint32 Elias-Fano code of sorted bitmask indices (groups, K)."""
  groups, k = index.shape
  low, upper_words, low_words = _ef_layout(group_size, k)
  # Bit h_i + i of the upper vector (strictly increasing in i).
  upper = _set_bits((index >> low) + jnp.arange(k, dtype=jnp.int32)[None, :], upper_words)
  if not low:
    return upper
  planes = _pack_planes(index & ((1 << low) - 1), low)
  planes = jnp.pad(planes, ((0, 0), (0, 4 * low_words - planes.shape[1])))
  planes = lax.bitcast_convert_type(planes.reshape(groups, low_words, 4), jnp.uint32)
  return jnp.concatenate([upper, planes], axis=1)


def _ef_decode(code: jax.Array, group_size: int, k: int) -> jax.Array:
  """The bitmask words (groups, num_words) that `_ef_encode` was given the indices of."""
  groups = code.shape[0]
  low, upper_words, low_words = _ef_layout(group_size, k)
  at, _, _ = _select_bits(code[:, :upper_words], k)
  index = (at - jnp.arange(k, dtype=jnp.int32)[None, :]) << low
  if low:
    planes = lax.bitcast_convert_type(code[:, upper_words:], jnp.uint8).reshape(groups, -1)
    index = index | _unpack_planes(planes[:, :low * -(-k // 8)], low, k)
  return _set_bits(index, _num_words(group_size))


# ----------------------------------------------------------------- Packed

def _position_bytes(group_size: int, k: int) -> dict:
  """Bytes per group of each position format."""
  _, upper_words, low_words = _ef_layout(group_size, k)
  return {"bitmask": 4 * _num_words(group_size),
          "indices": k * _index_dtype(group_size).itemsize,
          "elias_fano": 4 * (upper_words + low_words)}


def choose_position_format(group_size: int, k: int) -> str:
  """The smaller of a bitmask (1 bit per element, padded to whole words) and indices."""
  sizes = _position_bytes(group_size, k)
  return "indices" if sizes["indices"] < sizes["bitmask"] else "bitmask"


@struct.dataclass
class Packed:
  """A pruned activation: positions and values of the kept elements of each group.

  positions: a uint32 bitmask (groups, num_words) in the layout of `_bitmask`;
    indices (groups, K) (uint16, or int32 past 65536 elements per group); or the
    uint32 Elias-Fano code of the bitmask (see `_ef_layout`).
  values: the kept elements in bitmask order (indices: in the order of
    `positions`). value_format "bfloat16": a uint8 payload (groups,
    1 + K + 7 ceil(K / 8)) of 15 bits per value (see `_encode_bf16`); "int8":
    (groups, K) int8 steps of `scale`; "float16" / "float32": (groups, K) floats.
  scale: "int8" only: the float32 (groups,) step; else None.
  """
  positions: jax.Array
  values: jax.Array
  scale: Optional[jax.Array]
  k: int = struct.field(pytree_node=False)
  shape: tuple = struct.field(pytree_node=False)
  dtype: jnp.dtype = struct.field(pytree_node=False)
  granularity: str = struct.field(pytree_node=False)
  position_format: str = struct.field(pytree_node=False)
  value_format: str = struct.field(pytree_node=False)

  @property
  def group_size(self) -> int:
    return math.prod(self.shape) // self.values.shape[0]

  def nbytes(self) -> int:
    leaves = [a for a in (self.positions, self.values, self.scale) if a is not None]
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)

  def bits_per_element(self) -> float:
    """Stored bits per element of the original activation (every stored byte)."""
    return 8.0 * self.nbytes() / math.prod(self.shape)


def _encode(kept: jax.Array, value_format: str):
  """(values, scale) for the kept elements (groups, K)."""
  if value_format == "bfloat16":
    return _encode_bf16(kept), None
  if value_format == "int8":
    amax = jnp.max(jnp.abs(kept), axis=1).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(kept.astype(jnp.float32) / scale[:, None]), -127, 127)
    return q.astype(jnp.int8), scale
  return kept.astype(value_format), None


def _decode(packed: Packed) -> jax.Array:
  """The kept values (groups, K): bfloat16 for that format, else the packed dtype."""
  if packed.value_format == "bfloat16":
    return _decode_bf16(packed.values, packed.k)
  if packed.value_format == "int8":
    q = packed.values.astype(jnp.float32) * packed.scale[:, None]
    return q.astype(packed.dtype)
  return packed.values.astype(packed.dtype)


def pack(x: jax.Array, prune_ratio: float, granularity: str = "sample", *,
         value_format: str = "auto", position_format: str = "auto") -> Packed:
  """Keeps the top-K magnitudes of each group of `x` in a compact static-shape form.

  Args:
    x: floating array whose first axis is the batch.
    prune_ratio: fraction pruned, in [0, 1); K = round((1 - prune_ratio) * n).
    granularity: "sample" (top-K over each batch element, the paper's rule) or
      "token" (top-K of each row of the last axis).
    value_format: storage of kept values: "auto" (float16 for float16 input, else
      "bfloat16"), "bfloat16" (bfloat16 numbers in 15 bits), "float16", "float32"
      or "int8" (with a per-group float32 scale).
    position_format: "auto" (the smaller of "bitmask" and "indices"), "bitmask",
      "indices" or "elias_fano" (the smallest, at some cost in time).
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"pack expects a floating-point array, got dtype {x.dtype}")
  groups, n = group_shape(x.shape, granularity)
  k = keep_count(n, prune_ratio)
  if position_format not in POSITION_FORMATS:
    raise ValueError(f"position_format must be one of {POSITION_FORMATS}, got {position_format!r}")
  if position_format == "auto":
    position_format = choose_position_format(n, k)
  value_format = _value_format(value_format, x.dtype)

  flat = x.reshape(groups, n)
  words = topk_words(flat, k)
  index, _, _ = _select_bits(words, k)
  pos = _positions(index, n)
  kept = materialize(lambda a, p: jnp.take_along_axis(a, p, axis=1), flat, pos)
  values, scale = _encode(kept, value_format)
  if position_format == "bitmask":
    positions = words
  elif position_format == "indices":
    positions = pos.astype(_index_dtype(n))
  else:
    positions = _ef_encode(index, n)
  return Packed(positions=positions, values=values, scale=scale, k=k, shape=tuple(x.shape),
                dtype=jnp.dtype(x.dtype), granularity=granularity,
                position_format=position_format, value_format=value_format)


def unpack(packed: Packed, after: Optional[jax.Array] = None) -> jax.Array:
  """The dense array: kept values in place, zeros elsewhere.

  Args:
    packed: what `pack` returned.
    after: optional array (a cotangent) that the result must not be computed
      before. XLA allocates backward-only buffers whose inputs exist early (the
      decoded values, the scatter's zeros) at program start, which keeps a dense
      copy of every layer alive at once; a data dependency on the cotangent
      moves them to where the backward needs them.
  """
  if after is not None:
    packed = depend(packed, after)
  groups, n, k = packed.values.shape[0], packed.group_size, packed.k
  # Decoded once per kept value: XLA would otherwise fuse the decoding into the
  # gather below and redo it for each of the n elements. Kept as bfloat16 (exact)
  # so that the table the gather reads is half the size.
  values = materialize(_decode, packed)
  if packed.position_format != "indices":
    words = packed.positions
    if packed.position_format == "elias_fano":
      words = materialize(lambda code: _ef_decode(code, n, k), words)
    lanes = _lanes(n)
    # Materialized: fused into the gather, the prefix sum is redone per element.
    start = materialize(lambda a: _word_starts(a)[0], words)

    def blocks(words, start, values):
      # Elements as (group, block, bit of byte, word of block, byte of word), see
      # `_bitmask`; each takes the value of its rank among the set bits of its row.
      shape = (groups, -1, 1, lanes // 4, 1)
      w = words.reshape(shape)
      bit = 8 * jnp.arange(4, dtype=jnp.uint32) + jnp.arange(8, dtype=jnp.uint32)[:, None, None]
      below = lax.population_count(w & ((jnp.uint32(1) << bit) - 1)).astype(jnp.int32)
      slot = jnp.minimum(start.reshape(shape) + below, k - 1)
      rows = jnp.arange(groups, dtype=jnp.int32).reshape(-1, 1, 1, 1, 1)
      return jnp.where((w >> bit) & 1 != 0, values[rows, slot].astype(packed.dtype), 0)

    # (A conditional around this, to keep the final reshape out of the gather's
    # fusion, was 10% faster but raised the 12-layer stack's compiled temp by 8%.)
    dense = blocks(words, start, values).reshape(groups, -1)[:, :n]
  else:
    rows = jnp.arange(groups, dtype=jnp.int32)[:, None]
    zeros = depend(jnp.zeros((groups, n), packed.dtype), packed.positions)
    dense = zeros.at[rows, packed.positions.astype(jnp.int32)].set(
        values, mode="drop", unique_indices=True)
  return dense.reshape(packed.shape).astype(packed.dtype)


def _never(anchor: jax.Array) -> jax.Array:
  """A scalar False that XLA cannot prove False, computed from one element of `anchor`.

  The population count of a value never exceeds its bit width; no XLA pass folds it.
  """
  a = jnp.asarray(anchor).reshape(-1)[0]
  bits = a.dtype.itemsize * 8
  utype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[bits]
  a = a.astype(jnp.uint8) if a.dtype == jnp.bool_ else lax.bitcast_convert_type(a, utype)
  return lax.population_count(a) > bits


def depend(x, *anchors):
  """`x` (an array or a pytree), unchanged bit for bit, but computed only after every leaf of `anchors`.

  XLA's scheduler places each op by data dependencies alone. Two placements keep dense
  activations alive and undo the saving: a residual's packing deferred until the
  backward needs it (its dense input then lives through the whole forward), and
  backward-only buffers (the unpacked copy, a scatter's zeros) hoisted to the start.
  Tying the forward output to the packed residual, and the unpacking to the
  cotangent, pins both where they belong.
  """
  never = None
  for leaf in jax.tree.leaves(anchors):
    cond = _never(leaf)
    never = cond if never is None else never | cond
  if never is None:
    return x
  return jax.tree.map(lambda a: jnp.where(never, jnp.zeros_like(a), a), x)


def materialize(fn, *args):
  """fn(*args), computed in full where it is called and never recomputed later.

  XLA duplicates cheap elementwise producers into their consumers. A residual such as
  an 8-bit copy, built elementwise from a dense activation, would then be rebuilt
  inside the backward from the dense activation, which stays alive for it. A
  conditional is a fusion boundary; its predicate is one that XLA cannot fold.
  """
  out = jax.eval_shape(fn, *args)
  zeros = lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
  return lax.cond(_never(jax.tree.leaves(args)[0]), zeros, fn, *args)


def mask_reference(x: jax.Array, prune_ratio: float, granularity: str = "sample") -> jax.Array:
  """The kept set from a sort (`lax.top_k`), written independently of `pack`; for tests."""
  groups, n = group_shape(x.shape, granularity)
  k = keep_count(n, prune_ratio)
  flat = jnp.abs(x.reshape(groups, n)).astype(jnp.float32)
  # top_k breaks ties by lower index, the same rule as `topk_mask`.
  _, idx = lax.top_k(flat, k)
  mask = jnp.zeros((groups, n), bool).at[jnp.arange(groups)[:, None], idx].set(True)
  return mask.reshape(x.shape)


def prune_reference(x: jax.Array, prune_ratio: float, granularity: str = "sample",
                    value_format: str = "auto") -> jax.Array:
  """Dense masked copy that `unpack(pack(x))` must equal; written with plain jnp."""
  mask = mask_reference(x, prune_ratio, granularity)
  storage = _storage_dtype(value_format, x.dtype)
  kept = jnp.where(mask, x, 0)
  if storage == jnp.int8:
    groups, n = group_shape(x.shape, granularity)
    flat = kept.reshape(groups, n).astype(jnp.float32)
    amax = jnp.max(jnp.abs(flat), axis=1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(flat / scale), -127, 127) * scale
    return q.reshape(x.shape).astype(x.dtype)
  return kept.astype(storage).astype(x.dtype)


def bits_per_element(shape, prune_ratio: float, granularity: str = "sample",
                     dtype=jnp.float32, value_format: str = "auto",
                     position_format: str = "auto") -> float:
  """Bits stored per original element when packing an array of `shape` (no compute)."""
  spec = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  out = jax.eval_shape(lambda a: pack(a, prune_ratio, granularity, value_format=value_format,
                                      position_format=position_format), spec)
  return out.bits_per_element()
