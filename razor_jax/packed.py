"""The packed residual of Back Razor: `pack`, `unpack` and what they cost.

`pack(x, prune_ratio)` keeps the K largest magnitudes of each group of `x` (a batch
sample, or a row of the last axis; `selection`) and stores them as positions plus
values (`codecs`); `unpack(packed)` rebuilds the dense array with zeros elsewhere.
Every shape in the packed form is static, so it can be a custom-VJP residual inside
`jit` and `scan`.

Two layouts, by granularity:

- "sample" groups (`Packed`, the paper's rule): positions as a bitmask or as indices,
  whichever is smaller, or on request Elias-Fano coded; values by default as bfloat16
  numbers in 15 bits (sign, exponent relative to the group's largest, 7-bit mantissa),
  optionally int8 with a per-group scale, or float16 / float32. At 0.9 pruning, 2.50
  bits per element by default, 2.03 with Elias-Fano positions.
- "token" rows (`RowPacked`, a token's features or one query's attention row): one
  uint8 buffer per array holding, per row, the Elias-Fano code of the increasing
  positions and the values, by default in 4 bits (`codecs.encode_log4`); about 1.0
  bit per element at 0.9 for a row of 1024. One buffer, so a scanned layer stacks one
  array per residual instead of three (each is a kernel on GPU).

`bits_per_element` reports what a layout costs for a shape.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from razor_jax import barriers, codecs, selection

GRANULARITIES = ("sample", "token")
# Which elements a group keeps (see `keep_count`): "exact_k", K = round((1 - ratio) n)
# with ties at the threshold broken by position; "threshold", the original PyTorch
# code's rule: num_small = clip(floor(n ratio), 1, n), keep |a| >= the num_small-th
# smallest |a| of the group, ties included (sample groups only).
KEEP_RULES = ("exact_k", "threshold")
VALUE_FORMATS = ("auto", "bfloat16", "float16", "float32", "int8", "log4", "sign", "ulog3")
POSITION_FORMATS = ("auto", "bitmask", "indices", "elias_fano")
# What token rows accept ("auto" first: it resolves to the next one).
ROW_VALUE_FORMATS = ("auto", "log4", "sign", "ulog3", "int8", "bfloat16", "float16", "float32")
# Row formats that drop the sign: only for rows that are never negative (probabilities).
UNSIGNED_VALUE_FORMATS = ("ulog3",)
ROW_POSITION_FORMATS = ("auto", "elias_fano", "indices")


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


def group_shape(shape, granularity: str, row_ndim: int = 1) -> tuple[int, int]:
  """(number of groups, elements per group) for an array of `shape`.

  "sample" groups are the batch elements; "token" groups are rows of the last
  `row_ndim` axes (a token's features, or one query's attention probabilities).
  """
  check_granularity(granularity)
  if len(shape) == 0:
    raise ValueError("cannot prune a scalar: expected an array with a batch axis")
  size = math.prod(shape)
  if granularity == "sample":
    groups = shape[0]
  else:
    if not 1 <= row_ndim <= len(shape):
      raise ValueError(f"row_ndim={row_ndim} must be between 1 and the {len(shape)} axes of"
                       f" shape {tuple(shape)}")
    row = math.prod(shape[len(shape) - row_ndim:])
    groups = size // row if row else 0
  if groups == 0 or size == 0:
    raise ValueError(f"cannot prune an empty array of shape {tuple(shape)}")
  return groups, size // groups


def check_keep_rule(keep_rule: str, granularity: str = "sample") -> str:
  if keep_rule not in KEEP_RULES:
    raise ValueError(f"keep_rule must be one of {KEEP_RULES}, got {keep_rule!r}")
  if keep_rule == "threshold" and granularity != "sample":
    raise ValueError("keep_rule='threshold' (the original code's rule) prunes per sample;"
                     f" got granularity={granularity!r}: use granularity='sample'")
  return keep_rule


def keep_count(group_size: int, prune_ratio: float, keep_rule: str = "exact_k") -> int:
  """K = round((1 - prune_ratio) * n), at least 1: every group keeps its largest element.

  The floor of one matters only for short groups (5 elements or fewer at 0.9: a tiny
  model's token rows or attention heads), whose kept fraction is then 1 / n; the
  original code's rule keeps at least one as well.

  keep_rule "threshold": the least number kept, n - num_small + 1 with num_small =
  clip(floor(n * prune_ratio), 1, n) (the num_small-th smallest is kept too); ties with
  it are kept on top of that (see `pack`).
  """
  ratio = check_prune_ratio(prune_ratio)
  if check_keep_rule(keep_rule) == "threshold":
    num_small = min(max(int(math.floor(group_size * ratio)), 1), group_size)
    return group_size - num_small + 1
  return min(max(int(round((1.0 - ratio) * group_size)), 1), group_size)


def _value_format(value_format: str, dtype) -> str:
  """The storage actually used by sample groups: "auto" resolved against the input dtype."""
  if value_format not in VALUE_FORMATS:
    raise ValueError(f"value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
  check_formats("sample", value_format, "auto")
  if value_format == "auto":
    # bf16 keeps float32's range; float16 inputs are stored as they are.
    return "float16" if jnp.dtype(dtype) == jnp.float16 else "bfloat16"
  return value_format


def _storage_dtype(value_format: str, dtype) -> jnp.dtype:
  """The dtype whose numbers the stored values are (int8: before the scale)."""
  return jnp.dtype(_value_format(value_format, dtype))


def _index_dtype(group_size: int):
  return jnp.dtype(jnp.uint16) if group_size <= 2**16 else jnp.dtype(jnp.int32)


def _position_bytes(group_size: int, k: int) -> dict:
  """Bytes per group of each position format."""
  _, upper_words, low_words = codecs.ef_layout(group_size, k)
  return {"bitmask": 4 * codecs.bitmask_words(group_size),
          "indices": k * _index_dtype(group_size).itemsize,
          "elias_fano": 4 * (upper_words + low_words)}


def choose_position_format(group_size: int, k: int) -> str:
  """The smaller of a bitmask (1 bit per element, padded to whole words) and indices."""
  sizes = _position_bytes(group_size, k)
  return "indices" if sizes["indices"] < sizes["bitmask"] else "bitmask"


@struct.dataclass
class Packed:
  """A pruned activation: positions and values of the kept elements of each group.

  positions: a uint32 bitmask (groups, num_words) in the layout of `codecs.bitmask`;
    indices (groups, K) (uint16, or int32 past 65536 elements per group); or the
    uint32 Elias-Fano code of the bitmask (see `codecs.ef_layout`).
  values: the kept elements in bitmask order (indices: in the order of
    `positions`). value_format "bfloat16": a uint8 payload (groups,
    1 + K + 7 ceil(K / 8)) of 15 bits per value (see `codecs.encode_bf16`); "int8":
    (groups, K) int8 steps of `scale`; "float16" / "float32": (groups, K) floats.
  scale: "int8" only: the float32 (groups,) step; else None.
  ties: keep rule "threshold" only: uint32 (groups, 2, num_words) bitmasks of the
    elements tied with the smallest kept magnitude t beyond the K stored (positive,
    then negative ones); they unpack as +t and -t. Else None.
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
  ties: Optional[jax.Array] = None

  @property
  def group_size(self) -> int:
    return math.prod(self.shape) // self.values.shape[0]

  def nbytes(self) -> int:
    leaves = [a for a in (self.positions, self.values, self.scale, self.ties) if a is not None]
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)

  def bits_per_element(self) -> float:
    """Stored bits per element of the original activation (every stored byte)."""
    return 8.0 * self.nbytes() / math.prod(self.shape)


