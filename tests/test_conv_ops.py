"""The CNN ops (ReLU6, BatchNorm train/frozen, depthwise/grouped conv) against their references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from razor_jax import conv_ops, ops
from razor_jax.ops import PackSpec

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _rand(key, shape, dtype=jnp.float32, scale=1.0, shift=0.0):
  x = scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32) + shift
  return x.astype(dtype)


def _vjp(f, args, cot):
  return jax.jit(lambda *a: jax.vjp(f, *a)[1](cot))(*args)


def _close(got, want, dtype=jnp.float32):
  f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  chex.assert_trees_all_close(f32(got), f32(want), **TOL[dtype])


# ----------------------------------------------------------------- relu6

def test_relu6_mask_is_the_exact_gradient_and_one_bit():
  # Values on and around both kinks.
  x = jnp.array([-1.0, 0.0, 0.5, 5.9, 6.0, 7.0, 3.0, -0.0] * 4).reshape(2, 4, 4)
  g = _rand(1, x.shape)
  np.testing.assert_array_equal(conv_ops.relu6(x), jax.nn.relu6(x))
  got = _vjp(conv_ops.relu6, (x,), g)[0]
  want = _vjp(conv_ops.relu6_reference, (x,), g)[0]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got != 0, (x > 0) & (x < 6))
  _, res = jax.vjp(conv_ops.relu6, x)
  leaves = jax.tree.leaves(res)
  assert sum(a.size * a.dtype.itemsize for a in leaves) == x.size // 8


def test_relu6_rejects_integers():
  with pytest.raises(ValueError, match="floating-point"):
    conv_ops.relu6(jnp.arange(8))


# ----------------------------------------------------------------- batch norm, train mode

@pytest.mark.parametrize("ratio,dtype", [(0.0, jnp.float32), (0.9, jnp.float32),
                                         (0.5, jnp.bfloat16)])
def test_batch_norm_train_against_reference_and_flax(ratio, dtype):
  import flax.linen as nn
  spec = PackSpec(ratio, "sample")
  x = _rand(0, (4, 6, 6, 8), dtype, 2.0, 0.5)
  scale, bias = _rand(1, (8,), jnp.float32, 0.3, 1.0), _rand(2, (8,), jnp.float32)
  op = lambda x, s, b: conv_ops.batch_norm_train(x, s, b, spec, 1e-3)
  ref = lambda x, s, b: conv_ops.batch_norm_train_reference(x, s, b, spec, 1e-3)
  y, mean, var = jax.jit(op)(x, scale, bias)
  # Bit-identical to flax.linen.BatchNorm in training mode, statistics included.
  bn = nn.BatchNorm(use_running_average=False, epsilon=1e-3, momentum=0.0)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": jnp.zeros(8), "var": jnp.ones(8)}}
  y_flax, updated = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_flax, np.float32))
  np.testing.assert_array_equal(mean, updated["batch_stats"]["mean"])
  np.testing.assert_array_equal(var, updated["batch_stats"]["var"])
  cot = (_rand(3, y.shape, y.dtype), jnp.zeros_like(mean), jnp.zeros_like(var))
  got = _vjp(op, (x, scale, bias), cot)
  _close(got, _vjp(ref, (x, scale, bias), cot), dtype)
  if ratio == 0.0:  # the exact path is flax's gradient
    flax_grads = _vjp(lambda x, s, b: bn.apply(
        {"params": {"scale": s, "bias": b}, "batch_stats": variables["batch_stats"]}, x,
        mutable=["batch_stats"])[0], (x, scale, bias), cot[0])
    _close(got, flax_grads, dtype)
  else:
    exact = _vjp(lambda x, s, b: conv_ops.batch_norm_train(x, s, b, None, 1e-3),
                 (x, scale, bias), cot)
    assert not np.allclose(np.asarray(got[1]), np.asarray(exact[1]))


def test_batch_norm_train_stores_the_pruned_input_only():
  x = _rand(0, (8, 16, 16, 32))
  spec = PackSpec(0.9, "sample")
  _, res = jax.vjp(lambda x: conv_ops.batch_norm_train(x, None, None, spec)[0], x)
  stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(res))
  assert stored < 0.12 * x.size * 4, stored


def test_batch_norm_checks_channels():
  with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
    conv_ops.batch_norm_train(jnp.ones((2, 4, 4, 8)), jnp.ones(4), None, None)
  with pytest.raises(ValueError, match=r"mean must have shape \(8,\)"):
    conv_ops.batch_norm_frozen(jnp.ones((2, 8)), jnp.ones(3), jnp.ones(8), None, None, None)


# ----------------------------------------------------------------- batch norm, frozen mode

@pytest.mark.parametrize("scale_grad", [True, False])
@pytest.mark.parametrize("ratio", [None, 0.0, 0.9])
def test_batch_norm_frozen_against_reference(ratio, scale_grad):
  spec = None if ratio is None else PackSpec(ratio, "sample")
  x = _rand(0, (2, 5, 5, 8), jnp.float32, 2.0)
  mean, var = _rand(1, (8,)), jnp.abs(_rand(2, (8,))) + 0.5
  scale, bias = _rand(3, (8,), shift=1.0), _rand(4, (8,))
  op = lambda x, s, b: conv_ops.batch_norm_frozen(x, mean, var, s, b, spec, 1e-3, scale_grad)
  ref = lambda x, s, b: conv_ops.batch_norm_frozen_reference(x, mean, var, s, b, spec, 1e-3,
                                                             scale_grad)
  y = jax.jit(op)(x, scale, bias)
  plain = jax.jit(lambda x, s, b: conv_ops.batch_norm_apply(x, mean, var, s, b, 1e-3))
  np.testing.assert_array_equal(y, plain(x, scale, bias))
  cot = _rand(5, y.shape)
  got = _vjp(op, (x, scale, bias), cot)
  _close(got, _vjp(ref, (x, scale, bias), cot))
  # The input and bias gradients are always exact: the map is affine.
  exact = _vjp(lambda x, s, b: conv_ops.batch_norm_apply(x, mean, var, s, b, 1e-3),
               (x, scale, bias), cot)
  _close((got[0], got[2]), (exact[0], exact[2]))
  if not scale_grad:
    assert not np.any(got[1])


def test_batch_norm_frozen_stores_nothing_without_a_scale_gradient():
  x = _rand(0, (4, 8, 8, 16))
  mean, var, scale, bias = jnp.zeros(16), jnp.ones(16), jnp.ones(16), jnp.zeros(16)
  stored = lambda **kw: sum(
      a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.vjp(
          lambda x: conv_ops.batch_norm_frozen(x, mean, var, scale, bias, **kw), x)[1])
      if a.size > 16)  # the per-channel vectors aside
  assert stored(spec=None, scale_grad=False) == 0
  assert stored(spec=PackSpec(0.9, "sample")) < 0.12 * x.size * 4
  assert stored(spec=None) == x.size * 4


# ----------------------------------------------------------------- depthwise and grouped conv

@pytest.mark.parametrize("groups,stride,ratio", [(1, 2, 0.9), (4, 1, 0.9), (16, 2, 0.9),
                                                 (16, 1, 0.0)])
def test_grouped_and_depthwise_conv(groups, stride, ratio):
  spec = PackSpec(ratio, "sample")
  x = _rand(0, (2, 9, 9, 16))
  kernel = _rand(1, (3, 3, 16 // groups, 16), scale=0.3)
  kwargs = dict(window_strides=(stride, stride), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  op = lambda x, w: ops.conv(x, w, None, spec, **kwargs)
  ref = lambda x, w: ops.conv_reference(x, w, None, spec, **kwargs)
  y = jax.jit(op)(x, kernel)
  np.testing.assert_array_equal(y, lax.conv_general_dilated(x, kernel, **kwargs))
  cot = _rand(2, y.shape)
  _close(_vjp(op, (x, kernel), cot), _vjp(ref, (x, kernel), cot))


# ----------------------------------------------------------------- token rows (the default)

@pytest.mark.parametrize("estimator", ["none", "energy"])
def test_conv_token_rows_are_image_rows(estimator):
  # A stem conv: 3 channels. Per-pixel rows would keep round(0.3) = 0 at 0.9; a row is
  # one image row (W x C), so the GPU's default granularity works on every CNN conv.
  spec = PackSpec(0.9, "token", estimator=estimator)
  x = _rand(0, (2, 8, 10, 3))
  kernel = _rand(1, (3, 3, 3, 4), scale=0.3)
  kwargs = dict(window_strides=(1, 1), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  op = lambda x, w: ops.conv(x, w, None, spec, **kwargs)
  ref = lambda x, w: ops.conv_reference(x, w, None, spec, **kwargs)
  cot = _rand(2, (2, 8, 10, 4))
  _close(_vjp(op, (x, kernel), cot), _vjp(ref, (x, kernel), cot))
  kept = spec.prune_reference(x, ops.map_row_ndim(x.ndim)) != 0
  np.testing.assert_array_equal(np.sum(np.asarray(kept), axis=(2, 3)), 3)  # round(0.1 * 30)


@pytest.mark.parametrize("frozen", [False, True])
def test_batch_norm_token_rows_against_reference(frozen):
  spec = PackSpec(0.9, "token")
  x = _rand(0, (2, 4, 5, 8), jnp.float32, 2.0, 0.5)
  scale, bias = _rand(1, (8,), shift=1.0), _rand(2, (8,))
  mean, var = _rand(3, (8,)), jnp.abs(_rand(4, (8,))) + 0.5
  if frozen:
    op = lambda x, s, b: conv_ops.batch_norm_frozen(x, mean, var, s, b, spec, 1e-3)
    ref = lambda x, s, b: conv_ops.batch_norm_frozen_reference(x, mean, var, s, b, spec, 1e-3)
    cot = _rand(5, x.shape)
  else:
    op = lambda x, s, b: conv_ops.batch_norm_train(x, s, b, spec, 1e-3)
    ref = lambda x, s, b: conv_ops.batch_norm_train_reference(x, s, b, spec, 1e-3)
    cot = (_rand(5, x.shape), jnp.zeros(8), jnp.zeros(8))
  got = _vjp(op, (x, scale, bias), cot)
  _close(got, _vjp(ref, (x, scale, bias), cot))
  if not frozen:  # the scale's gradient comes from the pruned copy
    exact = _vjp(lambda x, s, b: conv_ops.batch_norm_train(x, s, b, None, 1e-3),
                 (x, scale, bias), cot)
    assert not np.allclose(np.asarray(got[1]), np.asarray(exact[1]))
