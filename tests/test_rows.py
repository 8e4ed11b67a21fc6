"""Token rows (RowPacked): the sort and the search keep the same K per row, codes round-trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from razor_jax import codecs, packed, selection

SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _rows(seed, shape, kind):
  x = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
  if kind == "ties":  # few distinct magnitudes: ties at the threshold in most rows
    x = jnp.round(x * 2) / 2
  elif kind == "zeros":
    x = x.at[:, : shape[1] // 2 + 1].set(0.0)
  elif kind == "heavy":  # outliers an order of magnitude apart, as in ViT activations
    x = x * jnp.where(jnp.arange(shape[1]) % 17 == 0, 30.0, 1.0)
  return x


def _mask(pos, n):
  rows = pos.shape[0]
  return np.asarray(jnp.zeros((rows, n), bool).at[jnp.arange(rows)[:, None], pos].set(True))


@SETTINGS
@given(st.integers(0, 2**16), st.sampled_from([(7, 12), (5, 197), (3, 768), (2, 4100)]),
       st.sampled_from([0.5, 0.9, 0.97]), st.sampled_from(["normal", "ties", "zeros", "heavy"]))
def test_sort_and_search_keep_the_reference_set(seed, shape, ratio, kind):
  x = _rows(seed, shape, kind)
  k = max(1, round((1 - ratio) * shape[1]))
  want = np.asarray(selection.rows_mask_reference(x, k))
  for fn in (selection._topk_rows_sort, selection._topk_rows_search, selection.topk_rows):
    pos = np.asarray(jax.jit(fn, static_argnums=1)(x, k))
    assert pos.shape == (shape[0], k)
    np.testing.assert_array_equal(_mask(pos, shape[1]), want, err_msg=fn.__name__)
  # topk_rows gives the positions in increasing order, whichever backend branch ran.
  pos = np.asarray(selection.topk_rows(x, k))
  assert (np.diff(pos, axis=1) > 0).all()


def test_ties_keep_the_lower_positions():
  x = jnp.asarray([[1.0, 3.0, 3.0, 1.0, 3.0, 1.0, 1.0, 2.0]])
  for fn in (selection._topk_rows_sort, selection._topk_rows_search):
    # K = 4: the three 3s, the 2, and no 1 ...
    assert sorted(np.asarray(fn(x, 4))[0].tolist()) == [1, 2, 4, 7]
    # ... K = 5: then the first 1.
    assert sorted(np.asarray(fn(x, 5))[0].tolist()) == [0, 1, 2, 4, 7]


def test_magnitude_order_is_the_stored_bfloat16():
  # 1.0 and 1.001 are the same bfloat16: a tie, so the lower position is kept.
  x = jnp.asarray([[1.0, 1.001, 0.5, 0.25]])
  assert np.asarray(selection.topk_rows(x, 1)).tolist() == [[0]]


@pytest.mark.parametrize("n,k", [(12, 1), (197, 20), (768, 77), (1024, 102), (4096, 410),
                                 (100, 100), (5000, 7)])
def test_elias_fano_round_trip(n, k):
  rng = np.random.default_rng(n + k)
  pos = np.sort(np.stack([rng.choice(n, k, replace=False) for _ in range(6)]), axis=1)
  pos[0] = np.arange(k)  # the lowest positions
  pos[1] = np.arange(n - k, n)  # the highest
  code = codecs.row_ef_encode(jnp.asarray(pos, jnp.int32), n)
  _, _, nbytes = codecs.row_ef_layout(n, k)
  assert code.shape == (6, nbytes) and code.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(codecs.row_ef_decode(code, n, k)), pos)
  # The GPU's forms of the upper words (a reduction; a compare-count), which the CPU
  # replaces by a scatter and `select_bits`, give the same words and bits.
  low, upper_words, _ = codecs.row_ef_layout(n, k)
  bit = jnp.asarray((pos >> low) + np.arange(k)[None, :], jnp.int32)
  upper = codecs._upper_words_by_reduction(bit, upper_words)
  np.testing.assert_array_equal(np.asarray(upper), np.asarray(codecs._set_bits(bit, upper_words)))
  np.testing.assert_array_equal(np.asarray(codecs._set_bit_indices_by_count(upper, k)),
                                np.asarray(bit))


def test_elias_fano_on_cpu_needs_no_rows_by_words_by_k_buffer():
  # ViT-B/16's MLP rows at batch 32, 20% kept: the reduction's operand alone is 680 MB.
  pos = jax.ShapeDtypeStruct((6304, 614), jnp.int32)
  encode = jax.jit(lambda p: codecs.row_ef_encode(p, 3072)).lower(pos).compile()
  code = jax.eval_shape(lambda p: codecs.row_ef_encode(p, 3072), pos)
  decode = jax.jit(lambda c: codecs.row_ef_decode(c, 3072, 614)).lower(code).compile()
  for compiled in (encode, decode):
    assert compiled.memory_analysis().temp_size_in_bytes < 100e6


def test_elias_fano_is_half_a_bitmask_at_ten_percent():
  for n in (768, 1024, 4096):
    _, _, nbytes = codecs.row_ef_layout(n, round(0.1 * n))
    assert 8 * nbytes / n < 0.6


def test_log4_error_bound_signs_and_zeros():
  kept = jnp.asarray([[1.0, -1.5, 2.0, -1.1, 1.9, 1.2, 1.7, -1.3, 0.0]])
  codes, ends = codecs.encode_log4(kept)
  back = np.asarray(codecs.decode_log4(codes, ends, kept.shape[1]))
  assert codes.shape == (1, 5) and ends.dtype == jnp.bfloat16
  ref = np.asarray(kept)
  nonzero = ref != 0
  np.testing.assert_array_equal(np.sign(back[nonzero]), np.sign(ref[nonzero]))
  # 7 levels from the smallest nonzero (1.0) to the largest (2.0): within half a step
  # in log space of the true magnitude.
  half_step = 2.0 ** (1 / 12)
  ratio = np.abs(back[nonzero]) / np.abs(ref[nonzero])
  assert (ratio <= half_step * 1.001).all() and (ratio >= 1 / half_step / 1.001).all()
  assert back[0, -1] == 0.0  # zeros stay exact
  assert back[0, 0] == 1.0 and back[0, 2] == 2.0  # the ends are levels
  # A row of zeros decodes to zeros.
  codes, ends = codecs.encode_log4(jnp.zeros((1, 4)))
  assert (np.asarray(codecs.decode_log4(codes, ends, 4)) == 0).all()


def test_sign_keeps_signs_and_the_row_mean_magnitude():
  kept = jnp.asarray([[1.0, -1.5, 2.0, -1.1, 1.9, 1.2, 1.7, -1.3, 1.8],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
  codes, scale = codecs.encode_sign(kept)
  back = np.asarray(codecs.decode_sign(codes, scale, kept.shape[1]))
  assert codes.shape == (2, 2) and scale.shape == (2, 1) and scale.dtype == jnp.bfloat16
  mean = float(jnp.asarray(np.abs(np.asarray(kept[0])).mean(), jnp.bfloat16))
  np.testing.assert_array_equal(back[0], np.where(np.asarray(kept[0]) < 0, -mean, mean))
  assert (back[1] == 0).all()  # a row of zeros decodes to zeros


def test_ulog3_decodes_what_log4_decodes_on_rows_that_are_never_negative():
  p = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (6, 40)) * 3.0, axis=-1)
  p = p.at[0, :].set(0.0).at[1, 5:].set(0.0)  # a row of zeros, a row with few nonzeros
  codes, ends = codecs.encode_ulog3(p)
  assert codes.shape == (6, 3 * 5) and codes.dtype == jnp.uint8  # 3 bits a value
  back = np.asarray(codecs.decode_ulog3(codes, ends, 40))
  np.testing.assert_array_equal(back, np.asarray(codecs.decode_log4(*codecs.encode_log4(p), 40)))
  assert (back[0] == 0).all() and (back[1, 5:] == 0).all() and (back[1, :5] > 0).all()
  # A negative value keeps its magnitude, not its sign (Policy allows it for "softmax" only).
  signed = codecs.decode_ulog3(*codecs.encode_ulog3(jnp.asarray([[-2.0, 1.0]])), 2)
  np.testing.assert_array_equal(np.asarray(signed), [[2.0, 1.0]])


@pytest.mark.parametrize("value_format", ["log4", "sign", "int8", "bfloat16", "float32"])
@pytest.mark.parametrize("position_format", ["elias_fano", "indices"])
@pytest.mark.parametrize("shape,row_ndim", [((2, 9, 48), 1), ((2, 5, 4, 16), 2), ((3, 2, 197), 1)])
def test_pack_unpack_equals_the_reference(value_format, position_format, shape, row_ndim):
  for kind in ("normal", "ties", "zeros"):
    x = _rows(3, (int(np.prod(shape[:-1])), shape[-1]), kind).reshape(shape)
    stored = packed.pack(x, 0.9, "token", value_format=value_format,
                         position_format=position_format, row_ndim=row_ndim)
    assert isinstance(stored, packed.RowPacked) and stored.data.dtype == jnp.uint8
    dense = jax.jit(packed.unpack)(stored)
    ref = packed.prune_reference(x, 0.9, "token", value_format, row_ndim)
    assert dense.shape == x.shape and dense.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(dense), np.asarray(ref), rtol=1e-6, atol=1e-7)
    # exactly K per row
    rows = np.asarray(dense).reshape(-1, stored.group_size)
    assert stored.k == packed.keep_count(stored.group_size, 0.9)
    assert (np.count_nonzero(rows, axis=1) <= stored.k).all()


@pytest.mark.parametrize("position_format", ["elias_fano", "indices"])
def test_ulog3_pack_unpack_equals_the_reference(position_format):
  for kind in ("normal", "ties", "zeros"):
    x = jnp.abs(_rows(3, (6, 197), kind)).reshape(2, 3, 197)
    stored = packed.pack(x, 0.8, "token", value_format="ulog3", position_format=position_format)
    ref = packed.prune_reference(x, 0.8, "token", "ulog3")
    np.testing.assert_allclose(np.asarray(jax.jit(packed.unpack)(stored)), np.asarray(ref),
                               rtol=1e-6, atol=1e-7)
    log4 = packed.prune_reference(x, 0.8, "token", "log4")
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(log4))
  # A query's 197 probabilities of ViT-L/16 at 0.8: 0.2 bits an element less than log4.
  shape = (8, 16, 197, 197)
  saved = (packed.bits_per_element(shape, 0.8, "token", value_format="log4")
           - packed.bits_per_element(shape, 0.8, "token", value_format="ulog3"))
  assert saved == pytest.approx(0.2, abs=0.01)


def test_bfloat16_activations_pack_in_their_dtype():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 197, 64)).astype(jnp.bfloat16)
  stored = packed.pack(x, 0.9, "token")
  dense = packed.unpack(stored)
  assert dense.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dense, np.float32),
                             np.asarray(packed.prune_reference(x, 0.9, "token"), np.float32),
                             rtol=1e-2)


def test_bits_per_element_at_the_default():
  # ViT-L/16 rows at 0.9: a token's 1024 features, a query's 197 probabilities, the
  # MLP's 4096 hidden units. Elias-Fano positions and 4-bit values.
  assert packed.bits_per_element((8, 197, 1024), 0.9, "token") == pytest.approx(0.98, abs=0.01)
  assert packed.bits_per_element((8, 16, 197, 197), 0.9, "token") == pytest.approx(1.26, abs=0.01)
  assert packed.bits_per_element((8, 197, 4096), 0.9, "token") == pytest.approx(0.94, abs=0.01)


def test_sign_values_at_0_8_cost_about_what_log4_costs_at_0_9():
  # Twice the positions in a quarter of the value bits each: 1.09 bits per element
  # against 0.98 on a token's 1024 features.
  sign = packed.bits_per_element((8, 197, 1024), 0.8, "token", value_format="sign")
  assert sign == pytest.approx(1.09, abs=0.01)
  assert packed.bits_per_element((8, 197, 1024), 0.9, "token", value_format="sign") < 0.7


def test_bad_formats_name_the_ones_that_fit():
  x = jnp.ones((2, 64))
  with pytest.raises(ValueError, match="token rows store positions as one of"):
    packed.pack(x, 0.9, "token", position_format="bitmask")
  for value_format in ("log4", "sign", "ulog3"):
    with pytest.raises(ValueError, match=f"value_format='{value_format}' codes token rows"):
      packed.pack(x, 0.9, "sample", value_format=value_format)
  with pytest.raises(ValueError, match="row_ndim=3 must be between 1 and the 2 axes"):
    packed.pack(x, 0.9, "token", row_ndim=3)
