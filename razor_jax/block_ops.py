"""LayerNorm followed by its projections, with one packed residual for both.

In a pre-norm transformer block every LayerNorm feeds projections (LN1 -> q, k, v;
LN2 -> fc1). Packing the LayerNorm input and, separately, the projections' input
stores two copies of one tensor. Here only the normalized input x_hat = (x - mean)
* rstd is packed: the LayerNorm backward needs x_hat (with the exact rstd), and the
projections' weight gradient needs y = x_hat * scale + bias, which the backward
rebuilds from the pruned x_hat. Where x_hat was pruned, y is rebuilt as `bias`, its
value at x_hat = 0, so the weight gradient is pruned in x_hat, not in y.

`layer_norm_dense_multi_reference` computes the same gradients by autodiff through
straight-through substitutions, with the pruning done by a sort; the tests compare them.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import barriers, packed
from razor_jax import ops
from razor_jax.ops import PackSpec


def _plain(x, scale, bias, kernels, biases, eps, precision):
  # The LayerNorm params in x's dtype here, as the kernels in ops.dense_general_plain:
  # residuals hold the params themselves, not per-layer cast copies.
  y = ops.layer_norm_plain(x, scale.astype(x.dtype), bias.astype(x.dtype), eps)
  return ops.dense_multi_plain(y, kernels, biases, (x.ndim - 1,), precision)


def _x_hat(x, mean, rstd):
  return (x.astype(jnp.float32) - mean[..., None]) * rstd[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ln_project(x, scale, bias, kernels, biases, eps, spec, precision):
  return _plain(x, scale, bias, kernels, biases, eps, precision)


def _ln_project_fwd(x, scale, bias, kernels, biases, eps, spec, precision):
  mean, var = ops.layer_norm_stats(x)
  y = ops.layer_norm_apply(x, mean, var, scale.astype(x.dtype), bias.astype(x.dtype), eps)
  outs = ops.dense_multi_plain(y, kernels, biases, (x.ndim - 1,), precision)
  rstd = lax.rsqrt(var + eps)
  # x_hat in x's dtype: its stored values are rounded to 4 or 8 bits or bfloat16 anyway,
  # and a bfloat16 model then unpacks half the bytes in the backward.
  x_hat = _x_hat(x, mean, rstd).astype(x.dtype)
  x_packed = spec.pack(x_hat)
  res = (x_packed, spec.energy(x_hat), rstd, scale, bias, kernels, biases,
         jnp.zeros((0,), y.dtype), jnp.zeros((0,), x.dtype))
  return barriers.depend(outs, x_packed), res


def _ln_project_bwd(eps, spec, precision, res, gs):
  x_packed, energy, rstd, scale, bias, kernels, biases, y_type, x_type = res
  x_hat = packed.unpack(x_packed, after=gs[0]).astype(jnp.float32)
  # Under the "energy" estimator the projections' weight gradients see x_hat's pruned
  # copy scaled by its group's |x_hat|^2 / |x_hat kept|^2; the LayerNorm's do not.
  y = (spec.weight_copy(x_hat, energy) * scale.astype(jnp.float32)
       + bias.astype(jnp.float32))
  y = y.astype(y_type.dtype)
  _, vjp_y = jax.vjp(lambda a: ops.dense_multi_plain(a, kernels, biases, (a.ndim - 1,), precision),
                     y)
  dy, = vjp_y(tuple(gs))
  dscale, dbias = ops.layer_norm_param_grads(x_hat, dy, tuple(range(dy.ndim - 1)))
  # All param gradients before dx, which waits for them through x_hat (ops.param_grads_first).
  (dkernels, dbiases), x_hat, dscale, dbias = ops.param_grads_first(
      lambda ks, bs: ops.dense_multi_plain(y, ks, bs, (y.ndim - 1,), precision),
      (kernels, biases), y.dtype, tuple(gs), x_hat, dscale, dbias)
  dx = ops.layer_norm_input_grad(x_hat, rstd, scale, dy)
  return (dx.astype(x_type.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype),
          dkernels, dbiases)


_ln_project.defvjp(_ln_project_fwd, _ln_project_bwd)


def _check(x, scale, bias, kernels, biases, spec):
  ops.check_packable(spec, x=x)
  if scale is None or bias is None:
    raise ValueError("layer_norm_dense_multi needs a LayerNorm with both scale and bias")
  d = x.shape[-1]
  if scale.shape != (d,) or bias.shape != (d,):
    raise ValueError(f"LayerNorm scale and bias must have shape ({d},) for input of shape"
                     f" {x.shape}, got {scale.shape} and {bias.shape}")
  if len(kernels) != len(biases):
    raise ValueError(f"got {len(kernels)} kernels but {len(biases)} biases")
  for k in kernels:
    if k.shape[0] != d:
      raise ValueError(f"kernel of shape {k.shape} does not contract the last axis ({d}) of"
                       f" input of shape {x.shape}")


def layer_norm_dense_multi(x, scale, bias, kernels: Sequence, biases: Sequence,
                           spec: Optional[PackSpec], epsilon: float = 1e-6,
                           precision=None):
  """LayerNorm(x) (last axis) followed by dense projections of it; one packed residual.

  The forward is flax's LayerNorm then DenseGeneral (contracting the last axis),
  bit for bit. The backward uses the exact 1/std and the pruned normalized input.

  Args:
    x: input (..., d).
    scale, bias: LayerNorm parameters of shape (d,).
    kernels: kernels of shape (d, features...); biases: per kernel (features...) or None.
    spec: how x_hat is pruned; None or prune_ratio 0 is the plain computation.
  Returns:
    A tuple with one output per kernel.
  """
  kernels, biases = tuple(kernels), tuple(biases)
  _check(x, scale, bias, kernels, biases, spec)
  if ops.is_exact(spec):
    return _plain(x, scale, bias, kernels, biases, epsilon, precision)
  return _ln_project(x, scale, bias, kernels, biases, epsilon, spec, precision)


def layer_norm_dense_multi_reference(x, scale, bias, kernels, biases,
                                     spec: Optional[PackSpec], epsilon: float = 1e-6,
                                     precision=None):
  kernels, biases = tuple(kernels), tuple(biases)
  exact = _plain(x, scale, bias, kernels, biases, epsilon, precision)
  if ops.is_exact(spec):
    return exact
  sg = lax.stop_gradient
  mean, var = ops.layer_norm_stats(sg(x))
  rstd = lax.rsqrt(var + epsilon)
  x_hat = sg(spec.prune_reference(_x_hat(sg(x), mean, rstd).astype(x.dtype)).astype(jnp.float32))
  x32 = x.astype(jnp.float32)
  # Linear in x with the LayerNorm Jacobian at the pruned x_hat (see ops.layer_norm_reference).
  lin = rstd[..., None] * (x32 - x32.mean(-1, keepdims=True)
                           - x_hat * (x_hat * x32).mean(-1, keepdims=True))
  scale_sg = sg(scale)
  y_grad = lin * scale_sg + x_hat * (scale - scale_sg) + bias  # carries d/dx, d/dscale, d/dbias
  # What the projections' weight gradients see (x_hat scaled under "energy").
  x_hat_w = x_hat
  if spec.estimator != "none":
    x_hat_w = ops.weight_copy_reference(_x_hat(sg(x), mean, rstd).astype(x.dtype), spec)
    x_hat_w = sg(x_hat_w.astype(jnp.float32))
  y_pruned = sg(x_hat_w * scale + bias).astype(exact[0].dtype)
  y_grad = y_grad.astype(exact[0].dtype)
  axes = (x.ndim - 1,)
  outs = []
  for e, k, b in zip(exact, kernels, biases):
    k_sg = sg(k)
    surrogate = (ops.dense_general_plain(y_grad, k_sg, b, axes, precision)
                 + ops.dense_general_plain(y_pruned, k - k_sg, None, axes, precision))
    outs.append(ops.with_value_of(e, surrogate))
  return tuple(outs)
