"""razorize(): unmodified flax models with Back Razor gradients."""
import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from razor_jax import intercept, layers
from razor_jax.intercept import razorize
from razor_jax.policy import Policy

KEY = jax.random.PRNGKey(0)
IMG = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
COT = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 12))


class Net(nn.Module):
  """Conv -> Dense -> LayerNorm -> self-attention (masked) -> gelu -> Dense.

  The layer classes are fields so that the same net can be built from razor layers;
  explicit names keep both param trees the same.
  """
  conv: type = nn.Conv
  dense: type = nn.Dense
  norm: type = nn.LayerNorm
  attention: type = nn.MultiHeadDotProductAttention
  head: type = nn.Dense

  @nn.compact
  def __call__(self, img):
    h = self.conv(8, (3, 3), strides=2, name="conv")(img)           # (2, 4, 4, 8)
    h = self.dense(16, name="embed")(h.reshape(2, 16, 8))           # (2, 16, 16)
    h = self.norm(name="norm")(h)
    mask = nn.make_causal_mask(jnp.ones((2, 16)))
    h = h + self.attention(num_heads=4, name="attention")(h, mask=mask)
    return self.head(12, name="head")(jax.nn.gelu(h))


PARAMS = jax.jit(Net().init)(KEY, IMG)
RAZOR_NET = Net(layers.RazorConv, layers.RazorDense, layers.RazorLayerNorm,
                layers.RazorMultiHeadDotProductAttention, layers.RazorDense)
WEIGHTS = [("conv", "kernel"), ("embed", "kernel"), ("norm", "scale"),
           ("attention", "query", "kernel"), ("attention", "out", "kernel"), ("head", "kernel")]


def _leaf(tree, path):
  for key in ("params",) + path:
    tree = tree[key]
  return np.asarray(tree)


def _output_and_grads(model, knob=None):
  """jit of params -> (output, param grads), run inside razorize(**knob) unless None."""
  def run(params):
    y, vjp = jax.vjp(lambda p: model.apply(p, IMG), params)
    return y, vjp(COT)[0]

  def traced(params):
    # Entered inside the traced function: jit's cache does not see razorize.
    if knob is None:
      return run(params)
    with razorize(**knob):
      return run(params)

  return jax.jit(traced)(PARAMS)


@functools.cache
def _exact():
  return _output_and_grads(Net())


@pytest.mark.slow
def test_forward_unchanged_and_weight_gradients_are_razor_layers():
  y, grads = _exact()
  razor_y, razor_grads = _output_and_grads(Net(), {})  # razorize(): the default policy
  chex.assert_trees_all_equal(razor_y, y)
  for path in WEIGHTS:
    assert not np.allclose(_leaf(razor_grads, path), _leaf(grads, path), rtol=1e-2, atol=1e-3), path
  # The same net written with razor layers, on the same params, gives the same gradients.
  chex.assert_trees_all_equal(_output_and_grads(RAZOR_NET), (razor_y, razor_grads))


def test_init_and_exact_ratio_are_flax():
  with razorize(0.9):
    params = jax.jit(Net().init)(KEY, IMG)
  chex.assert_trees_all_equal(params, PARAMS)
  chex.assert_trees_all_equal(_output_and_grads(Net(), dict(prune_ratio=0.0)), _exact())


class _Head(nn.Dense):
  """A subclass with its own __call__: razorize must leave it alone."""

  def __call__(self, x):
    return super().__call__(x)


class Branches(nn.Module):
  """Parallel branches on one input, so each module's param grads see exact cotangents."""

  @nn.compact
  def __call__(self, x):
    outs = [
        nn.Dense(12, name="dense")(x),                               # razor
        _Head(12, name="subclass")(x),                              # own __call__: exact
        nn.LayerNorm(reduction_axes=(-2, -1), name="ln_2d")(x)[..., :12],  # unsupported: exact
        nn.DenseGeneral(12, batch_dims=(0,), name="batched")(x),     # unsupported: exact
        nn.SelfAttention(num_heads=2, qkv_features=12, out_features=12, name="self_attn")(x),
    ]
    return sum(outs)


@pytest.mark.filterwarnings("ignore:SelfAttention will be deprecated")
def test_left_alone_subclasses_and_unsupported_configs():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16))
  model = Branches()
  params = jax.jit(model.init)(KEY, x)
  cot = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 12))

  def grads(params, ratio=None):
    f = lambda p: jnp.sum(model.apply(p, x) * cot)
    if ratio is None:
      return jax.grad(f)(params)
    with razorize(ratio):
      return jax.grad(f)(params)

  exact = jax.jit(grads)(params)
  razor = jax.jit(lambda p: grads(p, 0.9))(params)
  for name in ("subclass", "ln_2d", "batched"):
    chex.assert_trees_all_equal(razor["params"][name], exact["params"][name])
  for path in [("dense", "kernel"), ("self_attn", "query", "kernel")]:
    assert not np.allclose(_leaf(razor, path), _leaf(exact, path), rtol=1e-2, atol=1e-3), path