@struct.dataclass
class RowPacked:
  """A pruned activation in token rows: per row, the positions and values of its K kept.

  data: uint8 (rows, bytes); per row the position code (Elias-Fano, see
    `codecs.row_ef_encode`, or b-bit indices in bit planes) then the value code
    (`codecs.encode_log4`'s codes and row ends, or int8 steps and their float32
    scale, or floats), laid out as `layout` says.
  """
  data: jax.Array
  k: int = struct.field(pytree_node=False)
  shape: tuple = struct.field(pytree_node=False)
  dtype: jnp.dtype = struct.field(pytree_node=False)
  row_ndim: int = struct.field(pytree_node=False)
  position_format: str = struct.field(pytree_node=False)
  value_format: str = struct.field(pytree_node=False)
  layout: tuple = struct.field(pytree_node=False)  # ((per-row shape, dtype), ...) in `data`

  granularity = "token"

  @property
  def group_size(self) -> int:
    return math.prod(self.shape[len(self.shape) - self.row_ndim:])

  def nbytes(self) -> int:
    return math.prod(self.data.shape)

  def bits_per_element(self) -> float:
    """Stored bits per element of the original activation (every stored byte)."""
    return 8.0 * self.nbytes() / math.prod(self.shape)


def check_formats(granularity: str, value_format: str, position_format: str):
  """Raises unless `granularity` stores values and positions in these formats."""
  if granularity == "token":
    if value_format not in ROW_VALUE_FORMATS:
      raise ValueError(f"token rows store values as one of {ROW_VALUE_FORMATS}, got"
                       f" value_format={value_format!r}")
    if position_format not in ROW_POSITION_FORMATS:
      raise ValueError(f"token rows store positions as one of {ROW_POSITION_FORMATS}, got"
                       f" position_format={position_format!r}")
  elif value_format in ("log4", "sign", "ulog3"):
    raise ValueError(f"value_format={value_format!r} codes token rows (granularity='token');"
                     " sample groups store 'bfloat16', 'int8', 'float16' or 'float32'")


