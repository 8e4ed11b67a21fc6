"""Razor layers against their flax twins: same params, same forward, Back Razor gradients."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from razor_jax import layers, ops
from razor_jax.policy import Policy

F32, BF16 = jnp.float32, jnp.bfloat16
KEY = jax.random.PRNGKey(0)
CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _rand(key, shape, dtype=F32, scale=1.0):
  return (scale * jax.random.normal(jax.random.PRNGKey(key), shape, F32)).astype(dtype)


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _mha_reference(p, x, policy, mask=None):
  """Back Razor self-attention from the ops' sort-based reference twins."""
  dense = policy.spec("dense")
  proj = lambda name: ops.dense_general_reference(x, p[name]["kernel"], p[name]["bias"], dense)
  q, k, v = proj("query"), proj("key"), proj("value")
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  logits = ops.attention_logits_reference(q, k, policy.spec("attention"))
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  o = ops.softmax_attend_reference(logits, v, policy.spec("attention"),
                                   p_spec=policy.spec("softmax"))
  return ops.dense_general_reference(o, p["out"]["kernel"], p["out"]["bias"], dense, (-2, -1))


# name: (razor class, flax class, fields, input shape, weight leaf, whether dx is exact at
# 0.9, the layer's Back Razor computation from the ops' reference twins).
CASES = {
    "dense": (layers.RazorDense, nn.Dense, dict(features=8), (4, 6, 16), ("kernel",), True,
              lambda p, x, pol: ops.dense_reference(x, p["kernel"], p["bias"],
                                                    pol.spec("dense"))),
    "dense_general": (
        layers.RazorDenseGeneral, nn.DenseGeneral, dict(features=(2, 4), axis=(-2, -1)),
        (4, 3, 16), ("kernel",), True,
        lambda p, x, pol: ops.dense_general_reference(x, p["kernel"], p["bias"],
                                                      pol.spec("dense"), (-2, -1))),
    "layer_norm": (layers.RazorLayerNorm, nn.LayerNorm, dict(epsilon=1e-5), (4, 6, 16),
                   ("scale",), False,
                   lambda p, x, pol: ops.layer_norm_reference(x, p["scale"], p["bias"],
                                                              pol.spec("layer_norm"), 1e-5)),
    "conv": (layers.RazorConv, nn.Conv, dict(features=4, kernel_size=(3, 3), strides=2),
             (2, 8, 8, 3), ("kernel",), True,
             lambda p, x, pol: ops.conv_reference(x, p["kernel"], p["bias"], pol.spec("conv"),
                                                window_strides=(2, 2), padding="SAME",
                                                dimension_numbers=CONV_DIMS)),
    "mha": (layers.RazorMultiHeadDotProductAttention, nn.MultiHeadDotProductAttention,
            dict(num_heads=4), (2, 5, 16), ("query", "kernel"), False, _mha_reference),
}


def _value_and_grad(module, cot):
  """jit of (params, x) -> (output, (d params, d x)) for the cotangent `cot`."""
  def run(p, x):
    y, vjp = jax.vjp(module.apply, p, x)
    return y, vjp(cot.astype(y.dtype))
  return jax.jit(run)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_flax(case, dtype):
  razor_cls, flax_cls, fields, shape, weight, dx_exact, _ = CASES[case]
  fields = dict(fields, dtype=dtype)
  x = _rand(0, shape, dtype)
  flax_layer = flax_cls(**fields)
  params = jax.jit(flax_layer.init)(KEY, x)
  # Same names, shapes, dtypes and values from the same rng.
  razor_params = jax.jit(razor_cls(**fields).init)(KEY, x)
  chex.assert_trees_all_equal_shapes_and_dtypes(razor_params, params)
  chex.assert_trees_all_equal(razor_params, params)

  y = jax.jit(flax_layer.apply)(params, x)
  cot = _rand(1, y.shape)
  _, grads = _value_and_grad(flax_layer, cot)(params, x)
  # 0.0 runs flax's own code: everything identical.
  chex.assert_trees_all_equal(
      _value_and_grad(razor_cls(prune_ratio=0.0, **fields), cot)(params, x), (y, grads))

  layer = razor_cls(prune_ratio=0.9, **fields)
  chex.assert_trees_all_equal(jax.jit(layer.apply)(params, x), y)
  # The primal computed alongside the residuals is bit-identical too.
  razor_y, razor_grads = _value_and_grad(layer, cot)(params, x)
  chex.assert_trees_all_equal(razor_y, y)
  exact_w = np.asarray(_leaf(grads[0]["params"], weight), np.float32)
  razor_w = np.asarray(_leaf(razor_grads[0]["params"], weight), np.float32)
  assert np.all(np.isfinite(razor_w))
  assert not np.allclose(razor_w, exact_w, rtol=1e-2, atol=1e-3)
  if dx_exact:  # dx = g . kernel does not read x
    chex.assert_trees_all_equal(razor_grads[1], grads[1])


