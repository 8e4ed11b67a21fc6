"""Properties of pack / unpack: exact K per group, the K largest magnitudes, zeros elsewhere."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from razor_jax import compress

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
  shape = tuple(draw(st.lists(st.integers(1, 9), min_size=2, max_size=3)))
  shape = (shape[0],) + tuple(s * 4 for s in shape[1:])  # rows of at least 4 elements
  granularity = draw(st.sampled_from(compress.GRANULARITIES))
  _, n = compress.group_shape(shape, granularity)
  ratio = draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.97]))
  if round((1 - ratio) * n) < 1:
    ratio = 0.5
  seed = draw(st.integers(0, 2**16))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  # Few distinct values make ties at the threshold likely; exact zeros too.
  discrete = draw(st.booleans())
  x = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
  if discrete:
    x = jnp.round(x * 2) / 2
  return x.astype(dtype), ratio, granularity


def _long_group(kind: str, seed: int, n: int = 1 << 15):
  """Two groups long enough for the sampled bracket, in shapes that defeat it or not."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, n)).astype(np.float32)
  if kind == "ties":  # the threshold lies inside a run of equal values
    x = np.round(x * 4) / 4
  elif kind == "zeros":  # fewer non-zeros than K: the threshold is 0
    x[:, rng.random(n) < 0.95] = 0
  elif kind == "aliased":  # large values exactly where the sample looks (runs of 16, every 31)
    x = x * 1e-3
    sampled = (np.arange(n) // 16) % 31 == 0
    x[:, sampled] = 10 + rng.random((2, sampled.sum()))
  elif kind == "wide":  # magnitudes over 60 binades
    x = x * np.exp2(rng.uniform(-30, 30, (2, n))).astype(np.float32)
  elif kind == "constant":
    x = np.full((2, n), -1.5, np.float32)
  return jnp.asarray(x)


def _bitmask_to_mask(words, n):
  """Numpy decoding of the documented layout (compress._bitmask), to check it independently."""
  lanes = 32 if n % 256 == 0 else 4
  e = np.arange(n)
  byte = (e // (8 * lanes)) * lanes + e % lanes
  bit = 8 * (byte % 4) + (e // lanes) % 8  # words are little-endian groups of 4 bytes
  return ((np.asarray(words)[:, byte // 4] >> bit.astype(np.uint32)) & 1).astype(bool)


def _groups(a, granularity):
  g, n = compress.group_shape(a.shape, granularity)
  return np.asarray(a.astype(jnp.float32)).reshape(g, n)


def _ef_to_bitmask(code, n, k):
  """Numpy decoding of the Elias-Fano code (compress._ef_layout) into bitmask words."""
  low, upper_words, _ = compress._ef_layout(n, k)
  code = np.asarray(code)
  words = np.zeros((code.shape[0], compress._num_words(n)), np.uint32)
  for row, c in enumerate(code):
    upper = np.unpackbits(c[:upper_words].view(np.uint8), bitorder="little")
    at = np.flatnonzero(upper)
    assert len(at) == k
    planes = np.unpackbits(c[upper_words:].view(np.uint8), bitorder="little")
    per = -(-k // 8)
    planes = planes[:8 * per * low].reshape(low, per, 8)  # plane, byte, bit of byte
    j = np.arange(k)
    lows = sum(planes[p, j % per, j // per].astype(np.int64) << p for p in range(low))
    index = ((at - j) << low) | lows
    np.bitwise_or.at(words[row], index >> 5, (1 << (index & 31)).astype(np.uint32))
  return words


def _kept_mask(packed):
  g, n = packed.values.shape[0], packed.group_size
  if packed.position_format == "elias_fano":
    return _bitmask_to_mask(_ef_to_bitmask(packed.positions, n, packed.k), n)
  if packed.position_format == "bitmask":
    return _bitmask_to_mask(packed.positions, n)
  idx = np.asarray(packed.positions).astype(np.int64)
  assert all(len(set(row)) == len(row) for row in idx), "indices must be distinct"
  kept = np.zeros((g, n), bool)
  np.put_along_axis(kept, idx, True, axis=1)
  return kept


def _check_pack(x, ratio, granularity="sample", position_format="auto", value_format="auto"):
  packed = compress.pack(x, ratio, granularity, position_format=position_format,
                         value_format=value_format)
  dense = compress.unpack(packed)
  assert dense.shape == x.shape and dense.dtype == x.dtype
  xs, ds = _groups(x, granularity), _groups(dense, granularity)
  k = compress.keep_count(xs.shape[1], ratio)
  kept = _kept_mask(packed)
  assert (kept.sum(axis=1) == k).all()
  assert (ds[~kept] == 0).all()
  mags = np.abs(xs)
  for row in range(xs.shape[0]):
    if k < xs.shape[1]:
      assert mags[row][kept[row]].min() >= mags[row][~kept[row]].max()
  # Kept values round-trip up to the storage dtype.
  storage = compress._storage_dtype(value_format, x.dtype)
  want = np.asarray(jnp.asarray(xs).astype(storage).astype(jnp.float32))
  np.testing.assert_array_equal(ds[kept], want[kept])
  # The sort-based reference picks the same set (ties go to the lowest position).
  np.testing.assert_array_equal(np.asarray(dense, np.float32),
                                np.asarray(compress.prune_reference(x, ratio, granularity,
                                                                    value_format), np.float32))
  return packed


@SETTINGS
@given(cases(), st.sampled_from(["bitmask", "indices", "elias_fano"]),
       st.sampled_from(["auto", "float32"]))
def test_pack_keeps_exactly_the_k_largest(case, position_format, value_format):
  x, ratio, granularity = case
  _check_pack(x, ratio, granularity, position_format, value_format)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "aliased", "wide", "constant"])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.97])
def test_long_groups_exact_whether_the_bracket_holds_or_not(kind, ratio):
  x = _long_group(kind, seed=int(ratio * 100))
  k = compress.keep_count(x.shape[1], ratio)
  plan = compress._bracket_plan(x.shape[1], k)
  *_, ok = jax.jit(compress._bracket, static_argnums=(1, 2))(x, k, plan)
  if kind in ("normal", "wide"):
    assert ok
  elif kind in ("aliased", "constant") or (kind == "zeros" and ratio < 0.97):
    assert not ok  # so the whole-group search runs
  _check_pack(x, ratio)
  # The bracketed search and the whole-group search agree on threshold and tie cut.
  bracketed = jax.jit(compress._threshold, static_argnums=1)(x, k)
  for got, want in zip(bracketed, jax.jit(compress._threshold_full, static_argnums=1)(x, k)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["normal", "gelu", "softmax", "outliers", "bfloat16", "cauchy"])
def test_sampled_bracket_holds_on_typical_activations(kind):
  # The fallback (a search over the whole group) is exact but 4x slower: the bracket
  # and the candidate capacity must hold for activation-like data with room to spare.
  key = jax.random.PRNGKey(7)
  x = {"normal": lambda: jax.random.normal(key, (4, 197 * 768)),
       "gelu": lambda: jax.nn.gelu(jax.random.normal(key, (4, 197 * 768))),
       "softmax": lambda: jax.nn.softmax(3 * jax.random.normal(key, (4, 12 * 197, 197))),
       "outliers": lambda: jax.random.normal(key, (4, 197, 768)) * jnp.where(
           jnp.arange(768) % 97 == 0, 30.0, 1.0),
       "bfloat16": lambda: jax.random.normal(key, (4, 197 * 768)).astype(jnp.bfloat16),
       "cauchy": lambda: jax.random.cauchy(key, (4, 197 * 768))}[kind]()
  x = x.reshape(x.shape[0], -1)
  for ratio in (0.5, 0.8, 0.9, 0.95, 0.97):
    k = compress.keep_count(x.shape[1], ratio)
    plan = compress._bracket_plan(x.shape[1], k)
    *_, count, ok = jax.jit(compress._bracket, static_argnums=(1, 2))(x, k, plan)
    assert ok, (ratio, count, plan)
    assert int(count.max()) <= 0.9 * plan[-1], (ratio, count, plan)


def test_ties_keep_the_lowest_positions_in_long_groups():
  n = 1 << 15
  x = jnp.ones((1, n)).at[0, 5000:5100].set(2.0)
  packed = _check_pack(x, 0.9)  # K = 3277: the 100 twos, then the first 3177 ones
  kept = _kept_mask(packed)[0]
  assert kept[:3177].all() and kept[5000:5100].all() and kept.sum() == 3277


def test_bitmask_layout_and_selection_helpers():
  rng = np.random.default_rng(0)
  for n in (256 * 9, 1000):
    mask = rng.random((3, n)) < 0.3
    words = compress._bitmask(lambda m: m, jnp.asarray(mask))
    assert words.shape == (3, compress._num_words(n)) and words.dtype == jnp.uint32
    np.testing.assert_array_equal(_bitmask_to_mask(words, n), mask)
    np.testing.assert_array_equal(compress.bitmask_to_mask(words, n), mask)
    # _select lists the set bits word by word, then bit by bit within a word.
    count = int(mask.sum(axis=1).max()) + 5
    pos, valid, total = compress._select(words, count, n)
    np.testing.assert_array_equal(total, mask.sum(axis=1))
    lanes = compress._lanes(n)
    for row in range(3):
      e = np.flatnonzero(mask[row])
      byte = (e // (8 * lanes)) * lanes + e % lanes
      order = np.lexsort((8 * (byte % 4) + (e // lanes) % 8, byte // 4))
      np.testing.assert_array_equal(np.asarray(pos[row])[:len(e)], e[order])
      assert np.asarray(valid[row]).sum() == len(e)


def test_prefix_sum_and_select_in_word():
  rng = np.random.default_rng(1)
  for length in (5, 64, 1000, 4096):
    a = rng.integers(0, 33, (3, length)).astype(np.int32)
    np.testing.assert_array_equal(compress._prefix_sum(jnp.asarray(a), 32 * 32),
                                  np.cumsum(a, axis=1))
  w = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
  w[:3] = [1, 2**31, 2**32 - 1]
  r = np.array([rng.integers(0, max(1, bin(int(v)).count("1"))) for v in w], np.int32)
  got = compress._select_in_word(jnp.asarray(w), jnp.asarray(r))
  want = [np.flatnonzero((int(v) >> np.arange(32)) & 1)[i] for v, i in zip(w, r)]
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------- bfloat16 code

def _bf16_expected(v):
  """bfloat16(v) with the documented flush: exponents below (largest finite) - 125 become +-0."""
  b = np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int64)
  exp = (b >> 7) & 255
  top = np.where(exp == 255, 0, exp).max(axis=1, keepdims=True)
  base = np.maximum(top - 125, 0)
  flush = (exp < base) & (exp != 255)
  return np.where(flush, b & 0x8000, b).astype(np.uint16)


def _bf16_round_trip(v):
  payload = compress._encode_bf16(jnp.asarray(v, jnp.float32))
  assert payload.dtype == jnp.uint8 and payload.shape[1] == 1 + v.shape[1] + 7 * -(-v.shape[1] // 8)
  out = compress._decode_bf16(payload, v.shape[1])
  return np.asarray(jax.lax.bitcast_convert_type(out, jnp.uint16))


@SETTINGS
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=70), st.integers(0, 2**16))
def test_bf16_code_any_bit_pattern(patterns, seed):
  # Any float32 (zeros, subnormals, inf, NaN, both signs): bf16 exactly, unless the row's
  # finite values span more than 2**125, where the smallest flush to signed zero.
  v = np.asarray(patterns, np.uint32).view(np.float32)[None]
  v = np.concatenate([v, np.random.default_rng(seed).permutation(v[0])[None]])
  got, want = _bf16_round_trip(v), _bf16_expected(v)
  # NaN payloads may differ between converters; a NaN stays a NaN of the same sign.
  nan = np.isnan(v)
  np.testing.assert_array_equal(np.where(nan, 0, got), np.where(nan, 0, want))
  assert np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()
  np.testing.assert_array_equal(got[nan] >> 15, want[nan] >> 15)


@SETTINGS
@given(st.integers(0, 2**16), st.integers(-149, 100), st.integers(1, 125))
def test_bf16_code_exact_within_125_binades(seed, low, span):
  rng = np.random.default_rng(seed)
  exps = np.minimum(rng.integers(low, low + span + 1, (3, 50)), 127)
  v = rng.choice([-1.0, 1.0], (3, 50)) * rng.uniform(1, 2, (3, 50)) * np.exp2(exps.astype(float))
  v = v.astype(np.float32)
  v[0, :5] = [0.0, -0.0, v[0, 5], -v[0, 5], 1e-45]  # zeros, a tie, the smallest subnormal
  want = v.astype(ml_dtypes.bfloat16).view(np.uint16)
  got = _bf16_round_trip(v)
  if low + span <= -3:  # largest value < 0.5: nothing flushes, subnormals included
    np.testing.assert_array_equal(got, want)
  else:  # rows whose span is within 125 binades are exact
    spans = exps.max(axis=1) - exps.min(axis=1)
    for row in np.flatnonzero(spans <= 120):
      np.testing.assert_array_equal(got[row, 5:], want[row, 5:])
  np.testing.assert_array_equal(got, _bf16_expected(v))


def test_bf16_code_keeps_inf_and_nan_without_flushing_the_rest():
  v = np.array([[np.inf, -np.inf, np.nan, 1e-30, -3.0, 0.0]], np.float32)
  got = _bf16_round_trip(v).view(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(got[0, [0, 1, 4, 5]], [np.inf, -np.inf, -3.0, 0.0])
  assert np.isnan(got[0, 2]) and got[0, 3] == np.float32(ml_dtypes.bfloat16(1e-30))


def test_pack_bf16_round_trip_end_to_end():
  # Kept values over a wide range, negatives, subnormal-free: unpack gives bf16(x) exactly.
  x = _long_group("wide", seed=3)
  packed = _check_pack(x, 0.9)
  assert packed.values.dtype == jnp.uint8 and packed.scale is None


# ----------------------------------------------------------------- other formats, API

@SETTINGS
@given(cases())
def test_int8_values_within_half_a_step(case):
  x, ratio, granularity = case
  dense = compress.unpack(compress.pack(x, ratio, granularity, value_format="int8"))
  xs, ds = _groups(x, granularity), _groups(dense, granularity)
  ref = _groups(compress.prune_reference(x, ratio, granularity, "float32"), granularity)
  step = np.abs(ref).max(axis=1, keepdims=True) / 127
  tol = step / 2 + 1e-6 + np.abs(ref) * 4e-3  # and one ulp of a 16-bit input dtype
  assert (np.abs(ds - ref) <= tol).all()
  assert ((ds != 0) <= (ref != 0)).all()


@pytest.mark.parametrize("value_format", ["float16", "float32", "int8"])
def test_other_value_formats_on_long_groups(value_format):
  x = _long_group("normal", seed=4)
  if value_format == "int8":
    dense = compress.unpack(compress.pack(x, 0.9, value_format="int8"))
    ref = compress.prune_reference(x, 0.9, value_format="int8")
    np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=1e-6)
  else:
    _check_pack(x, 0.9, value_format=value_format)


def test_pack_is_jit_and_vmap_safe():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 64))
  packed = jax.jit(lambda a: compress.pack(a, 0.9))(x)
  np.testing.assert_array_equal(compress.unpack(packed), compress.prune_reference(x, 0.9))
  per = jax.vmap(lambda a: compress.unpack(compress.pack(a, 0.9)))(x)
  np.testing.assert_array_equal(per, jnp.stack([compress.prune_reference(a, 0.9) for a in x]))
  long = _long_group("normal", seed=5)
  packed = jax.jit(lambda a: compress.pack(a, 0.9))(long)
  np.testing.assert_array_equal(compress.unpack(packed), compress.prune_reference(long, 0.9))


VIT_B = (32, 197, 768)


@pytest.mark.parametrize("ratio,bf16,int8", [(0.8, 4.0, 2.6), (0.9, 2.5, 1.8),
                                              (0.95, 1.75, 1.4), (0.97, 1.41, 1.2)])
def test_bits_per_element(ratio, bf16, int8):
  # Bitmask 1 bit per element (0.97: int32 indices), bf16 values in 15 bits, int8 in 8.
  # K rounds to the nearest integer and a few bytes per group are padding or scale.
  assert compress.bits_per_element(VIT_B, ratio) <= bf16 + 1e-3
  assert compress.bits_per_element(VIT_B, ratio, value_format="int8") <= int8 + 1e-3
  assert compress.bits_per_element(VIT_B, 0.9) <= 2.6  # the bound


def test_bits_count_every_stored_byte():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 500))
  for value_format in ("auto", "int8", "float16"):
    for position_format in ("bitmask", "indices", "elias_fano"):
      p = compress.pack(x, 0.9, value_format=value_format, position_format=position_format)
      stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(p))
      assert p.nbytes() == stored
      assert p.bits_per_element() == 8 * stored / x.size


@pytest.mark.parametrize("ratio,bits", [(0.8, 3.851), (0.9, 2.026), (0.95, 1.063), (0.97, 0.662)])
def test_elias_fano_bits_and_round_trip(ratio, bits):
  # About K (L + 2) + N / 2**L position bits instead of the bitmask's N.
  assert compress.bits_per_element(VIT_B, ratio, position_format="elias_fano") <= bits
  x = _long_group("normal", seed=6)
  packed = _check_pack(x, ratio, position_format="elias_fano")
  assert packed.positions.dtype == jnp.uint32


def test_elias_fano_extreme_ratios():
  # L = 0 (keeping more than half) and L > 8 (keeping under 1/256).
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4096))
  for ratio in (0.0, 0.3, 0.999):
    packed = _check_pack(x, ratio, position_format="elias_fano")
    low = compress._ef_layout(4096, packed.k)[0]
    assert (low == 0) if ratio < 0.5 else (low > 8)


