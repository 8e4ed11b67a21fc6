"""Properties of pack / unpack: exact K per group, the K largest magnitudes, zeros elsewhere."""
import jax
import jax.numpy as jnp
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


def _groups(a, granularity):
  g, n = compress.group_shape(a.shape, granularity)
  return np.asarray(a.astype(jnp.float32)).reshape(g, n)


@SETTINGS
@given(cases(), st.sampled_from(["bitmask", "indices"]), st.sampled_from(["auto", "float32"]))
def test_pack_keeps_exactly_the_k_largest(case, position_format, value_format):
  x, ratio, granularity = case
  packed = compress.pack(x, ratio, granularity, position_format=position_format,
                         value_format=value_format)
  dense = compress.unpack(packed)
  assert dense.shape == x.shape and dense.dtype == x.dtype
  xs, ds = _groups(x, granularity), _groups(dense, granularity)
  k = compress.keep_count(xs.shape[1], ratio)
  if position_format == "bitmask":
    kept = np.unpackbits(np.asarray(packed.positions), axis=1, bitorder="little")
    kept = kept[:, :xs.shape[1]].astype(bool)
  else:
    idx = np.asarray(packed.positions).astype(np.int64)
    assert (np.diff(idx, axis=1) > 0).all(), "indices must be sorted and distinct"
    kept = np.zeros(xs.shape, bool)
    np.put_along_axis(kept, idx, True, axis=1)
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


def test_pack_is_jit_and_vmap_safe():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 64))
  packed = jax.jit(lambda a: compress.pack(a, 0.9))(x)
  np.testing.assert_array_equal(compress.unpack(packed), compress.prune_reference(x, 0.9))
  per = jax.vmap(lambda a: compress.unpack(compress.pack(a, 0.9)))(x)
  np.testing.assert_array_equal(per, jnp.stack([compress.prune_reference(a, 0.9) for a in x]))


VIT_B = (32, 197, 768)


@pytest.mark.parametrize("ratio,bound", [(0.8, 4.2), (0.9, 2.6), (0.95, 1.8), (0.97, 1.45)])
def test_bits_per_element(ratio, bound):
  bits = compress.bits_per_element(VIT_B, ratio)
  # K rounds to the nearest integer: up to 16 * 0.5 / n bits over the nominal figure.
  assert bits <= bound + 8 / (197 * 768), bits
  assert compress.bits_per_element(VIT_B, ratio, value_format="int8") < bits


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
