"""How a packed residual is stored: the bitmask layout, the value codes and Elias-Fano positions.

Positions are a bitmask of the kept elements (1 bit per element, in the interleaved
layout of `bitmask`), or its Elias-Fano code (about half its size at 10% kept, slower
to build and read). Rank and select on the bitmask's words (`word_starts`,
`select_bits`) turn it into the flat positions of the kept elements.

Values are bfloat16 numbers in 15 bits (`encode_bf16`: sign, exponent relative to
the group's largest, 7 mantissa bits in bit planes), or int8 steps of a per-group
scale (`encode_int8`).

Token rows (`packed.RowPacked`) store their increasing positions Elias-Fano coded
per row (`row_ef_encode`, about 0.55 bits per element at 10% kept) or as b-bit
indices in bit planes, and their values in 1 bit (`encode_sign`: the sign, with one
mean magnitude per row), in 4 bits (`encode_log4`: sign and a 3-bit level, zero or one
of 7 steps of a geometric scale between the row's smallest and largest kept magnitude,
which at 10% kept span a narrow range), in 3 bits where rows are never negative
(`encode_ulog3`: log4's level alone), int8 or bfloat16.
Their codes are built by reductions over the few words of a row rather than by
scatters or prefix sums: on GPU each pass over an activation is a kernel launch.

Why the code looks the way it does (XLA:CPU, measured with experiments/): the
bitmask is packed from 8 contiguous slices into bytes (vectorized) rather than from
the 32 minor bits of each word; compaction gathers the K values through a per-slot
search instead of scattering all n; small intermediates are materialized
(`barriers.materialize`) where XLA would otherwise recompute them for every element
of a large consumer.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import barriers

# bfloat16 code: 7 bits of exponent relative to the group's base; 0 means zero and
# 127 means inf or NaN, so 126 binades of finite values are exact.
_REL_ZERO, _REL_SPECIAL = 0, 127
_MANTISSA_BITS = 7


# ----------------------------------------------------------------- bitmask layout

def bitmask_lanes(group_size: int) -> int:
  """Bytes interleaved in one bitmask block (see `bitmask`)."""
  # 32 lanes let the packing vectorize; they pad groups to 256 elements, so only
  # groups that are already a multiple of 256 use them.
  return 32 if group_size % 256 == 0 else 4


def bitmask_words(group_size: int) -> int:
  lanes = bitmask_lanes(group_size)
  return -(-group_size // (8 * lanes)) * lanes // 4


def bitmask(mask_fn, *args) -> jax.Array:
  """The bool (groups, n) `mask_fn(*args)` as a uint32 (groups, num_words) bitmask.

  With L = `bitmask_lanes(n)`, element e is bit (e // L) % 8 of byte (e // 8L) L + e % L:
  blocks of 8L elements spread over L bytes, packed by OR-ing 8 contiguous slices,
  which vectorizes over L uint8 lanes (building 32-bit words directly took 2.5x
  longer). Word w is bytes 4w..4w+3, little-endian. The mask is computed inside a
  conditional so that neither it nor the bytes are materialized at full size or
  recomputed per word.
  """
  def to_bytes(*args):
    mask = mask_fn(*args)
    groups, n = mask.shape
    lanes = bitmask_lanes(n)
    m = jnp.pad(mask, ((0, 0), (0, bitmask_words(n) * 32 - n)))
    m = m.reshape(groups, -1, 8, lanes).astype(jnp.uint8)
    packed = m[:, :, 0]
    for j in range(1, 8):
      packed = packed | (m[:, :, j] << j)
    return packed

  # Reshaped outside: as the root of the packing fusion, the reshape made it 3x slower.
  packed = barriers.materialize(to_bytes, *args)
  return lax.bitcast_convert_type(packed.reshape(packed.shape[0], -1, 4), jnp.uint32)


def _element_index(word: jax.Array, bit: jax.Array, lanes: int) -> jax.Array:
  """Flat position in its group of bit `bit` of word `word` (the inverse of `bitmask`)."""
  byte = word * 4 + bit // 8
  return (byte // lanes) * (8 * lanes) + (bit % 8) * lanes + byte % lanes


def _bitmask_bytes(words: jax.Array, group_size: int) -> jax.Array:
  """The bitmask's bytes as (groups, blocks, lanes) uint8."""
  return lax.bitcast_convert_type(words, jnp.uint8).reshape(
      words.shape[0], -1, bitmask_lanes(group_size))


def bitmask_to_mask(words: jax.Array, group_size: int) -> jax.Array:
  """(groups, num_words) uint32 bitmask -> (groups, group_size) bool."""
  b = _bitmask_bytes(words, group_size)[:, :, None, :]
  bits = (b >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1
  return bits.astype(bool).reshape(words.shape[0], -1)[:, :group_size]


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

  return barriers.materialize(blocks, a).reshape(groups, -1)[:, :length]


def select_in_word(w: jax.Array, r: jax.Array) -> jax.Array:
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


def word_starts(words: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(set bits before each word, set bits in the row), int32."""
  per_word = lax.population_count(words).astype(jnp.int32)
  incl = _prefix_sum(per_word, 32 * 32)
  return incl - per_word, incl[:, -1]


def select_bits(words: jax.Array, count: int):
  """The first `count` set bits of each row of uint32 words, as 32 * word + bit, in order.

  Returns (index (groups, count) int32, valid (groups, count) bool, set bits per row).
  Slot j belongs to the last word that starts at or before it: a scatter-add of one
  per word at its start, then a prefix sum over the slots, finds it without an
  n-element scatter; its bit is the (j - start)-th set bit of that word. The small
  intermediates are materialized: XLA would fuse them into their broadcast or
  gathering consumers and recompute them per element.
  """
  groups, num_words = words.shape
  start, total = barriers.materialize(word_starts, words)
  rows = jnp.arange(groups, dtype=jnp.int32)[:, None]

  def owners(start):
    starts_here = jnp.zeros((groups, count), jnp.int32).at[rows, start].add(1, mode="drop")
    return _prefix_sum(starts_here, num_words) - 1

  owner = barriers.materialize(owners, start)

  def indices(owner, start, words, total):
    slot = jnp.arange(count, dtype=jnp.int32)[None, :]
    rank = slot - jnp.take_along_axis(start, owner, axis=1)
    bit = select_in_word(jnp.take_along_axis(words, owner, axis=1), rank)
    valid = slot < total[:, None]
    return jnp.where(valid, owner * 32 + bit, 0), valid

  index, valid = barriers.materialize(indices, owner, start, words, total)
  return index, valid, total


def element_positions(index: jax.Array, group_size: int) -> jax.Array:
  """Flat element positions of bitmask indices (32 * word + bit)."""
  return _element_index(index >> 5, index & 31, bitmask_lanes(group_size))


def select(words: jax.Array, count: int, group_size: int):
  """Flat positions of the first `count` kept elements of a bitmask, in bitmask order.

  Returns (positions (groups, count) int32, valid, kept per row); see `select_bits`.
  """
  index, valid, total = select_bits(words, count)
  return element_positions(index, group_size), valid, total


# ----------------------------------------------------------------- value codes

def _row_max_u8(a: jax.Array) -> jax.Array:
  """Per row of the uint8 (groups, L) `a`, its maximum (int32), in nested short reductions.

  One long reduction is rewritten by XLA:CPU into reduce-windows over a materialized
  input (as `selection` counts, too); the dtype changes between levels keep XLA from
  merging them.
  """
  groups, length = a.shape
  a = jnp.pad(a, ((0, 0), (0, (-length) % 256))).reshape(groups, -1, 16, 16)
  per256 = jnp.max(jnp.max(a, axis=3).astype(jnp.uint16), axis=2)
  return jnp.max(per256.astype(jnp.int32), axis=1)


def pack_planes(v: jax.Array, nbits: int) -> jax.Array:
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

  return barriers.materialize(planes, v).reshape(groups, -1)


def unpack_planes(planes: jax.Array, nbits: int, k: int) -> jax.Array:
  """Inverse of `pack_planes`: (groups, K) int32."""
  groups = planes.shape[0]

  def values(planes):
    bits = (planes.reshape(groups, nbits, 1, -1) >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1
    v = bits[:, 0].astype(jnp.int32)
    for p in range(1, nbits):
      v = v | (bits[:, p].astype(jnp.int32) << p)
    return v

  return barriers.materialize(values, planes).reshape(groups, -1)[:, :k]


def encode_bf16(kept: jax.Array) -> jax.Array:
  """bfloat16(kept) in 15 bits per value, as one uint8 payload per group.

  Payload: [base, K bytes of sign << 7 | relative exponent, 7 bit planes of the
  mantissas (see `pack_planes`)]. Exponents are stored relative to base = (the
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
  planes = pack_planes(mant, _MANTISSA_BITS)
  return jnp.concatenate([base.astype(jnp.uint8), code, planes], axis=1)


def decode_bf16(payload: jax.Array, k: int) -> jax.Array:
  """(groups, K) bfloat16 from the payload of `encode_bf16`."""
  base = payload[:, :1].astype(jnp.int32)
  code = payload[:, 1:1 + k].astype(jnp.int32)
  mant = unpack_planes(payload[:, 1 + k:], _MANTISSA_BITS, k)
  sign, rel = code >> 7, code & 127
  exp = jnp.where(rel == _REL_SPECIAL, 255, base + rel - 1)
  bits = jnp.where(rel == _REL_ZERO, sign << 15, (sign << 15) | (exp << 7) | mant)
  return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


def encode_int8(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(groups, K) int8 steps of a per-group float32 scale (groups,): the largest magnitude / 127."""
  amax = jnp.max(jnp.abs(kept), axis=1).astype(jnp.float32)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(kept.astype(jnp.float32) / scale[:, None]), -127, 127)
  return q.astype(jnp.int8), scale


def decode_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """The values of `encode_int8`'s steps, as `dtype`."""
  return (q.astype(jnp.float32) * scale[:, None]).astype(dtype)


# ----------------------------------------------------------------- Elias-Fano positions

def ef_layout(group_size: int, k: int) -> tuple[int, int, int]:
  """(low bits L, upper words, low-bit words) of the Elias-Fano code of K bitmask indices.

  Bitmask indices (32 * word + bit, below N = 32 * num_words) are sorted; each keeps
  its L = floor(log2(N / K)) low bits in bit planes, and its high part h as bit
  h + i of an upper bit vector of K + (N >> L) bits (unary gaps). About K (L + 2) +
  N / 2**L bits in all: at 10% kept, 0.53 bits per element instead of the bitmask's 1.
  """
  universe = 32 * bitmask_words(group_size)
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


def ef_encode(index: jax.Array, group_size: int) -> jax.Array:
  """(groups, upper + low words) uint32 Elias-Fano code of sorted bitmask indices (groups, K)."""
  groups, k = index.shape
  low, upper_words, low_words = ef_layout(group_size, k)
  # Bit h_i + i of the upper vector (strictly increasing in i).
  upper = _set_bits((index >> low) + jnp.arange(k, dtype=jnp.int32)[None, :], upper_words)
  if not low:
    return upper
  planes = pack_planes(index & ((1 << low) - 1), low)
  planes = jnp.pad(planes, ((0, 0), (0, 4 * low_words - planes.shape[1])))
  planes = lax.bitcast_convert_type(planes.reshape(groups, low_words, 4), jnp.uint32)
  return jnp.concatenate([upper, planes], axis=1)


def ef_decode(code: jax.Array, group_size: int, k: int) -> jax.Array:
  """The bitmask words (groups, num_words) that `ef_encode` was given the indices of."""
  groups = code.shape[0]
  low, upper_words, low_words = ef_layout(group_size, k)
  at, _, _ = select_bits(code[:, :upper_words], k)
  index = (at - jnp.arange(k, dtype=jnp.int32)[None, :]) << low
  if low:
    planes = lax.bitcast_convert_type(code[:, upper_words:], jnp.uint8).reshape(groups, -1)
    index = index | unpack_planes(planes[:, :low * -(-k // 8)], low, k)
  return _set_bits(index, bitmask_words(group_size))


# ----------------------------------------------------------------- token rows

def row_ef_layout(n: int, k: int) -> tuple[int, int, int]:
  """(low bits L, upper words, bytes) of the Elias-Fano code of k increasing positions < n.

  Each position keeps its L = floor(log2(n / k)) low bits in bit planes; its high part
  h is bit h + i of an upper bit vector (unary gaps): about k (L + 2) + n / 2**L bits.
  """
  low = max(0, int(math.floor(math.log2(n / k))))
  upper_words = -(-(k + ((n - 1) >> low) + 1) // 32)
  return low, upper_words, 4 * upper_words + low * -(-k // 8)


def row_ef_encode(pos: jax.Array, n: int) -> jax.Array:
  """uint8 (rows, bytes) Elias-Fano code of the increasing positions (rows, k) int32.

  The upper words: on GPU each is a sum over the k bits of the row (distinct bits: the
  sum is their OR), one fused reduction for the whole array instead of a scatter; on
  XLA:CPU, which materializes that reduction's (rows, words, k) operand (680 MB for
  ViT-B/16's MLP rows at 20% kept, 4x the size at 10%), a scatter of the k bits where
  that operand would outgrow the rows (`_upper_form`).
  """
  rows, k = pos.shape
  low, upper_words, _ = row_ef_layout(n, k)
  bit = (pos >> low) + jnp.arange(k, dtype=jnp.int32)[None, :]
  upper = _upper_form(n, k, (bit,), lambda b: _set_bits(b, upper_words),
                      lambda b: _upper_words_by_reduction(b, upper_words))
  code = lax.bitcast_convert_type(upper, jnp.uint8).reshape(rows, -1)
  if low:
    code = jnp.concatenate([code, pack_planes(pos & ((1 << low) - 1), low)], axis=1)
  return code


def _upper_form(n: int, k: int, args, cpu, fused):
  """fused(*args) (the GPU's form of the upper words' coding), or on XLA:CPU cpu(*args)
  where the fused form's (rows, words, k) operand outgrows twice the rows themselves
  (words * k > 2 n: ViT-B/16's 3072-wide MLP rows, 2.2x at 10% kept and 8.8x at 20%),
  which XLA:CPU materializes. Below that (a CNN's channel rows, 768-wide rows at 10%
  kept) the fused form is the smaller on CPU too: the tiny CNN's batch-32 step took
  50.9 MiB with the scatter everywhere against 44.2 without (tests/test_cnn_memory.py)."""
  if row_ef_layout(n, k)[1] * k <= 2 * n:
    return fused(*args)
  return barriers.per_platform(args, cpu, fused)


def _upper_words_by_reduction(bit: jax.Array, upper_words: int) -> jax.Array:
  """(rows, upper_words) uint32 words with the distinct bits `bit` (rows, k) set."""
  word = jnp.arange(upper_words, dtype=jnp.int32)[None, :, None]
  ones = jnp.uint32(1) << (bit & 31).astype(jnp.uint32)
  return jnp.sum(jnp.where((bit >> 5)[:, None, :] == word, ones[:, None, :], jnp.uint32(0)),
                 axis=2, dtype=jnp.uint32)


def row_ef_decode(code: jax.Array, n: int, k: int) -> jax.Array:
  """The increasing positions (rows, k) int32 coded by `row_ef_encode`.

  The i-th set bit of the upper words: on GPU, it lies in the first word whose
  inclusive prefix count exceeds i (a compare-count over the few words of a row), at
  the (i - count before that word)-th set bit of it (`select_in_word`); on XLA:CPU,
  which materializes that compare's (rows, k, words) operand, `select_bits` (slots
  owned by words through a prefix sum over the k slots) where that operand would
  outgrow the rows (`_upper_form`).
  """
  rows = code.shape[0]
  low, upper_words, _ = row_ef_layout(n, k)
  upper = lax.bitcast_convert_type(code[:, :4 * upper_words].reshape(rows, upper_words, 4),
                                   jnp.uint32)
  at = _upper_form(n, k, (upper,), lambda u: select_bits(u, k)[0],
                   lambda u: _set_bit_indices_by_count(u, k))
  pos = (at - jnp.arange(k, dtype=jnp.int32)[None, :]) << low
  if low:
    pos = pos | unpack_planes(code[:, 4 * upper_words:], low, k)
  return pos


def _set_bit_indices_by_count(upper: jax.Array, k: int) -> jax.Array:
  """(rows, k) int32 indices (32 * word + bit) of the first k set bits of each row."""
  upper_words = upper.shape[1]
  count = lax.population_count(upper).astype(jnp.int32)
  tri = jnp.arange(upper_words)[:, None] <= jnp.arange(upper_words)[None, :]
  inclusive = jnp.sum(jnp.where(tri[None], count[:, :, None], 0), axis=1)
  i = jnp.arange(k, dtype=jnp.int32)[None, :]
  word = jnp.sum((inclusive[:, None, :] <= i[:, :, None]).astype(jnp.int32), axis=2)
  word = jnp.minimum(word, upper_words - 1)
  start = jnp.take_along_axis(inclusive - count, word, axis=1)
  return word * 32 + select_in_word(jnp.take_along_axis(upper, word, axis=1), i - start)


def _log_levels(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each kept magnitude's level, 0 (an exact zero) or 1..7 on the row's geometric scale.

  Level q in 1..7 stands for lo * (hi / lo) ** ((q - 1) / 6), with lo and hi the row's
  smallest nonzero and largest kept magnitude (rounded to bfloat16), rounded to the
  nearest level in log space. Returns (uint8 levels, bfloat16 (rows, 2) [lo, hi]).
  """
  a = jnp.abs(kept).astype(jnp.float32)
  hi = jnp.max(a, axis=1)
  lo = jnp.min(jnp.where(a > 0, a, jnp.inf), axis=1)
  lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
  ends = jnp.stack([lo, hi], axis=1).astype(jnp.bfloat16)
  lo, hi = ends[:, 0].astype(jnp.float32), ends[:, 1].astype(jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny
  step = jnp.log(jnp.maximum(hi, tiny) / jnp.maximum(lo, tiny)) / 6.0
  level = jnp.log(jnp.maximum(a, tiny) / jnp.maximum(lo, tiny)[:, None])
  q = jnp.clip(jnp.round(level / jnp.where(step > 0, step, 1.0)[:, None]), 0, 6) + 1
  return jnp.where(a > 0, q, 0).astype(jnp.uint8), ends


def _level_magnitudes(level: jax.Array, ends: jax.Array) -> jax.Array:
  """float32 magnitudes of `_log_levels`' levels (int, any width) and row ends."""
  lo, hi = ends[:, 0:1].astype(jnp.float32), ends[:, 1:2].astype(jnp.float32)
  ratio = jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1.0), 1.0)
  level = level.astype(jnp.float32)
  return jnp.where(level > 0, lo * ratio ** ((level - 1.0) / 6.0), 0.0)


def encode_log4(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
  """4 bits per kept value: its sign and a 3-bit level on a geometric scale per row.

  Level 0 is an exact zero (a row with fewer than K nonzeros keeps some); level q in
  1..7 stands for lo * (hi / lo) ** ((q - 1) / 6), with lo and hi the row's smallest
  nonzero and largest kept magnitude (rounded to bfloat16), rounded to the nearest
  level in log space: at most (hi / lo) ** (1 / 12) - 1 relative error, 5.9% when the
  kept magnitudes span a factor of 2 (they span a narrow range at 10% kept).

  Returns:
    (uint8 (rows, ceil(K / 2)): two codes a byte, low nibble first;
     bfloat16 (rows, 2): [lo, hi]).
  """
  q, ends = _log_levels(kept)
  code = q | (jnp.signbit(kept).astype(jnp.uint8) << 3)
  code = jnp.pad(code, ((0, 0), (0, code.shape[1] % 2)))
  return code[:, 0::2] | (code[:, 1::2] << 4), ends


def decode_log4(codes: jax.Array, ends: jax.Array, k: int) -> jax.Array:
  """float32 (rows, K) from `encode_log4`'s codes and row ends."""
  both = jnp.stack([codes & 15, codes >> 4], axis=2).reshape(codes.shape[0], -1)[:, :k]
  magnitude = _level_magnitudes(both & 7, ends)
  return jnp.where((both & 8) != 0, -magnitude, magnitude)


def encode_ulog3(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
  """3 bits per kept magnitude: `encode_log4`'s level without its sign bit.

  For rows that are never negative (softmax probabilities), whose sign bit carries
  nothing: they decode to what log4 decodes, in three quarters of its value bits. A
  negative value is stored as its magnitude (the sign is dropped), so `Policy` allows
  it only for the "softmax" op type.

  Returns:
    (uint8 (rows, 3 * ceil(K / 8)): the levels in `pack_planes`' layout;
     bfloat16 (rows, 2): [lo, hi]).
  """
  q, ends = _log_levels(kept)
  return pack_planes(q, 3), ends


def decode_ulog3(codes: jax.Array, ends: jax.Array, k: int) -> jax.Array:
  """float32 (rows, K) magnitudes from `encode_ulog3`'s levels and row ends."""
  return _level_magnitudes(unpack_planes(codes, 3, k), ends)


def encode_sign(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
  """1 bit per kept value, its sign, and one magnitude per row: the mean kept |a|.

  The mean is the one magnitude closest to the kept ones in squared error, and at 10-20%
  kept they span a narrow range (the row's largest), so the sign carries most of what a
  weight gradient needs from them: on the demo ViT at 0.9, backbone gradient cosine
  0.436 against log4's 0.440 in 1 bit instead of 4 (README, "Kept values in one bit").
  Not for one-signed rows whose magnitudes matter: softmax probabilities flattened to
  one per row cost 2.8 points of transfer on digits 5-9 at 0.8. A kept exact zero (a row with fewer than K nonzeros) decodes as +mean, which the
  zeros pull down; a row of zeros decodes to zeros.

  Returns:
    (uint8 (rows, ceil(K / 8)): the sign bits in `pack_planes`' layout, 1 = negative;
     bfloat16 (rows, 1): the mean magnitude).
  """
  scale = jnp.mean(jnp.abs(kept).astype(jnp.float32), axis=1, keepdims=True)
  return pack_planes(jnp.signbit(kept).astype(jnp.uint8), 1), scale.astype(jnp.bfloat16)


def decode_sign(codes: jax.Array, scale: jax.Array, k: int) -> jax.Array:
  """float32 (rows, K) from `encode_sign`'s sign bits and row magnitudes."""
  magnitude = scale.astype(jnp.float32)
  return jnp.where(unpack_planes(codes, 1, k) != 0, -magnitude, magnitude)


def to_bytes(parts, rows: int) -> jax.Array:
  """The arrays `parts` (leading axis `rows`) as one uint8 (rows, total bytes) array."""
  out = []
  for a in parts:
    a = a.reshape(rows, -1)
    if a.dtype.itemsize > 1 or a.dtype != jnp.uint8:
      a = lax.bitcast_convert_type(a, jnp.uint8).reshape(rows, -1)
    out.append(a)
  return jnp.concatenate(out, axis=1)


def from_bytes(data: jax.Array, layout) -> list:
  """Inverse of `to_bytes`: arrays of `layout` ((per-row shape, dtype), ...) from `data`."""
  rows, offset, parts = data.shape[0], 0, []
  for shape, dtype in layout:
    dtype = jnp.dtype(dtype)
    width = math.prod(shape) * dtype.itemsize
    raw = data[:, offset:offset + width]
    offset += width
    if dtype.itemsize > 1:
      raw = raw.reshape(rows, -1, dtype.itemsize)
    parts.append(lax.bitcast_convert_type(raw, dtype).reshape((rows,) + tuple(shape)))
  return parts
