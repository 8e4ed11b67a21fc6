"""A scan over identical layers whose backward allocates nothing before it runs.

jax.lax.scan's own transpose builds the stacked parameter gradients in buffers that
start as broadcast zeros. Those zeros depend on nothing, and XLA:CPU schedules them
at program start, so the whole stack of gradients (1.2 GB for ViT-L/16) is alive
during the forward pass, on top of every layer's residuals. Here the forward scan
returns each layer's VJP closure (its residuals, stacked by the scan), and the
backward scan writes each layer's gradients into a carried buffer that is created
from the cotangent, so it exists only once the backward starts.

`scan_layers_reference` is the same computation with lax.scan and autodiff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from razor_jax import barriers


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


def scan_layers(layer, stacked_params, x, xs=None):
  """Applies `layer(params_i, x, xs_i) -> x` for i = 0 .. L-1 over stacked params.

  Args:
    layer: a function of (params of one layer, carry, per-layer input); differentiable
      in the first two.
    stacked_params: a pytree whose leaves have a leading axis of length L.
    x: the carry (activations).
    xs: optional per-layer non-differentiable inputs (e.g. dropout keys), leading axis L.
  Returns:
    The final carry.
  """
  length = {a.shape[0] for a in jax.tree.leaves(stacked_params)}
  if len(length) != 1:
    raise ValueError(f"stacked params must share one leading (layer) axis, got {length}")
  (length,) = length
  if xs is None:
    xs = jnp.zeros((length, 0), jnp.float32)
  return _scan(layer, stacked_params, x, xs)


def _forward(layer, stacked_params, x, xs):
  def body(carry, inputs):
    params, extra = inputs
    return layer(params, carry, extra), None
  return lax.scan(body, x, (stacked_params, xs))[0]


def _scan(layer, stacked_params, x, xs):
  # `layer` is a Python callable, so the custom_vjp is built around it per call.
  @jax.custom_vjp
  def run(stacked_params, x, xs):
    return _forward(layer, stacked_params, x, xs)

  def run_fwd(stacked_params, x, xs):
    def body(carry, inputs):
      params, extra = inputs
      y, vjp = jax.vjp(lambda p, a: layer(p, a, extra), params, carry)
      return y, vjp
    y, vjps = lax.scan(body, x, (stacked_params, xs))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), stacked_params)
    return y, (vjps, xs, shapes)

  def run_bwd(res, g):
    vjps, xs, shapes = res
    length = jax.tree.leaves(xs)[0].shape[0]
    # Zeros computed from the cotangent, so they cannot be placed before the backward.
    anchor = jax.tree.leaves(g)[0]
    grads = jax.tree.map(lambda s: barriers.zeros_after(s.shape, s.dtype, anchor), shapes)

    def body(carry, inputs):
      g, grads = carry
      i, vjp = inputs
      dparams, dx = vjp(g)
      grads = jax.tree.map(lambda acc, d: lax.dynamic_update_index_in_dim(acc, d, i, 0),
                           grads, dparams)
      return (dx, grads), None

    (dx, grads), _ = lax.scan(body, (g, grads), (jnp.arange(length), vjps), reverse=True)
    return grads, dx, jax.tree.map(_zero_cotangent, xs)

  run.defvjp(run_fwd, run_bwd)
  return run(stacked_params, x, xs)


def scan_layers_reference(layer, stacked_params, x, xs=None):
  """The same as scan_layers, differentiated by jax's own scan transpose."""
  if xs is None:
    length = jax.tree.leaves(stacked_params)[0].shape[0]
    xs = jnp.zeros((length, 0), jnp.float32)
  return _forward(layer, stacked_params, x, xs)
