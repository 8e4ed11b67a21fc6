"""pack / unpack of sample groups: exact K per group, the K largest magnitudes, zeros elsewhere, every format."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layout_reference
from razor_jax import codecs, packed

SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
  shape = tuple(draw(st.lists(st.integers(1, 9), min_size=2, max_size=3)))
  shape = (shape[0],) + tuple(s * 4 for s in shape[1:])  # rows of at least 4 elements
  granularity = "sample"  # token rows (RowPacked) are tested in test_rows.py
  _, n = packed.group_shape(shape, granularity)
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


def _groups(a, granularity):
  g, n = packed.group_shape(a.shape, granularity)
  return np.asarray(a.astype(jnp.float32)).reshape(g, n)


def _kept_mask(stored):
  g, n = stored.values.shape[0], stored.group_size
  if stored.position_format == "elias_fano":
    return layout_reference.bitmask_to_mask(
        layout_reference.ef_to_bitmask(stored.positions, n, stored.k), n)
  if stored.position_format == "bitmask":
    return layout_reference.bitmask_to_mask(stored.positions, n)
  idx = np.asarray(stored.positions).astype(np.int64)
  assert all(len(set(row)) == len(row) for row in idx), "indices must be distinct"
  kept = np.zeros((g, n), bool)
  np.put_along_axis(kept, idx, True, axis=1)
  return kept


def _pack(x, ratio, granularity="sample", **formats):
  # Jitted: one compile of the whole selection is faster than running it op by op.
  return jax.jit(lambda a: packed.pack(a, ratio, granularity, **formats))(x)


def _check_pack(x, ratio, granularity="sample", position_format="auto", value_format="auto"):
  stored = _pack(x, ratio, granularity, position_format=position_format,
                 value_format=value_format)
  dense = packed.unpack(stored)
  assert dense.shape == x.shape and dense.dtype == x.dtype
  xs, ds = _groups(x, granularity), _groups(dense, granularity)
  k = packed.keep_count(xs.shape[1], ratio)
  kept = _kept_mask(stored)
  assert (kept.sum(axis=1) == k).all()
  assert (ds[~kept] == 0).all()
  mags = np.abs(xs)
  for row in range(xs.shape[0]):
    if k < xs.shape[1]:
      assert mags[row][kept[row]].min() >= mags[row][~kept[row]].max()
  # Kept values round-trip up to the storage dtype.
  storage = packed._storage_dtype(value_format, x.dtype)
  want = np.asarray(jnp.asarray(xs).astype(storage).astype(jnp.float32))
  np.testing.assert_array_equal(ds[kept], want[kept])
  # The sort-based reference picks the same set (ties go to the lowest position).
  np.testing.assert_array_equal(np.asarray(dense, np.float32),
                                np.asarray(packed.prune_reference(x, ratio, granularity,
                                                                  value_format), np.float32))
  return stored


@SETTINGS
@given(cases(), st.sampled_from(["bitmask", "indices", "elias_fano"]),
       st.sampled_from(["auto", "float32"]))
def test_pack_keeps_exactly_the_k_largest(case, position_format, value_format):
  x, ratio, granularity = case
  _check_pack(x, ratio, granularity, position_format, value_format)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "aliased", "wide", "constant"])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.97])
def test_long_groups_exact_whether_the_bracket_holds_or_not(kind, ratio):
  # Long groups take the sampled threshold search; these kinds defeat its bracket or not
  # (test_selection checks which), and pack must be exact either way.
  _check_pack(layout_reference.long_group(kind, seed=int(ratio * 100)), ratio)


def test_ties_keep_the_lowest_positions_in_long_groups():
  n = 1 << 15
  x = jnp.ones((1, n)).at[0, 5000:5100].set(2.0)
  stored = _check_pack(x, 0.9)  # K = 3277: the 100 twos, then the first 3177 ones
  kept = _kept_mask(stored)[0]
  assert kept[:3177].all() and kept[5000:5100].all() and kept.sum() == 3277


def test_pack_bf16_round_trip_end_to_end():
  # Kept values over a wide range, negatives, subnormal-free: unpack gives bf16(x) exactly.
  x = layout_reference.long_group("wide", seed=3)
  stored = _check_pack(x, 0.9)
  assert stored.values.dtype == jnp.uint8 and stored.scale is None


# ----------------------------------------------------------------- other formats, API

@SETTINGS
@given(cases())
def test_int8_values_within_half_a_step(case):
  x, ratio, granularity = case
  dense = packed.unpack(_pack(x, ratio, granularity, value_format="int8"))
  ds = _groups(dense, granularity)
  ref = _groups(packed.prune_reference(x, ratio, granularity, "float32"), granularity)
  step = np.abs(ref).max(axis=1, keepdims=True) / 127
  tol = step / 2 + 1e-6 + np.abs(ref) * 4e-3  # and one ulp of a 16-bit input dtype
  assert (np.abs(ds - ref) <= tol).all()
  assert ((ds != 0) <= (ref != 0)).all()


@pytest.mark.parametrize("value_format", ["float16", "float32", "int8"])
def test_other_value_formats_on_long_groups(value_format):
  x = layout_reference.long_group("normal", seed=4)
  if value_format == "int8":
    dense = packed.unpack(packed.pack(x, 0.9, value_format="int8"))
    ref = packed.prune_reference(x, 0.9, value_format="int8")
    np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=1e-6)
  else:
    _check_pack(x, 0.9, value_format=value_format)


@pytest.mark.slow
def test_pack_is_jit_and_vmap_safe():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 64))
  stored = jax.jit(lambda a: packed.pack(a, 0.9))(x)
  np.testing.assert_array_equal(packed.unpack(stored), packed.prune_reference(x, 0.9))
  per = jax.vmap(lambda a: packed.unpack(packed.pack(a, 0.9)))(x)
  np.testing.assert_array_equal(per, jnp.stack([packed.prune_reference(a, 0.9) for a in x]))
  long = layout_reference.long_group("normal", seed=5)
  stored = jax.jit(lambda a: packed.pack(a, 0.9))(long)
  np.testing.assert_array_equal(packed.unpack(stored), packed.prune_reference(long, 0.9))


VIT_B = (32, 197, 768)


@pytest.mark.parametrize("ratio,bf16,int8", [(0.8, 4.0, 2.6), (0.9, 2.5, 1.8),
                                              (0.95, 1.75, 1.4), (0.97, 1.41, 1.2)])
def test_bits_per_element(ratio, bf16, int8):
  # Bitmask 1 bit per element (0.97: int32 indices), bf16 values in 15 bits, int8 in 8.
  # K rounds to the nearest integer and a few bytes per group are padding or scale.
  assert packed.bits_per_element(VIT_B, ratio) <= bf16 + 1e-3
  assert packed.bits_per_element(VIT_B, ratio, value_format="int8") <= int8 + 1e-3
  assert packed.bits_per_element(VIT_B, 0.9) <= 2.6  # the bound


def test_bits_count_every_stored_byte():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 500))
  for value_format in ("auto", "int8", "float16"):
    for position_format in ("bitmask", "indices", "elias_fano"):
      p = packed.pack(x, 0.9, value_format=value_format, position_format=position_format)
      stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(p))
      assert p.nbytes() == stored
      assert p.bits_per_element() == 8 * stored / x.size


@pytest.mark.parametrize("ratio,bits", [(0.8, 3.851), (0.9, 2.026), (0.95, 1.063), (0.97, 0.662)])
def test_elias_fano_bits_and_round_trip(ratio, bits):
  # About K (L + 2) + N / 2**L position bits instead of the bitmask's N.
  assert packed.bits_per_element(VIT_B, ratio, position_format="elias_fano") <= bits
  x = layout_reference.long_group("normal", seed=6)
  stored = _check_pack(x, ratio, position_format="elias_fano")
  assert stored.positions.dtype == jnp.uint32


def test_elias_fano_extreme_ratios():
  # L = 0 (keeping more than half) and L > 8 (keeping under 1/256).
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4096))
  for ratio in (0.0, 0.3, 0.999):
    stored = _check_pack(x, ratio, position_format="elias_fano")
    low = codecs.ef_layout(4096, stored.k)[0]
    assert (low == 0) if ratio < 0.5 else (low > 8)


def test_auto_position_format_is_the_smaller():
  # n > 65536 takes int32 indices: at 0.9 the bitmask is smaller, at 0.97 the indices.
  assert packed.pack(jnp.ones((1, 70000)), 0.9).position_format == "bitmask"
  assert packed.pack(jnp.ones((1, 70000)), 0.97).position_format == "indices"


@pytest.mark.parametrize("bad,match", [
    (dict(prune_ratio=1.0), r"prune_ratio must be in \[0, 1\)"),
    (dict(prune_ratio=-0.5), r"prune_ratio must be in \[0, 1\)"),
    (dict(prune_ratio="a lot"), r"prune_ratio must be a float in \[0, 1\)"),
    (dict(granularity="row"), r"granularity must be one of \('sample', 'token'\)"),
    (dict(value_format="int4"), r"value_format must be one of"),
    (dict(position_format="rle"), r"position_format must be one of"),
])
def test_bad_arguments(bad, match):
  kwargs = dict(prune_ratio=0.9, granularity="sample") | bad
  with pytest.raises(ValueError, match=match):
    packed.pack(jnp.ones((2, 64)), **kwargs)


def test_non_float_input():
  with pytest.raises(ValueError, match="floating-point array, got dtype int32"):
    packed.pack(jnp.ones((2, 64), jnp.int32), 0.9)


def test_every_group_keeps_at_least_its_largest_element():
  # K = round(0.1 * 4) = 0 would prune a 4-element row entirely: the floor of one keeps
  # its largest magnitude (the original code's rule keeps one as well).
  assert [packed.keep_count(n, 0.9) for n in (1, 4, 5, 6, 14, 16, 64)] == [1, 1, 1, 1, 1, 2, 6]
  assert packed.keep_count(64, 0.999) == 1
  x = jnp.array([[0.5, -3.0, 1.0, 2.0], [4.0, 0.1, -0.2, 0.3]])
  np.testing.assert_array_equal(packed.unpack(_pack(x, 0.9, "token")),
                                [[0.0, -3.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