def test_auto_position_format_is_the_smaller():
  # n > 65536 takes int32 indices: at 0.9 the bitmask is smaller, at 0.97 the indices.
  assert compress.pack(jnp.ones((1, 70000)), 0.9).position_format == "bitmask"
  assert compress.pack(jnp.ones((1, 70000)), 0.97).position_format == "indices"


@pytest.mark.parametrize("bad,match", [
    (dict(prune_ratio=1.0), r"prune_ratio must be in \[0, 1\)"),
    (dict(prune_ratio=-0.5), r"prune_ratio must be in \[0, 1\)"),
    (dict(prune_ratio="a lot"), r"prune_ratio must be a float in \[0, 1\)"),
    (dict(granularity="row"), r"granularity must be one of \('sample', 'token'\)"),
    (dict(prune_ratio=0.999), r"keeps round\(.*\) = 0 of the 64 elements"),
    (dict(value_format="int4"), r"value_format must be one of"),
    (dict(position_format="rle"), r"position_format must be one of"),
])
def test_bad_arguments(bad, match):
  kwargs = dict(prune_ratio=0.9, granularity="sample") | bad
  with pytest.raises(ValueError, match=match):
    compress.pack(jnp.ones((2, 64)), **kwargs)


def test_non_float_input():
  with pytest.raises(ValueError, match="floating-point array, got dtype int32"):
    compress.pack(jnp.ones((2, 64), jnp.int32), 0.9)