def _row_formats(value_format: str, position_format: str, dtype) -> tuple[str, str]:
  check_formats("token", value_format, position_format)
  if value_format == "auto":
    value_format = "log4"
  if position_format == "auto":
    position_format = "elias_fano"
  return value_format, position_format


def index_bits(n: int) -> int:
  """Bits of a position in a row of n elements."""
  return max(1, (n - 1).bit_length())


def _pack_rows(x, prune_ratio: float, row_ndim: int, value_format: str,
               position_format: str) -> RowPacked:
  rows, n = group_shape(x.shape, "token", row_ndim)
  k = keep_count(n, prune_ratio)
  value_format, position_format = _row_formats(value_format, position_format, x.dtype)
  flat = x.reshape(rows, n)
  pos = selection.topk_rows(flat, k)
  kept = jnp.take_along_axis(flat, pos, axis=1)
  if position_format == "elias_fano":
    parts = [codecs.row_ef_encode(pos, n)]
  else:
    parts = [codecs.pack_planes(pos, index_bits(n))]
  if value_format == "log4":
    parts += list(codecs.encode_log4(kept))
  elif value_format == "sign":
    parts += list(codecs.encode_sign(kept))
  elif value_format == "ulog3":
    parts += list(codecs.encode_ulog3(kept))
  elif value_format == "int8":
    parts += list(codecs.encode_int8(kept))
  else:
    parts.append(kept.astype(value_format))
  layout = tuple((tuple(a.shape[1:]), jnp.dtype(a.dtype).name) for a in parts)
  return RowPacked(data=codecs.to_bytes(parts, rows), k=k, shape=tuple(x.shape),
                   dtype=jnp.dtype(x.dtype), row_ndim=row_ndim,
                   position_format=position_format, value_format=value_format, layout=layout)


def _row_values(packed: RowPacked, parts) -> jax.Array:
  if packed.value_format == "log4":
    return codecs.decode_log4(parts[1], parts[2], packed.k)
  if packed.value_format == "sign":
    return codecs.decode_sign(parts[1], parts[2], packed.k)
  if packed.value_format == "ulog3":
    return codecs.decode_ulog3(parts[1], parts[2], packed.k)
  if packed.value_format == "int8":
    return codecs.decode_int8(parts[1], parts[2], jnp.float32)
  return parts[1]