# mha: see test_mha_self_attention_with_causal_mask_is_back_razor.
@pytest.mark.parametrize("case", [c for c in CASES if c != "mha"])
def test_layer_gradients_are_back_razor(case):
  """At the default policy every gradient equals the ops' sort-based reference computation."""
  razor_cls, _, fields, shape, _, _, reference = CASES[case]
  policy = Policy()  # what a layer given neither knob uses
  x = _rand(0, shape)
  layer = razor_cls(**fields)
  params = jax.jit(layer.init)(KEY, x)
  cot = _rand(1, jax.eval_shape(layer.apply, params, x).shape)
  _, got = _value_and_grad(layer, cot)(params, x)
  want = jax.jit(jax.grad(lambda p, x: jnp.sum(reference(p["params"], x, policy) * cot),
                          argnums=(0, 1)))(params, x)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_policy_is_the_other_way_to_give_the_knob():
  x = _rand(0, (4, 16))
  params = nn.Dense(8).init(KEY, x)
  cot = _rand(1, (4, 8))
  _, exact = _value_and_grad(nn.Dense(8), cot)(params, x)
  _, got = _value_and_grad(layers.RazorDense(8, policy=Policy(0.0)), cot)(params, x)
  chex.assert_trees_all_equal(got, exact)
  # The dense entry of the policy is the one a dense layer reads.
  _, got = _value_and_grad(layers.RazorDense(8, policy=Policy.make(0.0, dense=0.5)), cot)(
      params, x)
  assert not np.allclose(got[0]["params"]["kernel"], exact[0]["params"]["kernel"])
  # Neither given: the default policy, 0.8.
  _, default = _value_and_grad(layers.RazorDense(8), cot)(params, x)
  chex.assert_trees_all_equal(
      default, _value_and_grad(layers.RazorDense(8, prune_ratio=0.8), cot)(params, x)[1])
  assert layers.RazorDense(8).razor_policy == Policy(0.8) == Policy()


@pytest.mark.parametrize("fields", [
    dict(padding="VALID", use_bias=False),
    dict(padding=((1, 0), (2, 1)), kernel_dilation=2),
    dict(padding="CIRCULAR", strides=(2, 1)),
    dict(padding=1, feature_group_count=3, input_dilation=2),
])
def test_conv_options_forward(fields):
  x = _rand(0, (2, 7, 7, 3))
  flax_conv = nn.Conv(features=6, kernel_size=(3, 3), **fields)
  params = flax_conv.init(KEY, x)
  razor = layers.RazorConv(features=6, kernel_size=(3, 3), **fields)
  chex.assert_trees_all_equal(razor.init(KEY, x), params)
  chex.assert_trees_all_equal(jax.jit(razor.apply)(params, x),
                              jax.jit(flax_conv.apply)(params, x))


def test_conv_batch_axes_and_1d_causal():
  x = _rand(0, (2, 3, 9, 4))  # two batch axes for a 1-D conv
  for padding in ("CAUSAL", "SAME"):
    flax_conv = nn.Conv(features=5, kernel_size=(3,), padding=padding)
    params = flax_conv.init(KEY, x)
    razor = layers.RazorConv(features=5, kernel_size=(3,), padding=padding)
    y = razor.apply(params, x)
    assert y.shape == (2, 3, 9, 5)
    chex.assert_trees_all_equal(y, flax_conv.apply(params, x))


def test_dense_general_middle_axis_and_unsupported():
  x = _rand(0, (3, 5, 4))
  flax_layer = nn.DenseGeneral(features=(2, 3), axis=1)
  params = flax_layer.init(KEY, x)
  razor = layers.RazorDenseGeneral(features=(2, 3), axis=1)
  chex.assert_trees_all_equal(razor.init(KEY, x), params)
  chex.assert_trees_all_equal(razor.apply(params, x), flax_layer.apply(params, x))
  with pytest.raises(ValueError, match="batch_dims"):
    layers.RazorDenseGeneral(features=4, batch_dims=(0,)).init(KEY, x)


