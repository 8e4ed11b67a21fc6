"""Top-K selection and the packed residual format of Back Razor.

`pack(x, prune_ratio)` keeps the K largest magnitudes of each group of `x` (a batch
sample, or a row of the last axis) and stores them as positions plus values;
`unpack(packed)` rebuilds the dense array with zeros elsewhere. Every shape in the
packed form is static, so it can be a custom-VJP residual inside `jit` and `scan`.

Selection is an exact threshold search on the bit pattern of |x|: for non-negative
IEEE floats the unsigned bit pattern orders like the value, so the K-th largest
magnitude is found bit by bit with one fused compare-and-count pass per bit. On
XLA:CPU this took 20 ms for a (32, 151296) float32 array where `lax.top_k` took
170 ms (experiments/bench_selection.py); `approx_max_k` falls back to the same sort
off TPU. Ties at the threshold keep the lowest flat positions, so exactly K
elements are kept in every group.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

GRANULARITIES = ("sample", "token")
VALUE_FORMATS = ("auto", "bfloat16", "float16", "float32", "int8")
POSITION_FORMATS = ("auto", "bitmask", "indices")


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


def _storage_dtype(value_format: str, dtype) -> jnp.dtype:
  if value_format not in VALUE_FORMATS:
    raise ValueError(f"value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
  if value_format == "auto":
    # bf16 keeps float32's range; inputs already 16-bit are stored as they are.
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype).itemsize > 2 else jnp.dtype(dtype)
  if value_format == "int8":
    return jnp.dtype(jnp.int8)
  return jnp.dtype(value_format)


def _index_dtype(group_size: int):
  return jnp.dtype(jnp.uint16) if group_size <= 2**16 else jnp.dtype(jnp.int32)


def choose_position_format(group_size: int, k: int) -> str:
  """The smaller of a bitmask (1 bit per element) and an index per kept element."""
  index_bits = k * _index_dtype(group_size).itemsize * 8
  bitmask_bits = 8 * ((group_size + 7) // 8)
  return "indices" if index_bits < bitmask_bits else "bitmask"


@struct.dataclass
class Packed:
  """A pruned activation: positions and values of the kept elements of each group.

  `positions` is a uint8 bitmask (groups, ceil(n / 8)) or sorted indices (groups, K);
  `values` (groups, K) holds the kept elements in position order; `scale` (groups,)
  is the int8 dequantization scale, else None.
  """
  positions: jax.Array
  values: jax.Array
  scale: Optional[jax.Array]
  shape: tuple = struct.field(pytree_node=False)
  dtype: jnp.dtype = struct.field(pytree_node=False)
  granularity: str = struct.field(pytree_node=False)
  position_format: str = struct.field(pytree_node=False)

  @property
  def k(self) -> int:
    return self.values.shape[-1]

  @property
  def group_size(self) -> int:
    return math.prod(self.shape) // self.values.shape[0]

  def nbytes(self) -> int:
    leaves = [self.positions, self.values] + ([self.scale] if self.scale is not None else [])
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)

  def bits_per_element(self) -> float:
    """Stored bits per element of the original activation."""
    return 8.0 * self.nbytes() / math.prod(self.shape)


def _magnitude_bits(x: jax.Array) -> jax.Array:
  """Unsigned integers that order like |x| (NaN above inf)."""
  utype = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
  return lax.bitcast_convert_type(jnp.abs(x), utype)


def _kth_largest(u: jax.Array, k: int) -> jax.Array:
  """Per row of `u` (groups, n), the k-th largest value, found bit by bit.

  Builds the answer from the top bit down: a candidate bit stays set if at least k
  elements are >= the candidate. One compare-and-count pass per bit; XLA fuses each
  pass, so no (groups, n) temporary besides `u` is kept. The sign bit is clear.
  """
  nbits = u.dtype.itemsize * 8 - 1
  t = jnp.zeros(u.shape[:1], u.dtype)
  for b in range(nbits - 1, -1, -1):
    cand = t | jnp.asarray(1 << b, u.dtype)
    count = jnp.sum(u >= cand[:, None], axis=1, dtype=jnp.int32)
    t = jnp.where(count >= k, cand, t)
  return t


def topk_mask(x: jax.Array, k: int) -> jax.Array:
  """Boolean mask of exactly k largest |x| per row of the 2-D `x`; ties keep low positions."""
  u = _magnitude_bits(x)
  t = _kth_largest(u, k)[:, None]
  above = u > t
  need = k - jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)
  tied = u == t

  def break_ties(_):
    rank = jnp.cumsum(tied, axis=1, dtype=jnp.int32)
    return above | (tied & (rank <= need))

  # Exact float ties at the threshold are rare except for exact zeros (ReLU outputs,
  # padding); the prefix sum that breaks them runs only when some row has more.
  excess = jnp.any(jnp.sum(tied, axis=1, keepdims=True, dtype=jnp.int32) > need)
  return lax.cond(excess, break_ties, lambda _: above | tied, None)


def _pack_bits(mask: jax.Array) -> jax.Array:
  """(groups, n) bool -> (groups, ceil(n / 8)) uint8, element j at bit j % 8 of byte j // 8."""
  groups, n = mask.shape
  m = jnp.pad(mask, ((0, 0), (0, (-n) % 8))).reshape(groups, -1, 8).astype(jnp.uint8)
  return jnp.sum(m << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def _bit_slots(bits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per element of a packed bitmask: (is set, number of set bits before it in its row).

  The prefix sum runs over bytes, not elements, and the rest is a popcount inside the
  byte, so the int32 temporary is 1/8 the size of a per-element prefix sum (XLA:CPU
  lowers cumsum to reduce-windows with several full-size temporaries).
  """
  per_byte = lax.population_count(bits).astype(jnp.int32)
  before_byte = jnp.cumsum(per_byte, axis=1, dtype=jnp.int32) - per_byte
  below = (jnp.left_shift(jnp.uint8(1), jnp.arange(8, dtype=jnp.uint8)) - 1).astype(jnp.uint8)
  b = bits[..., None]
  is_set = ((b >> jnp.arange(8, dtype=jnp.uint8)) & 1).astype(bool)
  slot = before_byte[..., None] + lax.population_count(b & below).astype(jnp.int32)
  return is_set.reshape(bits.shape[0], -1), slot.reshape(bits.shape[0], -1)


def pack(x: jax.Array, prune_ratio: float, granularity: str = "sample", *,
         value_format: str = "auto", position_format: str = "auto") -> Packed:
  """Keeps the top-K magnitudes of each group of `x` in a compact static-shape form.

  Args:
    x: floating array whose first axis is the batch.
    prune_ratio: fraction pruned, in [0, 1); K = round((1 - prune_ratio) * n).
    granularity: "sample" (top-K over each batch element, the paper's rule) or
      "token" (top-K of each row of the last axis).
    value_format: storage of kept values: "auto" (bfloat16 for 32/64-bit input,
      else the input dtype), "bfloat16", "float16", "float32" or "int8" (with a
      per-group float32 scale).
    position_format: "auto" (whichever is smaller), "bitmask" or "indices".
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
  storage = _storage_dtype(value_format, x.dtype)

  flat = x.reshape(groups, n)
  bits = _pack_bits(topk_mask(flat, k))
  is_set, slot = _bit_slots(bits)
  # Kept elements scatter to their slot in position order; the rest fall out of range.
  rows = jnp.arange(groups, dtype=jnp.int32)[:, None]
  target = jnp.where(is_set, rows * k + slot, groups * k)
  padded = jnp.pad(flat, ((0, 0), (0, bits.shape[1] * 8 - n)))
  kept = jnp.zeros((groups * k,), x.dtype).at[target.reshape(-1)].set(
      padded.reshape(-1), mode="drop", unique_indices=True).reshape(groups, k)

  scale = None
  if storage == jnp.int8:
    amax = jnp.max(jnp.abs(kept), axis=1).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    values = jnp.clip(jnp.round(kept.astype(jnp.float32) / scale[:, None]), -127, 127)
    values = values.astype(jnp.int8)
  else:
    values = kept.astype(storage)

  if position_format == "bitmask":
    positions = bits
  else:
    index = jnp.broadcast_to(jnp.arange(bits.shape[1] * 8, dtype=jnp.int32), target.shape)
    positions = jnp.zeros((groups * k,), _index_dtype(n)).at[target.reshape(-1)].set(
        index.reshape(-1).astype(_index_dtype(n)), mode="drop",
        unique_indices=True).reshape(groups, k)
  return Packed(positions=positions, values=values, scale=scale, shape=tuple(x.shape),
                dtype=jnp.dtype(x.dtype), granularity=granularity,
                position_format=position_format)


def _dequantize(packed: Packed, dtype) -> jax.Array:
  if packed.scale is None:
    return packed.values.astype(dtype)
  return (packed.values.astype(jnp.float32) * packed.scale[:, None]).astype(dtype)


def unpack(packed: Packed, after: Optional[jax.Array] = None) -> jax.Array:
  """The dense array: kept values in place, zeros elsewhere.

  Args:
    packed: what `pack` returned.
    after: optional array (a cotangent) that the result must not be computed
      before. XLA allocates backward-only buffers whose inputs exist early (the
      scatter's zeros, the unpacked mask) at program start, which keeps a dense
      copy of every layer alive at once; a data dependency on the cotangent
      moves them to where the backward needs them.
  """
  groups = packed.values.shape[0]
  n = packed.group_size
  values = _dequantize(packed, packed.dtype)
  positions = packed.positions
  if after is not None:
    positions = depend(positions, after)
  if packed.position_format == "bitmask":
    is_set, slot = _bit_slots(positions)
    gathered = jnp.take_along_axis(values, jnp.minimum(slot, packed.k - 1), axis=1)
    dense = jnp.where(is_set, gathered, 0)[:, :n]
  else:
    rows = jnp.arange(groups, dtype=jnp.int32)[:, None]
    zeros = depend(jnp.zeros((groups, n), packed.dtype), positions)
    dense = zeros.at[rows, positions.astype(jnp.int32)].set(values, mode="drop",
                                                              unique_indices=True)
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
