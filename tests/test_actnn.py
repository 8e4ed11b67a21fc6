"""The ActNN-style peer: 2-bit storage, unbiased rounding, ops against their references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from razor_jax import actnn


def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def test_storage_is_two_bits_and_a_range_per_256():
  x = _rand(0, (4, 16, 16, 8))  # 2048 elements per sample: 8 groups
  packed, lo, step = actnn.compress(x)
  assert packed.dtype == jnp.uint8 and packed.size == x.size // 4
  assert lo.size == step.size == x.size // 256
  bits = 8 * sum(a.size * a.dtype.itemsize for a in (packed, lo, step)) / x.size
  assert bits == 2.25
  back = actnn.decompress((packed, lo, step), x.shape, x.dtype)
  np.testing.assert_array_equal(back, actnn.dequantize_reference(x))


def test_rounding_is_unbiased_and_within_one_step():
  x = _rand(1, (64, 4096))
  q = actnn.dequantize_reference(x)
  g = x.reshape(-1, 256)
  step = (g.max(1) - g.min(1)) / 3
  err = (q - x).reshape(-1, 256)
  assert np.all(np.abs(err) <= step[:, None] * 1.0001)
  # Stochastic rounding: the mean error is far below the deterministic rounding's bias.
  assert abs(float(jnp.mean(err / step[:, None]))) < 0.01
  assert float(jnp.mean(jnp.abs(err) / step[:, None])) > 0.2  # and it does round


def _check(op, ref, args, cot):
  y, vjp = jax.vjp(op, *args)
  y_ref, vjp_ref = jax.vjp(ref, *args)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(vjp(cot), vjp_ref(cot), rtol=2e-5, atol=2e-5)


def test_conv_dense_and_batch_norm_against_references():
  x = _rand(2, (2, 8, 8, 16))
  w = _rand(3, (3, 3, 1, 16), 0.3)
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=16)
  cot = _rand(4, x.shape)
  _check(lambda x, w: actnn.conv(x, w, None, **kw),
         lambda x, w: actnn.conv_reference(x, w, None, **kw), (x, w), cot)
  flat, kernel, bias = x.reshape(2, -1), _rand(5, (1024, 10), 0.05), _rand(6, (10,))
  _check(actnn.dense, actnn.dense_reference, (flat, kernel, bias), _rand(7, (2, 10)))
  scale = _rand(8, (16,)) + 1.0
  _check(lambda x, s: actnn.batch_norm_train(x, s, None)[0],
         lambda x, s: actnn.batch_norm_train_reference(x, s, None)[0], (x, scale), cot)
  # The gradient is approximate: the kernel's differs from the exact one.
  exact = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(x, w, **kw) * cot))(w)
  approx = jax.grad(lambda w: jnp.sum(actnn.conv(x, w, None, **kw) * cot))(w)
  assert not np.allclose(exact, approx)
  cos = np.dot(np.ravel(exact), np.ravel(approx)) / np.linalg.norm(exact) / np.linalg.norm(approx)
  assert cos > 0.6, cos  # measured 0.78: 4 levels per group of 256 Gaussian inputs