def _unpack_rows(packed: RowPacked) -> jax.Array:
  rows, n, k = packed.data.shape[0], packed.group_size, packed.k
  parts = codecs.from_bytes(packed.data, packed.layout)
  if packed.position_format == "elias_fano":
    pos = codecs.row_ef_decode(parts[0], n, k)
  else:
    pos = codecs.unpack_planes(parts[0], index_bits(n), k)
  values = _row_values(packed, parts).astype(packed.dtype)
  index = jnp.arange(rows, dtype=jnp.int32)[:, None]
  # In place into zeros made from the positions (see barriers.zeros_after).
  zeros = barriers.zeros_after((rows, n), packed.dtype, pos)
  dense = zeros.at[index, pos].set(values, mode="drop", unique_indices=True)
  return dense.reshape(packed.shape)


def _encode(kept: jax.Array, value_format: str):
  """(values, scale) for the kept elements (groups, K)."""
  if value_format == "bfloat16":
    return codecs.encode_bf16(kept), None
  if value_format == "int8":
    return codecs.encode_int8(kept)
  return kept.astype(value_format), None


def _decode(packed: Packed) -> jax.Array:
  """The kept values (groups, K): bfloat16 for that format, else the packed dtype."""
  if packed.value_format == "bfloat16":
    return codecs.decode_bf16(packed.values, packed.k)
  if packed.value_format == "int8":
    return codecs.decode_int8(packed.values, packed.scale, packed.dtype)
  return packed.values.astype(packed.dtype)


def pack(x: jax.Array, prune_ratio: float, granularity: str = "sample", *,
         value_format: str = "auto", position_format: str = "auto", row_ndim: int = 1,
         keep_rule: str = "exact_k"):
  """Keeps the top-K magnitudes of each group of `x` in a compact static-shape form.

  Args:
    x: floating array whose first axis is the batch.
    prune_ratio: fraction pruned, in [0, 1); K = round((1 - prune_ratio) * n).
    granularity: "sample" (top-K over each batch element by exact magnitude, the
      paper's rule; a `Packed`) or "token" (top-K of each row of the last `row_ndim`
      axes by bfloat16 magnitude; a `RowPacked`). Ties keep the lower positions.
    value_format: storage of kept values. Sample groups: "auto" (float16 for float16
      input, else "bfloat16"), "bfloat16" (bfloat16 numbers in 15 bits), "float16",
      "float32" or "int8" (with a per-group float32 scale). Token rows: "auto"
      (= "log4", 4 bits), "log4", "sign" (1 bit: the sign, with the row's mean
      kept magnitude), "ulog3" (3 bits: log4's level without the sign, for rows that
      are never negative; a negative value is stored as its magnitude), "int8",
      "bfloat16", "float16", "float32".
    position_format: sample groups: "auto" (the smaller of "bitmask" and "indices"),
      "bitmask", "indices" or "elias_fano". Token rows: "auto" (= "elias_fano") or
      "indices" (b-bit indices).
    row_ndim: for "token", how many trailing axes make a row.
    keep_rule: "exact_k" (above) or "threshold" (the original code's rule, sample
      groups: every |a| >= the num_small-th smallest is kept, ties included; the K of
      `keep_count` are stored as above, the ties beyond them as two sign bitmasks).
  """
  x = jnp.asarray(x)
  check_keep_rule(keep_rule, granularity)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"pack expects a floating-point array, got dtype {x.dtype}")
  if check_granularity(granularity) == "token":
    return _pack_rows(x, prune_ratio, row_ndim, value_format, position_format)
  if barriers.straight_line():
    raise ValueError(
        "granularity='sample' selects with data-dependent loops and conditionals, which"
        " can hang a run of several processes (see barriers.straight_line); use"
        " granularity='token' (the default) there")
  groups, n = group_shape(x.shape, granularity)
  k = keep_count(n, prune_ratio, keep_rule)
  if position_format not in POSITION_FORMATS:
    raise ValueError(f"position_format must be one of {POSITION_FORMATS}, got {position_format!r}")
  if position_format == "auto":
    position_format = choose_position_format(n, k)
  value_format = _value_format(value_format, x.dtype)

  flat = x.reshape(groups, n)
  words = selection.topk_words(flat, k)
  index, _, _ = codecs.select_bits(words, k)
  pos = codecs.element_positions(index, n)
  kept = barriers.materialize(lambda a, p: jnp.take_along_axis(a, p, axis=1), flat, pos)
  values, scale = _encode(kept, value_format)
  if position_format == "bitmask":
    positions = words
  elif position_format == "indices":
    positions = pos.astype(_index_dtype(n))
  else:
    positions = codecs.ef_encode(index, n)
  ties = _tie_masks(flat, kept, words) if keep_rule == "threshold" else None
  return Packed(positions=positions, values=values, scale=scale, k=k, shape=tuple(x.shape),
                dtype=jnp.dtype(x.dtype), granularity=granularity,
                position_format=position_format, value_format=value_format, ties=ties)


