"""Every razor op against its plain-jnp reference twin and against the plain op."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from razor_jax import ops
from razor_jax.ops import PackSpec

RATIOS = [0.0, 0.5, 0.9, 0.97]
GRANULARITIES = ["sample", "token"]
DTYPES = [jnp.float32, jnp.bfloat16]
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _rand(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)).astype(dtype)


def _check_op(op, ref, plain, args, dtype):
  """Forward bit-identical to `plain`; gradients of all args equal the reference's."""
  fwd = jax.jit(op)(*args)
  np.testing.assert_array_equal(np.asarray(fwd, np.float32),
                                np.asarray(jax.jit(plain)(*args), np.float32))
  cot = _rand(99, fwd.shape, fwd.dtype)
  def vjp_of(f):
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](cot))(*args)
  got, want = vjp_of(op), vjp_of(ref)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), got),
                              jax.tree.map(lambda a: a.astype(jnp.float32), want), **TOL[dtype])
  return got


def _spec(ratio, granularity):
  return PackSpec(ratio, granularity)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", [(4, 40), (3, 9, 48)])
def test_dense(shape, ratio, granularity, dtype):
  spec = _spec(ratio, granularity)
  x, w, b = _rand(0, shape, dtype), _rand(1, (shape[-1], 24), dtype, 0.2), _rand(2, (24,), dtype)
  grads = _check_op(lambda x, w, b: ops.dense(x, w, b, spec),
                    lambda x, w, b: ops.dense_reference(x, w, b, spec),
                    lambda x, w, b: ops.dense(x, w, b, None), (x, w, b), dtype)
  if ratio > 0:  # the pruned weight gradient differs from the exact one
    exact = jax.grad(lambda w: jnp.sum(ops.dense(x, w, b, None).astype(jnp.float32)))(w)
    pruned = jax.grad(lambda w: jnp.sum(ops.dense(x, w, b, spec).astype(jnp.float32)))(w)
    assert not np.allclose(np.asarray(exact, np.float32), np.asarray(pruned, np.float32))
  del grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_dense_general_multi_axis(ratio, dtype):
  spec = _spec(ratio, "sample")
  x, w, b = _rand(0, (2, 5, 3, 8), dtype), _rand(1, (3, 8, 16), dtype, 0.2), _rand(2, (16,), dtype)
  _check_op(lambda x, w, b: ops.dense_general(x, w, b, spec, axis=(-2, -1)),
            lambda x, w, b: ops.dense_general_reference(x, w, b, spec, axis=(-2, -1)),
            lambda x, w, b: ops.dense_general(x, w, b, None, axis=(-2, -1)), (x, w, b), dtype)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_dense_multi_shares_one_residual(ratio):
  spec = _spec(ratio, "sample")
  x = _rand(0, (2, 6, 16), jnp.float32)
  ks = tuple(_rand(i, (16, 4, 4), jnp.float32) for i in (1, 2, 3))
  bs = tuple(_rand(i, (4, 4), jnp.float32) for i in (4, 5, 6))
  f = lambda x, ks, bs: sum(jnp.sum(o * o) for o in ops.dense_multi(x, ks, bs, spec))
  r = lambda x, ks, bs: sum(jnp.sum(ops.dense_general_reference(x, k, b, spec) ** 2)
                            for k, b in zip(ks, bs))
  chex.assert_trees_all_close(jax.grad(f, (0, 1, 2))(x, ks, bs),
                              jax.grad(r, (0, 1, 2))(x, ks, bs), rtol=1e-5, atol=1e-5)
  # One packed copy of x in the residuals, not three.
  _, res = jax.vjp(lambda x: ops.dense_multi(x, ks, bs, spec), x)
  n_packed = sum(1 for leaf in jax.tree.leaves(res) if leaf.dtype == jnp.uint8)
  assert n_packed == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_attention_logits(ratio, granularity, dtype):
  spec = _spec(ratio, granularity)
  q, k = _rand(0, (2, 7, 3, 40), dtype), _rand(1, (2, 7, 3, 40), dtype)
  _check_op(lambda q, k: ops.attention_logits(q, k, spec),
            lambda q, k: ops.attention_logits_reference(q, k, spec),
            lambda q, k: ops.attention_logits(q, k, None), (q, k), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_softmax_attend(ratio, granularity, dtype):
  spec = _spec(ratio, granularity)
  logits, v = _rand(0, (2, 3, 5, 34), dtype, 2.0), _rand(1, (2, 34, 3, 40), dtype)
  _check_op(lambda l, v: ops.softmax_attend(l, v, spec),
            lambda l, v: ops.softmax_attend_reference(l, v, spec),
            lambda l, v: ops.softmax_attend(l, v, None), (logits, v), dtype)


@pytest.mark.parametrize("p_spec,v_spec", [
    (PackSpec(0.7, value_format="log4"), PackSpec(0.8, value_format="sign")),
    (PackSpec(0.8, value_format="ulog3"), PackSpec(0.8, value_format="sign")),
    (None, PackSpec(0.9)),  # probabilities exact, v pruned
    (PackSpec(0.9), None),  # v exact, probabilities pruned
])
def test_softmax_attend_prunes_probabilities_by_their_own_spec(p_spec, v_spec):
  """p_spec (the policy's "softmax" op type) prunes p; spec prunes v."""
  logits, v = _rand(0, (2, 3, 5, 34), jnp.float32, 2.0), _rand(1, (2, 34, 3, 40), jnp.float32)
  grads = _check_op(lambda l, v: ops.softmax_attend(l, v, v_spec, p_spec=p_spec),
                    lambda l, v: ops.softmax_attend_reference(l, v, v_spec, p_spec=p_spec),
                    lambda l, v: ops.softmax_attend(l, v, None), (logits, v), jnp.float32)
  # Each side's gradient is the one its own spec gives: exact where that spec is None.
  shared = jax.vjp(lambda l, v: ops.softmax_attend_reference(l, v, v_spec or p_spec), logits, v)
  exact = jax.vjp(lambda l, v: ops.softmax_attend(l, v, None), logits, v)
  cot = _rand(99, shared[0].shape, jnp.float32)
  d_shared, d_exact = shared[1](cot), exact[1](cot)
  # dv reads p only: exact p gives the exact dv.
  if p_spec is None:
    np.testing.assert_allclose(grads[1], d_exact[1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(grads[0], d_shared[0], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", [(4, 64), (2, 9, 48)])
def test_layer_norm(shape, ratio, granularity, dtype):
  spec = _spec(ratio, granularity)
  x = _rand(0, shape, dtype, 3.0) + 1.0
  s, b = _rand(1, shape[-1:], dtype) + 1.0, _rand(2, shape[-1:], dtype)
  _check_op(lambda x, s, b: ops.layer_norm(x, s, b, spec),
            lambda x, s, b: ops.layer_norm_reference(x, s, b, spec),
            lambda x, s, b: ops.layer_norm(x, s, b, None), (x, s, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", ["uint8", "uint4", "uint2", "bfloat16"])
@pytest.mark.parametrize("approximate", [True, False])
def test_gelu(approximate, storage, dtype):
  x = _rand(0, (3, 5, 31), dtype, 2.0)  # an odd size: the last byte of codes is padded
  _check_op(lambda x: ops.gelu(x, approximate, storage),
            lambda x: ops.gelu_reference(x, approximate, storage),
            lambda x: jax.nn.gelu(x, approximate=approximate), (x,), dtype)
  # Within half a code step of the exact derivative (1.3 / (2**bits - 1)).
  half_step = {"uint8": 0.0026, "uint4": 0.044, "uint2": 0.22, "bfloat16": 0.0}[storage]
  g_exact = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x.astype(jnp.float32), approximate)))(x)
  g = jax.grad(lambda x: jnp.sum(ops.gelu(x, approximate, storage).astype(jnp.float32)))(x)
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_exact, np.float32),
                             atol=half_step + (0.02 if dtype == jnp.bfloat16 else 0.01))
  # The residual is the packed code: 8 // bits derivatives a byte.
  if storage.startswith("uint"):
    _, res = jax.vjp(lambda x: ops.gelu(x, approximate, storage), x)
    (codes,) = jax.tree.leaves(res)
    bits = int(storage[4:])
    assert codes.dtype == jnp.uint8 and codes.size == -(-x.size * bits // 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_is_exact(dtype):
  x = _rand(0, (3, 37), dtype)
  grads = _check_op(ops.relu, ops.relu_reference, jax.nn.relu, (x,), dtype)
  exact = jax.vjp(jax.nn.relu, x)[1](_rand(99, x.shape, dtype))
  chex.assert_trees_all_equal(grads, exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_conv(strides, ratio, granularity, dtype):
  spec = _spec(ratio, granularity)
  x, w, b = _rand(0, (2, 7, 7, 34), dtype), _rand(1, (3, 3, 34, 6), dtype, 0.2), _rand(2, (6,), dtype)
  kw = dict(window_strides=strides, padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _check_op(lambda x, w, b: ops.conv(x, w, b, spec, **kw),
            lambda x, w, b: ops.conv_reference(x, w, b, spec, **kw),
            lambda x, w, b: ops.conv(x, w, b, None, **kw), (x, w, b), dtype)


def _keep_all(granularity="sample"):
  # prune_ratio 0 short-circuits; a ratio that rounds to keeping everything runs the
  # custom VJP and must then reproduce exact autodiff.
  return PackSpec(1e-9, granularity, value_format="float32")


@pytest.mark.parametrize("name", ["dense", "logits", "attend", "layer_norm", "conv"])
def test_custom_vjp_keeping_everything_equals_autodiff(name):
  spec = _keep_all()
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cases = {
      "dense": (lambda s: functools.partial(ops.dense, spec=s, precision="highest"),
                [(3, 5, 16), (16, 8), (8,)]),
      "logits": (lambda s: functools.partial(ops.attention_logits, spec=s), [(2, 5, 3, 8)] * 2),
      "attend": (lambda s: functools.partial(ops.softmax_attend, spec=s), [(2, 3, 5, 5), (2, 5, 3, 8)]),
      "layer_norm": (lambda s: functools.partial(ops.layer_norm, spec=s), [(3, 5, 16), (16,), (16,)]),
      "conv": (lambda s: functools.partial(ops.conv, spec=s, **kw), [(2, 6, 6, 4), (3, 3, 4, 5), (5,)]),
  }
  make, shapes = cases[name]
  args = [_rand(i, s, jnp.float32) for i, s in enumerate(shapes)]
  f_razor, f_plain = make(spec), make(None)
  cot = _rand(99, f_plain(*args).shape, jnp.float32)
  got = jax.vjp(f_razor, *args)[1](cot)
  want = jax.vjp(f_plain, *args)[1](cot)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input_errors():
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match="prune_ratio must be in \\[0, 1\\)"):
    PackSpec(1.0)
  with pytest.raises(ValueError, match="prune_ratio must be in \\[0, 1\\)"):
    PackSpec(-0.1)
  with pytest.raises(ValueError, match="granularity must be one of"):
    PackSpec(0.9, "channel")
  with pytest.raises(ValueError, match="x must be a floating-point array"):
    ops.dense(jnp.ones((2, 8), jnp.int32), jnp.ones((8, 4)), None, PackSpec(0.9))
  with pytest.raises(ValueError, match="does not contract input axes"):
    ops.dense(x, jnp.ones((7, 4)), None, PackSpec(0.9))
  with pytest.raises(ValueError, match="gelu storage must be one of"):
    ops.gelu(x, storage="int4")


def test_softmax_attend_gradient_keeps_the_logits_dtype():
  logits, v = _rand(0, (2, 3, 5, 34), jnp.float32), _rand(1, (2, 34, 3, 40), jnp.bfloat16)
  f = lambda l: jnp.sum(ops.softmax_attend(l, v, PackSpec(0.9)).astype(jnp.float32))
  assert jax.grad(f)(logits).dtype == jnp.float32



def test_softmax_in_float32_follows_flax():
  # flax's force_fp32_for_softmax keeps the weights float32, so weights @ v is float32.
  from flax.linen import attention as flax_attention
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (2, 5, 3, 4)).astype(jnp.bfloat16) for key in ks)
  expected = flax_attention.dot_product_attention(q, k, v, force_fp32_for_softmax=True)
  assert expected.dtype == jnp.float32
  # The logits as flax computes them inside dot_product_attention.
  logits = ops.attention_logits(q / jnp.sqrt(4).astype(jnp.bfloat16), k, None)
  for spec in (None, ops.PackSpec(0.5)):
    out = ops.softmax_attend(logits, v, spec, softmax_in_float32=True)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, expected)
    grads = jax.grad(lambda a, b: jnp.sum(ops.softmax_attend(a, b, spec, softmax_in_float32=True)),
                     argnums=(0, 1))(logits, v)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