def test_layer_norm_options():
  x = _rand(0, (3, 5, 16), BF16)
  # bf16 params and input, float32 output: flax casts its float32 result, not a bf16 one.
  for fields in (dict(use_bias=False), dict(use_scale=False, epsilon=1e-3),
                 dict(param_dtype=BF16, dtype=F32)):
    flax_ln = nn.LayerNorm(**fields)
    params = flax_ln.init(KEY, x)
    razor = layers.RazorLayerNorm(**fields)
    chex.assert_trees_all_equal_shapes_and_dtypes(razor.init(KEY, x), params)
    y = razor.apply(params, x)
    chex.assert_trees_all_equal(y, flax_ln.apply(params, x))
  with pytest.raises(ValueError, match="reduction_axes"):
    layers.RazorLayerNorm(reduction_axes=(-2, -1)).init(KEY, x)
  params = nn.LayerNorm().init(KEY, x)
  with pytest.raises(ValueError, match="mask"):
    layers.RazorLayerNorm().apply(params, x, mask=jnp.ones(x.shape, bool))


def _causal(length):
  return nn.make_causal_mask(jnp.ones((1, length)))


def test_mha_loads_flax_params_with_mask_and_cross_attention():
  xq, xkv, xv = _rand(0, (2, 5, 16)), _rand(1, (2, 7, 12)), _rand(3, (2, 7, 12))
  fields = dict(num_heads=2, qkv_features=8, out_features=10)
  flax_mha = nn.MultiHeadDotProductAttention(**fields)
  razor = layers.RazorMultiHeadDotProductAttention(**fields)
  params = jax.jit(flax_mha.init)(KEY, xq, xkv)
  chex.assert_trees_all_equal(jax.jit(razor.init)(KEY, xq, xkv), params)
  mask = jnp.arange(7)[None, None, None, :] < 4
  # Cross-attention with keys, with separate values, and with a padding mask.
  apply = jax.jit(lambda module, *args, mask=None: module.apply(params, *args, mask=mask),
                  static_argnums=0)
  for args, m in [((xq, xkv), None), ((xq, xkv, xv), None), ((xq, xkv), mask)]:
    chex.assert_trees_all_equal(apply(razor, *args, mask=m), apply(flax_mha, *args, mask=m))

  cot = _rand(2, (2, 5, 10))
  grads = jax.jit(jax.grad(lambda p, module: jnp.sum(module.apply(p, xq, xkv, mask=mask) * cot)),
                  static_argnums=1)
  exact, pruned = grads(params, flax_mha), grads(params, razor)
  # Every weight gradient moves, the output projection's too: its input is pruned.
  for path in [("query", "kernel"), ("key", "kernel"), ("value", "kernel"), ("out", "kernel")]:
    assert not np.allclose(_leaf(pruned["params"], path), _leaf(exact["params"], path),
                           rtol=1e-2, atol=1e-3), path


