"""Scheduling barriers: what keeps XLA from fusing, deferring or hoisting the residuals.

These are not compression. `depend` ties a value to others; `materialize` computes a
value in full where it is called; `zeros_after` makes a zero buffer that cannot exist
before its anchor. The razor ops use them so that the saving visible in the jaxpr is
the one XLA allocates (README, "What makes the saving real").

Each lowers per platform (`lax.platform_dependent`, decided when the program is
lowered, so an XLA:GPU compile from a CPU process gets the GPU form):
  - XLA:GPU honours `lax.optimization_barrier` through fusion and scheduling, and a
    conditional there costs a host round trip (the predicate is read by the host
    unless the conditional runs in a CUDA graph), so the GPU forms are barriers.
  - XLA:CPU expands optimization barriers before fusion, where they hold nothing; the
    CPU forms use a conditional or a select on `never_true`, a predicate that is
    always false but that no XLA pass folds.

Across processes the CPU forms are not used (`straight_line`): their conditionals held
cross-process collectives, and two processes of a CPU run hung in different ones.

`lax.platform_dependent` traces every branch, and the barriers nest (a packed residual
is materialized from codecs that materialize their own parts), so choosing the form at
each level traced the inner levels again for every level above (2 * depth + 1 traces of
the innermost code; half of the demo ViT's tracing time). Inside a branch the platform
is known, so the barriers there take that branch's form directly (`per_platform`).
"""
from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
from jax import lax


_TRACING = threading.local()  # .branch: "cpu" or "gpu" while a branch below is traced


@contextlib.contextmanager
def _branch(name):
  outer = getattr(_TRACING, "branch", None)
  _TRACING.branch = name
  try:
    yield
  finally:
    _TRACING.branch = outer


def straight_line() -> bool:
  """Whether the razor ops must avoid data-dependent control flow: in a multi-process run.

  A conditional's predicate and branches in an SPMD program over several processes
  carry collectives (the partitioner gathers the predicate's element, reduces counts
  over sharded rows). Two processes of a CPU run (2 cores, under load) were found
  waiting in different collectives inside different conditionals, each for the other,
  forever. The GPU forms (barriers, a sort) have no control flow; a multi-process run
  takes them on every backend, at the cost of XLA:CPU's saving (its barriers are
  expanded before fusion, see the module docstring).
  """
  return jax.process_count() > 1


def per_platform(args, cpu, gpu):
  """cpu(*args) on XLA:CPU, gpu(*args) elsewhere, decided when the program is lowered;
  inside a branch of an enclosing call, that branch's form alone is traced; in a
  multi-process run, the GPU form everywhere (`straight_line`)."""
  branch = getattr(_TRACING, "branch", None)
  if branch is None and straight_line():
    with _branch("gpu"):
      return gpu(*args)
  if branch is not None:
    return (cpu if branch == "cpu" else gpu)(*args)

  def in_branch(name, fn):
    def traced(*a):
      with _branch(name):
        return fn(*a)
    return traced

  return lax.platform_dependent(*args, cpu=in_branch("cpu", cpu),
                                default=in_branch("gpu", gpu))


def never_true(anchor: jax.Array) -> jax.Array:
  """A scalar False that XLA cannot prove False, computed from one element of `anchor`.

  The population count of a value never exceeds its bit width; no XLA pass folds it.
  """
  a = jnp.asarray(anchor).reshape(-1)[0]
  bits = a.dtype.itemsize * 8
  utype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[bits]
  a = a.astype(jnp.uint8) if a.dtype == jnp.bool_ else lax.bitcast_convert_type(a, utype)
  return lax.population_count(a) > bits


def _any_never(leaves):
  never = never_true(leaves[0])
  for leaf in leaves[1:]:
    never = never | never_true(leaf)
  return never


def depend(x, *anchors):
  """`x` (an array or a pytree), unchanged bit for bit, but computed only after every leaf of `anchors`.

  XLA's scheduler places each op by data dependencies alone. Two placements keep dense
  activations alive and undo the saving: a residual's packing deferred until the
  backward needs it (its dense input then lives through the whole forward), and
  backward-only buffers (the unpacked copy) hoisted to the start. Tying the forward
  output to the packed residual, and the unpacking to the cotangent, pins both where
  they belong.
  """
  leaves = [a for a in jax.tree.leaves(anchors) if a.size]
  if not leaves or not jax.tree.leaves(x):
    return x

  def on_cpu(x, leaves):
    never = _any_never(leaves)
    return jax.tree.map(lambda a: jnp.where(never, jnp.zeros_like(a), a), x)

  def on_gpu(x, leaves):
    return lax.optimization_barrier((x, leaves))[0]

  return per_platform((x, leaves), on_cpu, on_gpu)


def together(tree):
  """`tree` unchanged, with every leaf computed before any is used (GPU; identity on CPU).

  In a backward, the weight gradient of a layer is off the critical path: XLA:GPU's
  scheduler defers it, and with it the unpacked activation and its decoded positions,
  past the backward of the layers before, where their temporaries pile on top. Passing
  the weight gradients and what the input gradient is computed from through one
  barrier makes the input gradient, and so everything upstream, wait for them
  (ops.param_grads_first). XLA:CPU expands the barrier before scheduling, so there it
  is left out.
  """
  if not jax.tree.leaves(tree):
    return tree
  return per_platform((tree,), lambda t: t, lax.optimization_barrier)


def materialize(fn, *args):
  """fn(*args), computed in full where it is called and never recomputed later.

  XLA duplicates cheap elementwise producers into their consumers. A residual such as
  an 8-bit copy, built elementwise from a dense activation, would then be rebuilt
  inside the backward from the dense activation, which stays alive for it. A
  conditional (CPU) or an optimization barrier (GPU) is a fusion boundary.
  """
  def on_cpu(*args):
    out = jax.eval_shape(fn, *args)
    zeros = lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
    return lax.cond(never_true(jax.tree.leaves(args)[0]), zeros, fn, *args)

  def on_gpu(*args):
    return lax.optimization_barrier(fn(*args))

  return per_platform(args, on_cpu, on_gpu)


def zeros_after(shape, dtype, anchor: jax.Array) -> jax.Array:
  """Zeros of `shape` computed from `anchor`, so they cannot be allocated before it.

  A constant broadcast, even one fed to a barrier, is a buffer XLA may create at any
  point before its use, which keeps a dense buffer alive through the layers before it;
  a select on `never_true` makes the zeros a function of the anchor on every platform.
  """
  zero = jnp.where(never_true(anchor), 1, 0).astype(dtype)
  return jnp.broadcast_to(zero, shape)
