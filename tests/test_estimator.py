"""The "energy" estimator and the threshold keep rule in the ops: each against its
reference twin, and the estimator's defining property."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from razor_jax import Policy, block_ops, ops, packed
from razor_jax.ops import PackSpec

SPECS = {
    "sample energy": PackSpec(0.9, "sample", estimator="energy"),
    "token energy": PackSpec(0.9, "token", estimator="energy"),
    "threshold f16": PackSpec(0.9, "sample", "float16", "bitmask", keep_rule="threshold"),
    "threshold f16 energy": PackSpec(0.9, "sample", "float16", "bitmask",
                                     keep_rule="threshold", estimator="energy"),
}


def _inputs():
  k1, k2 = jax.random.split(jax.random.key(3))
  x = jax.random.normal(k1, (3, 10, 16)) * jnp.linspace(0.2, 3.0, 16)
  return x, jax.random.normal(k2, (16, 8)) * 0.3


def _assert_close(got, want):
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dense_matches_its_reference(name):
  spec = SPECS[name]
  x, w = _inputs()
  b = jnp.linspace(-1, 1, 8)
  grad = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a, spec))), (0, 1, 2))(x, w, b)
  _assert_close(grad(ops.dense), grad(ops.dense_reference))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fused_layer_norm_projection_matches_its_reference(name):
  spec = SPECS[name]
  x, w = _inputs()
  scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.2, 0.2, 16)

  def grad(fn):
    return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(a[0], a[1], a[2], [a[3]], [None], spec)[0])),
                    (0, 1, 2, 3))(x, scale, bias, w)
  _assert_close(grad(block_ops.layer_norm_dense_multi),
                grad(block_ops.layer_norm_dense_multi_reference))


@pytest.mark.parametrize("name", ["sample energy", "threshold f16 energy"])
def test_conv_matches_its_reference(name):
  spec = SPECS[name]
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  kw = dict(window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grad = lambda fn: jax.grad(lambda a, k: jnp.sum(jnp.sin(fn(a, k, None, spec, **kw))),
                             (0, 1))(x, w)
  _assert_close(grad(ops.conv), grad(ops.conv_reference))


def test_energy_scales_the_weight_gradient_only():
  """dW grows by each sample's |x|^2 / |x_kept|^2; dx and db are the plain rule's."""
  x, w = _inputs()
  b = jnp.zeros(8)
  plain, energy = PackSpec(0.9, "sample"), PackSpec(0.9, "sample", estimator="energy")
  g = jax.random.normal(jax.random.key(9), (3, 10, 8))
  grads = {s: jax.vjp(lambda *a: ops.dense(*a, s), x, w, b)[1](g) for s in (plain, energy)}
  np.testing.assert_allclose(grads[energy][0], grads[plain][0], rtol=1e-6)
  np.testing.assert_allclose(grads[energy][2], grads[plain][2], rtol=1e-6)
  pruned = packed.prune_reference(x, 0.9)
  scale = (jnp.sum(x**2, axis=(1, 2)) / jnp.sum(pruned**2, axis=(1, 2)))[:, None, None]
  assert float(scale.min()) > 1.5  # 10% kept: the energy fraction is well below 1
  want = jnp.einsum("btd,bte->de", pruned * scale, g)
  np.testing.assert_allclose(grads[energy][1], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_softmax_attend_matches_its_reference(name):
  spec = SPECS[name]
  k1, k2 = jax.random.split(jax.random.key(5))
  logits = jax.random.normal(k1, (2, 3, 12, 12)) * 2  # (batch, heads, queries, keys)
  v = jax.random.normal(k2, (2, 12, 3, 4))
  grad = lambda fn: jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b, spec))), (0, 1))(logits, v)
  _assert_close(grad(ops.softmax_attend), grad(ops.softmax_attend_reference))


def test_gelu_float16_input_matches_its_reference():
  x = jax.random.normal(jax.random.key(2), (4, 33)) * 3
  grad = lambda fn: jax.grad(lambda a: jnp.sum(jnp.sin(fn(a, True, "float16"))))(x)
  np.testing.assert_allclose(grad(ops.gelu), grad(ops.gelu_reference), rtol=1e-6)
  exact = jax.grad(lambda a: jnp.sum(jnp.sin(jax.nn.gelu(a))))(x)
  assert 0 < float(jnp.abs(grad(ops.gelu) - exact).max()) < 1e-2  # rounded to float16


def test_threshold_pack_keeps_ties_and_stores_them_in_sign_bitmasks():
  x = jnp.concatenate([jnp.full((1, 20), 0.5) * jnp.where(jnp.arange(20) % 2, 1, -1),
                       jnp.linspace(1.0, 2.0, 80)[None]], axis=1)
  # n = 100, ratio 0.1: num_small = 10, the 10th smallest |a| is one of the twenty tied
  # 0.5s, so all 100 are kept: 91 stored values, 9 ties in the sign bitmasks.
  p = packed.pack(x, 0.1, value_format="float16", position_format="bitmask",
                  keep_rule="threshold")
  assert p.k == 91 and p.ties is not None
  np.testing.assert_array_equal(packed.unpack(p), x.astype(jnp.float16).astype(jnp.float32))
  np.testing.assert_array_equal(
      packed.unpack(p),
      packed.prune_reference(x, 0.1, value_format="float16", keep_rule="threshold"))


def test_bad_estimator_or_keep_rule_raise_with_the_fix():
  with pytest.raises(ValueError, match="estimator must be one of"):
    PackSpec(0.9, estimator="unbiased")
  with pytest.raises(ValueError, match="use granularity='sample'"):
    PackSpec(0.9, "token", keep_rule="threshold")
  with pytest.raises(ValueError, match="keep_rule must be one of"):
    packed.pack(jnp.ones((2, 8)), 0.5, keep_rule="topk")
  assert Policy(0.9, estimator="energy").spec("dense").estimator == "energy"