@pytest.mark.parametrize("name", ["dense", "logits", "attend", "layer_norm", "conv"])
def test_int8_values_give_the_reference_gradients(name):
  """Kept values stored as int8 steps of a per-sample scale: gradients as the reference's,
  which prunes by a sort and rounds the kept values the same way."""
  spec = PackSpec(0.9, "sample", value_format="int8")
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cases = {
      "dense": (ops.dense, ops.dense_reference, [(3, 5, 48), (48, 8), (8,)], {}),
      "logits": (ops.attention_logits, ops.attention_logits_reference, [(2, 5, 3, 16)] * 2, {}),
      "attend": (ops.softmax_attend, ops.softmax_attend_reference,
                 [(2, 3, 5, 24), (2, 24, 3, 16)], {}),
      "layer_norm": (ops.layer_norm, ops.layer_norm_reference, [(3, 5, 48), (48,), (48,)], {}),
      "conv": (ops.conv, ops.conv_reference, [(2, 6, 6, 4), (3, 3, 4, 5), (5,)], kw),
  }
  op, ref, shapes, extra = cases[name]
  args = [_rand(i, s, jnp.float32) for i, s in enumerate(shapes)]
  grads = _check_op(lambda *a: op(*a, spec, **extra), lambda *a: ref(*a, spec, **extra),
                    lambda *a: op(*a, None, **extra), args, jnp.float32)
  # The rounding is real: the bf16 default stores other values.
  bf16 = jax.vjp(lambda *a: op(*a, PackSpec(0.9, "sample"), **extra), *args)[1](
      _rand(99, jax.eval_shape(lambda *a: op(*a, None, **extra), *args).shape, jnp.float32))
  assert any(not np.array_equal(g, h) for g, h in zip(jax.tree.leaves(grads),
                                                       jax.tree.leaves(bf16)))