def _tie_masks(flat, kept, words):
  """(groups, 2, words) bitmasks of the elements tied with the smallest kept magnitude
  that the K stored values leave out: positive ones, then negative ones.

  The original keeps every |a| >= t; ties there have magnitude t, so their sign is all
  there is to store (a float input rarely has any, but an input with many zeros does).
  """
  n = flat.shape[1]
  t = jnp.min(jnp.abs(kept), axis=1, keepdims=True)

  def extra(positive):
    def fn(flat, t, words):
      left_out = (jnp.abs(flat) == t) & ~codecs.bitmask_to_mask(words, n)
      return left_out & ((flat > 0) if positive else (flat < 0))
    return fn

  return jnp.stack([codecs.bitmask(extra(True), flat, t, words),
                    codecs.bitmask(extra(False), flat, t, words)], axis=1)


def _add_ties(dense, packed: Packed, values):
  """`dense` (groups, n) with the ties of `packed` set to +-t, t the smallest stored magnitude."""
  n = dense.shape[1]
  t = jnp.min(jnp.abs(values.astype(jnp.float32)), axis=1, keepdims=True).astype(dense.dtype)
  pos = codecs.bitmask_to_mask(packed.ties[:, 0], n)
  neg = codecs.bitmask_to_mask(packed.ties[:, 1], n)
  return jnp.where(pos, t, jnp.where(neg, -t, dense))


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
    packed = barriers.depend(packed, after)
  if isinstance(packed, RowPacked):
    return _unpack_rows(packed)
  groups, n, k = packed.values.shape[0], packed.group_size, packed.k
  # Decoded once per kept value: XLA would otherwise fuse the decoding into the
  # gather below and redo it for each of the n elements. Kept as bfloat16 (exact)
  # so that the table the gather reads is half the size.
  values = barriers.materialize(_decode, packed)
  if packed.position_format != "indices":
    words = packed.positions
    if packed.position_format == "elias_fano":
      words = barriers.materialize(lambda code: codecs.ef_decode(code, n, k), words)
    lanes = codecs.bitmask_lanes(n)
    # Materialized: fused into the gather, the prefix sum is redone per element.
    start = barriers.materialize(lambda a: codecs.word_starts(a)[0], words)

    def blocks(words, start, values):
      # Elements as (group, block, bit of byte, word of block, byte of word), see
      # `codecs.bitmask`; each takes the value of its rank among the set bits of its row.
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
    zeros = barriers.zeros_after((groups, n), packed.dtype, packed.positions)
    dense = zeros.at[rows, packed.positions.astype(jnp.int32)].set(
        values, mode="drop", unique_indices=True)
  if packed.ties is not None:
    dense = _add_ties(dense.astype(packed.dtype), packed, values)
  return dense.reshape(packed.shape).astype(packed.dtype)


