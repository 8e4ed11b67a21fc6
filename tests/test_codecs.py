"""The storage codes: bitmask layout, rank and select, the 15-bit bfloat16 code."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layout_reference
from razor_jax import codecs

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def test_bitmask_layout_and_selection_helpers():
  rng = np.random.default_rng(0)
  for n in (256 * 9, 1000):
    mask = rng.random((3, n)) < 0.3
    words = codecs.bitmask(lambda m: m, jnp.asarray(mask))
    assert words.shape == (3, codecs.bitmask_words(n)) and words.dtype == jnp.uint32
    np.testing.assert_array_equal(layout_reference.bitmask_to_mask(words, n), mask)
    np.testing.assert_array_equal(codecs.bitmask_to_mask(words, n), mask)
    # _select lists the set bits word by word, then bit by bit within a word.
    count = int(mask.sum(axis=1).max()) + 5
    pos, valid, total = codecs.select(words, count, n)
    np.testing.assert_array_equal(total, mask.sum(axis=1))
    lanes = codecs.bitmask_lanes(n)
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
    np.testing.assert_array_equal(codecs._prefix_sum(jnp.asarray(a), 32 * 32),
                                  np.cumsum(a, axis=1))
  w = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
  w[:3] = [1, 2**31, 2**32 - 1]
  r = np.array([rng.integers(0, max(1, bin(int(v)).count("1"))) for v in w], np.int32)
  got = codecs.select_in_word(jnp.asarray(w), jnp.asarray(r))
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
  payload = codecs.encode_bf16(jnp.asarray(v, jnp.float32))
  assert payload.dtype == jnp.uint8 and payload.shape[1] == 1 + v.shape[1] + 7 * -(-v.shape[1] // 8)
  out = codecs.decode_bf16(payload, v.shape[1])
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