def test_mha_self_attention_with_causal_mask_is_back_razor():
  x = _rand(0, (2, 6, 16))
  mask = _causal(6)
  razor = layers.RazorMultiHeadDotProductAttention(num_heads=4)
  params = jax.jit(nn.MultiHeadDotProductAttention(num_heads=4).init)(KEY, x)
  y = jax.jit(lambda p, x: nn.MultiHeadDotProductAttention(num_heads=4).apply(p, x, mask=mask))(
      params, x)
  chex.assert_trees_all_equal(jax.jit(lambda p, x: razor.apply(p, x, mask=mask))(params, x), y)
  cot = _rand(1, y.shape)
  got = jax.jit(jax.grad(lambda p, x: jnp.sum(razor.apply(p, x, mask=mask) * cot), (0, 1)))(
      params, x)
  want = jax.jit(jax.grad(
      lambda p, x: jnp.sum(_mha_reference(p["params"], x, Policy(), mask) * cot), (0, 1)))(
          params, x)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fields, kwargs", [
    (dict(normalize_qk=True, use_bias=False), {}),
    (dict(force_fp32_for_softmax=True, dtype=BF16), {}),
    (dict(dropout_rate=0.3, broadcast_dropout=False), dict(deterministic=False)),
])
def test_mha_options_forward(fields, kwargs):
  x = _rand(0, (2, 5, 16), BF16)
  rngs = {"dropout": jax.random.PRNGKey(7)}
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=2, **fields)
  razor = layers.RazorMultiHeadDotProductAttention(num_heads=2, **fields)
  init = lambda module: jax.jit(lambda k, x: module.init(k, x, **kwargs))(KEY, x)
  params = init(flax_mha)
  chex.assert_trees_all_equal(init(razor), params)

  apply = jax.jit(lambda module, p: module.apply(p, x, rngs=rngs, sow_weights=True,
                                                 mutable="intermediates", **kwargs),
                  static_argnums=0)
  # Output and sown attention weights.
  chex.assert_trees_all_equal(apply(razor, params), apply(flax_mha, params))
  if kwargs.get("deterministic") is False:
    # Dropout runs softmax-V exactly; the rest still differentiates.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(razor, p)[0].astype(F32))))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_mha_fp32_softmax_in_bf16_matches_flax():
  """force_fp32_for_softmax with bf16 compute through the razor softmax-V op: flax's
  float32 probabilities make the output float32; razor's forward is flax's, bit for bit."""
  x = _rand(0, (2, 5, 16), BF16)
  fields = dict(num_heads=2, dtype=BF16, force_fp32_for_softmax=True)
  flax_mha = nn.MultiHeadDotProductAttention(**fields)
  params = jax.jit(flax_mha.init)(KEY, x)
  want = jax.jit(flax_mha.apply)(params, x)
  for ratio in (0.0, 0.9):
    razor = layers.RazorMultiHeadDotProductAttention(prune_ratio=ratio, **fields)
    got = jax.jit(razor.apply)(params, x)
    assert got.dtype == want.dtype
    chex.assert_trees_all_equal(got, want)
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(razor.apply(p, x).astype(F32)), (0, 1)))(
        params, x)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))


def test_mha_projects_each_distinct_input_once(monkeypatch):
  """q, k and v made from one array go through one dense_multi (one packed copy)."""
  xq, xkv, xv = _rand(0, (2, 5, 16)), _rand(1, (2, 7, 16)), _rand(2, (2, 7, 16))
  razor = layers.RazorMultiHeadDotProductAttention(num_heads=2)
  params = jax.jit(razor.init)(KEY, xq)
  kernels_per_call = []
  dense_multi = ops.dense_multi

  def counting(x, kernels, *args, **kwargs):
    if len(kernels) > 1:
      kernels_per_call.append(len(kernels))
    return dense_multi(x, kernels, *args, **kwargs)

  monkeypatch.setattr(ops, "dense_multi", counting)
  for args, want in [((xq,), [3]), ((xq, xkv), [2]), ((xq, xkv, xv), [])]:
    kernels_per_call.clear()
    jax.eval_shape(lambda p: razor.apply(p, *args), params)
    assert kernels_per_call == want, args


def test_mha_unsupported():
  x = _rand(0, (2, 5, 16))
  with pytest.raises(ValueError, match="decode=True"):
    layers.RazorMultiHeadDotProductAttention(num_heads=2, decode=True).init(KEY, x)
  with pytest.raises(ValueError, match="attention_fn"):
    layers.RazorMultiHeadDotProductAttention(
        num_heads=2, attention_fn=lambda q, k, v, **kw: v).init(KEY, x)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "most"])
def test_bad_prune_ratio(bad):
  for make in (lambda: layers.RazorDense(4, prune_ratio=bad),
               lambda: layers.RazorLayerNorm(prune_ratio=bad),
               lambda: layers.RazorConv(4, (3,), prune_ratio=bad),
               lambda: layers.RazorMultiHeadDotProductAttention(2, prune_ratio=bad)):
    with pytest.raises(ValueError, match=r"prune_ratio must be (a float )?in \[0, 1\)"):
      make()


def test_bad_policy_or_both_knobs():
  with pytest.raises(ValueError, match="policy must be a razor_jax.Policy"):
    layers.RazorDense(4, policy=0.9)
  for make in (lambda: layers.RazorDense(4, prune_ratio=0.9, policy=Policy(0.0)),
               lambda: layers.RazorDenseGeneral(4, prune_ratio=0.0, policy=Policy(0.5)),
               lambda: layers.RazorMultiHeadDotProductAttention(2, prune_ratio=0.5,
                                                                policy=Policy(0.5))):
    with pytest.raises(ValueError, match="got both prune_ratio=.* and policy=.*; pass one"):
      make()