@pytest.mark.slow
def test_policy_per_op_type():
  """The attention entry of a policy reaches QK^T and softmax-V only."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16))
  mha = nn.MultiHeadDotProductAttention(num_heads=4)
  params = jax.jit(mha.init)(KEY, x)

  def grads(policy):
    def f(p):
      with razorize(policy):
        return jnp.sum(mha.apply(p, x) * x)
    return jax.jit(jax.grad(f))(params)["params"]

  exact, full = grads(0.0), grads(0.9)
  attention_only = grads(Policy.make(0.0, attention=0.9))
  dense_only = grads(Policy.make(0.9, attention=0.0))
  same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
  # The output projection reads the exact attention output and the loss's exact
  # cotangent: its gradient depends only on whether "dense" prunes.
  assert same(attention_only["out"]["kernel"], exact["out"]["kernel"])
  assert same(dense_only["out"]["kernel"], full["out"]["kernel"])
  assert not same(dense_only["out"]["kernel"], exact["out"]["kernel"])
  # q/k/v gradients pass through QK^T and softmax-V, so "attention" changes them.
  for name in ("query", "key", "value"):
    assert not same(attention_only[name]["kernel"], exact[name]["kernel"]), name
    assert not same(dense_only[name]["kernel"], full[name]["kernel"]), name


def test_razorize_must_be_entered_inside_the_jitted_function():
  """The documented pitfall: jit caches a trace made outside the block, exact; a block
  entered inside the traced function prunes."""
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 32))
  dense = nn.Dense(8)
  params = dense.init(KEY, x)
  grad = lambda p: jax.grad(lambda q: jnp.sum(dense.apply(q, x) ** 2))(p)["params"]["kernel"]
  outside = jax.jit(grad)
  exact = outside(params)  # traced here, with no razorize block
  with razorize(0.9):
    stale = outside(params)  # jit's cache: the exact trace runs again
  chex.assert_trees_all_equal(stale, exact)

  def inside(p):
    with razorize(0.9):
      return grad(p)
  pruned = jax.jit(inside)(params)
  assert not np.allclose(pruned, exact, rtol=1e-2, atol=1e-3)
  # The same pruned gradient as the razor layer's, which needs no block at all.
  chex.assert_trees_all_equal(
      pruned, jax.jit(lambda p: jax.grad(lambda q: jnp.sum(
          layers.RazorDense(8, prune_ratio=0.9).apply(q, x) ** 2))(p)["params"]["kernel"])(params))


def _stack_depths():
  return len(nn.module._global_interceptor_stack), len(intercept._ACTIVE.stack)


def test_state_restored_after_block_exception_and_nesting():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 32))
  dense = nn.Dense(8)
  params = dense.init(KEY, x)
  kernel_grad = lambda: jax.grad(lambda p: jnp.sum(dense.apply(p, x) ** 2))(params)[
      "params"]["kernel"]
  exact = kernel_grad()
  depths = _stack_depths()

  with razorize(0.9) as policy:
    assert policy == Policy(0.9)
    razor = kernel_grad()
    with razorize(0.0):  # the innermost block wins
      chex.assert_trees_all_equal(kernel_grad(), exact)
    chex.assert_trees_all_equal(kernel_grad(), razor)
  assert not np.allclose(razor, exact, rtol=1e-2, atol=1e-3)
  assert _stack_depths() == depths
  chex.assert_trees_all_equal(kernel_grad(), exact)

  with pytest.raises(RuntimeError, match="inside"):
    with razorize(0.9):
      with razorize(0.5):
        raise RuntimeError("inside")
  assert _stack_depths() == depths
  chex.assert_trees_all_equal(kernel_grad(), exact)


def test_razorize_takes_the_layers_knob():
  policy = Policy.make(0.9, attention=0.0)
  for args, kwargs, want in [((), {}, Policy()), ((0.9,), {}, Policy(0.9)),
                             ((), dict(prune_ratio=0.5), Policy(0.5)),
                             ((), dict(policy=policy), policy), ((policy,), {}, policy)]:
    with razorize(*args, **kwargs) as got:
      assert got == want, (args, kwargs)
  for args, kwargs in [((0.9,), dict(policy=policy)), ((policy,), dict(policy=policy))]:
    with pytest.raises(ValueError, match="pass one"):
      razorize(*args, **kwargs)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "most"])
def test_bad_prune_ratio(bad):
  depths = _stack_depths()
  with pytest.raises(ValueError, match="prune_ratio") as error:
    razorize(bad)  # raises at the call, before any block is entered
  assert _stack_depths() == depths
  with pytest.raises(ValueError) as layer_error:
    layers.RazorDense(4, prune_ratio=bad)
  assert str(error.value) == str(layer_error.value)  # the same message as a layer's


def test_entered_outside_jit_warns_that_a_cached_trace_ignores_it():
  with pytest.warns(intercept.RazorizeOutsideJitWarning, match="inside the function you jit"):
    with razorize(0.9):
      pass

  def inside(x):
    with razorize(0.9):
      return x + 1
  with warnings.catch_warnings():
    warnings.simplefilter("error", intercept.RazorizeOutsideJitWarning)
    jax.jit(inside)(1.0)  # where it belongs: no warning
