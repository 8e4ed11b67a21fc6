"""Scheduling barriers: values unchanged, and the predicate and boundary survive XLA."""
import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from razor_jax import barriers


@pytest.mark.parametrize("anchor", [jnp.array([True, False]), jnp.array([np.nan, 1.0]),
                                    jnp.array([-1], jnp.int32), jnp.ones((2, 3), jnp.bfloat16),
                                    jnp.array([np.inf], jnp.float16)])
def test_never_true_is_false_and_xla_keeps_it(anchor):
  fn = jax.jit(barriers.never_true)
  assert fn(anchor).shape == () and not bool(fn(anchor))
  # Not folded to a constant: the compiled program still counts bits of the anchor.
  assert "popcnt" in fn.lower(anchor).compile().as_text()


def test_depend_returns_its_value_bit_for_bit_and_reads_the_anchors():
  x = {"a": jnp.array([np.nan, -0.0, np.inf, 1e-45]), "b": jnp.arange(3)}
  anchor = jnp.ones((4, 5))
  chex.assert_trees_all_equal(jax.jit(barriers.depend)(x, anchor), x)
  assert barriers.depend(x) is x  # no anchors: nothing to wait for
  jaxpr = jax.make_jaxpr(barriers.depend)(x, anchor).jaxpr
  used = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)}
  assert jaxpr.invars[-1] in used  # the anchor feeds the output


def test_materialize_computes_inside_a_conditional():
  x = jnp.linspace(-2, 2, 12).reshape(3, 4)
  fn = lambda a: (jnp.exp(a), a.astype(jnp.int8))
  chex.assert_trees_all_equal(jax.jit(lambda a: barriers.materialize(fn, a))(x), fn(x))
  jaxpr = jax.make_jaxpr(lambda a: barriers.materialize(fn, a))(x)
  assert [eqn.primitive.name for eqn in jaxpr.eqns][-1] == "cond"


def test_together_is_a_barrier_on_gpu_and_nothing_on_cpu():
  x = (jnp.array([np.nan, -0.0, 1.0]), {"w": jnp.ones((2, 2), jnp.bfloat16)})
  chex.assert_trees_all_equal(jax.jit(barriers.together)(x), x)
  traced = jax.jit(barriers.together).trace(x)
  # XLA:GPU keeps the barrier through scheduling; XLA:CPU would expand it, so none is made.
  assert "optimization_barrier" in traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "optimization_barrier" not in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_param_grads_pass_the_barrier_with_what_waits_for_them():
  from razor_jax import ops  # pylint: disable=g-import-not-at-top
  x = jnp.linspace(-1, 1, 12).reshape(3, 4).astype(jnp.bfloat16)
  kernel, bias, g = jnp.ones((4, 2)), jnp.zeros((2,)), jnp.ones((3, 2), jnp.bfloat16)
  fn = lambda k, b: ops.dense_general_plain(x, k, b, (1,), None)
  (dk, db), waited = ops.param_grads_first(fn, (kernel, bias), x.dtype, g, g)
  _, vjp = jax.vjp(fn, kernel, bias)
  want_dk, want_db = vjp(g)
  # Same values and dtypes as plain autodiff: the cast to float32 params is after the barrier.
  chex.assert_trees_all_equal((dk, db, waited), (want_dk, want_db, g))
  assert dk.dtype == kernel.dtype == jnp.float32
  lowered = jax.jit(lambda k, b: ops.param_grads_first(fn, (k, b), x.dtype, g, g)).trace(
      kernel, bias).lower(lowering_platforms=("cuda",)).as_text()
  barrier = [l for l in lowered.splitlines() if "optimization_barrier" in l]
  assert len(barrier) == 1 and "bf16" in barrier[0]  # grads in the compute dtype


def test_nested_barriers_take_their_branch_form_and_trace_linearly():
  traces = []

  def innermost(a):
    traces.append(1)
    return jnp.sin(a)

  def level(fn):
    return lambda a: barriers.depend(barriers.materialize(fn, a) * 2, a)

  fn = level(level(level(level(innermost))))
  x = jnp.linspace(-1, 1, 8)
  traced = jax.jit(fn).trace(x)
  # Below the top level, only the enclosing branch's form is traced: 3 traces at any
  # depth. Choosing the form again at every level traced it 2 * depth + 1 times (9).
  assert len(traces) <= 3, len(traces)
  np.testing.assert_array_equal(traced.lower().compile()(x), 16 * jnp.sin(x))
  cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  assert cuda.count("optimization_barrier") >= 8  # 4 materialize + 4 depend
  assert "optimization_barrier" not in cpu and "popcnt" in cpu


def test_several_processes_take_the_straight_line_forms(monkeypatch):
  from razor_jax import ops, packed  # pylint: disable=g-import-not-at-top
  x, w = jnp.ones((4, 64)), jnp.ones((64, 8))
  # A new function each time: jax caches traces by function.
  grad = lambda: lambda x, w: jax.grad(
      lambda w: jnp.sum(ops.dense(x, w, None, ops.PackSpec(0.9))))(w)
  control_flow = ("stablehlo.case", "stablehlo.if", "stablehlo.while")
  one = jax.jit(grad()).lower(x, w).as_text()
  assert any(op in one for op in control_flow)  # the CPU forms: conditionals and loops
  # Two processes hung in different conditionals' collectives: none across processes.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  two = jax.jit(grad()).lower(x, w).as_text()
  assert not any(op in two for op in control_flow), [op for op in control_flow if op in two]
  with pytest.raises(ValueError, match="granularity='sample' .* can hang a run of several"):
    packed.pack(x, 0.9, "sample")
