"""Scheduling barriers: what keeps XLA from fusing, deferring or hoisting the residuals.

These are not compression. `depend` ties a value to others by a data dependency that
changes no bit of it; `materialize` computes a value in full where it is called (a
conditional is a fusion boundary); both rest on `never_true`, a predicate that is
always false but that no XLA pass can fold. The razor ops use them so that the saving
visible in the jaxpr is the one XLA allocates (README, "What makes the saving real").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def never_true(anchor: jax.Array) -> jax.Array:
  """A scalar False that XLA cannot prove False, computed from one element of `anchor`.

  The population count of a value never exceeds its bit width; no XLA pass folds it.
  """
  a = jnp.asarray(anchor).reshape(-1)[0]
  bits = a.dtype.itemsize * 8
  utype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[bits]
  a = a.astype(jnp.uint8) if a.dtype == jnp.bool_ else lax.bitcast_convert_type(a, utype)
  return lax.population_count(a) > bits


def depend(x, *anchors):
  """`x` (an array or a pytree), unchanged bit for bit, but computed only after every leaf of `anchors`.

  XLA's scheduler places each op by data dependencies alone. Two placements keep dense
  activations alive and undo the saving: a residual's packing deferred until the
  backward needs it (its dense input then lives through the whole forward), and
  backward-only buffers (the unpacked copy, a scatter's zeros) hoisted to the start.
  Tying the forward output to the packed residual, and the unpacking to the
  cotangent, pins both where they belong.
  """
  never = None
  for leaf in jax.tree.leaves(anchors):
    cond = never_true(leaf)
    never = cond if never is None else never | cond
  if never is None:
    return x
  return jax.tree.map(lambda a: jnp.where(never, jnp.zeros_like(a), a), x)


def materialize(fn, *args):
  """fn(*args), computed in full where it is called and never recomputed later.

  XLA duplicates cheap elementwise producers into their consumers. A residual such as
  an 8-bit copy, built elementwise from a dense activation, would then be rebuilt
  inside the backward from the dense activation, which stays alive for it. A
  conditional is a fusion boundary; its predicate is one that XLA cannot fold.
  """
  out = jax.eval_shape(fn, *args)
  zeros = lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
  return lax.cond(never_true(jax.tree.leaves(args)[0]), zeros, fn, *args)