def prune_reference(x: jax.Array, prune_ratio: float, granularity: str = "sample",
                    value_format: str = "auto", row_ndim: int = 1,
                    keep_rule: str = "exact_k") -> jax.Array:
  """Dense masked copy that `unpack(pack(x))` must equal; written with plain jnp."""
  check_keep_rule(keep_rule, granularity)
  groups, n = group_shape(x.shape, granularity, row_ndim)
  k = keep_count(n, prune_ratio, keep_rule)
  flat = x.reshape(groups, n)
  if keep_rule == "threshold":
    value_format = _value_format(value_format, x.dtype)
    # The original's kthvalue: the num_small-th smallest magnitude, every one >= it kept.
    mags = jnp.abs(flat).astype(jnp.float32)
    t = jnp.sort(mags, axis=1)[:, n - k]
    mask = mags >= t[:, None]
  elif granularity == "token":
    value_format, _ = _row_formats(value_format, "auto", x.dtype)
    mask = selection.rows_mask_reference(flat, k)
  else:
    value_format = _value_format(value_format, x.dtype)
    mask = selection.mask_reference(flat, k)
  kept = jnp.where(mask, flat, 0).astype(jnp.float32)
  if value_format == "int8":
    amax = jnp.max(jnp.abs(kept), axis=1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    out = jnp.clip(jnp.round(kept / scale), -127, 127) * scale
  elif value_format == "log4":
    out = _log4_reference(kept, mask)
  elif value_format == "ulog3":
    out = jnp.abs(_log4_reference(kept, mask))
  elif value_format == "sign":
    # One magnitude per row, the mean of the K kept (bfloat16), with each one's sign;
    # averaged over the K gathered in position order, as the codec does, so that the
    # float32 sum rounds alike before the bfloat16 rounding.
    mean = jnp.mean(jnp.abs(jnp.take_along_axis(kept, _kept_positions(mask, k), axis=1)),
                    axis=1, keepdims=True).astype(jnp.bfloat16).astype(jnp.float32)
    out = jnp.where(jnp.signbit(kept), -mean, mean)
  else:
    out = kept.astype(value_format)
  return jnp.where(mask, out, 0).reshape(x.shape).astype(x.dtype)


def _kept_positions(mask: jax.Array, k: int) -> jax.Array:
  """(groups, K) positions of a mask's K set elements per row, in order."""
  return jnp.argsort(~mask, axis=1, stable=True)[:, :k]


def _log4_reference(kept: jax.Array, mask: jax.Array) -> jax.Array:
  """Each kept magnitude rounded to the nearest of 7 geometric levels from the row's
  smallest nonzero to its largest kept magnitude (both rounded to bfloat16); zeros and
  signs kept."""
  a = jnp.abs(kept)
  hi = jnp.max(a, axis=1, keepdims=True).astype(jnp.bfloat16).astype(jnp.float32)
  lo = jnp.min(jnp.where(mask & (a > 0), a, jnp.inf), axis=1, keepdims=True)
  lo = jnp.where(jnp.isfinite(lo), lo, 0.0).astype(jnp.bfloat16).astype(jnp.float32)
  levels = lo * (hi / jnp.where(lo > 0, lo, 1.0)) ** (jnp.arange(7) / 6.0)[None, :]
  # Nearest level in log space.
  dist = jnp.abs(jnp.log(jnp.maximum(a, 1e-38))[:, :, None]
                 - jnp.log(jnp.maximum(levels, 1e-38))[:, None, :])
  level = jnp.take_along_axis(levels, jnp.argmin(dist, axis=2), axis=1)
  level = jnp.where(a > 0, level, 0.0)
  return jnp.where(kept < 0, -level, level)



def bits_per_element(shape, prune_ratio: float, granularity: str = "sample",
                     dtype=jnp.float32, value_format: str = "auto",
                     position_format: str = "auto", row_ndim: int = 1) -> float:
  """Bits stored per original element when packing an array of `shape` (no compute)."""
  spec = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  out = jax.eval_shape(lambda a: pack(a, prune_ratio, granularity, value_format=value_format,
                                      position_format=position_format, row_ndim=row_ndim),
                       spec)
  return out.bits_per_element()
