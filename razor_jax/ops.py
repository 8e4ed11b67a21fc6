"""Custom-VJP ops of Back Razor: dense forward, gradients from pruned residuals.

Each op's forward is the plain computation (the same primitives in the same order
as flax, so outputs are bit-identical). Its residual is a `razor_jax.packed.Packed` copy of
each activation input, and the backward computes every gradient from that copy.
Beside each op is a `*_reference` twin in plain jnp: it prunes with a sort
(`razor_jax.packed.prune_reference`) and gets the same gradients by autodiff through a
straight-through substitution, so the tests check the ops against independent code.

A `PackSpec` of None, or a prune_ratio of 0, short-circuits to the plain op.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import barriers, packed

GELU_FORMATS = ("uint8", "uint4", "uint2", "bfloat16", "float16")
# Storages that keep GELU's input itself, in this dtype.
_GELU_INPUT_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
# How a pruned copy estimates the weight gradient (see `PackSpec`).
ESTIMATORS = ("none", "energy")
# Bits of the derivative code per GELU format that codes the derivative.
_GELU_CODE_BITS = {"uint8": 8, "uint4": 4, "uint2": 2}


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """How one activation is pruned and stored (hashable: a static argument)."""
  prune_ratio: float = 0.9
  granularity: str = "token"  # Policy's default; "sample" for the paper's groups
  value_format: str = "auto"
  position_format: str = "auto"
  keep_rule: str = "exact_k"   # packed.KEEP_RULES
  # "none": weight gradients from the pruned copy as it is (the paper); "energy": that
  # copy scaled per group by s = |a|^2 / |a_kept|^2 for the weight gradients only (one
  # float32 per group stored), so their length is not shrunk by the pruning.
  estimator: str = "none"

  def __post_init__(self):
    packed.check_prune_ratio(self.prune_ratio)
    packed.check_granularity(self.granularity)
    packed.check_keep_rule(self.keep_rule, self.granularity)
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
    if self.value_format not in packed.VALUE_FORMATS:
      raise ValueError(
          f"value_format must be one of {packed.VALUE_FORMATS}, got {self.value_format!r}")
    if self.position_format not in packed.POSITION_FORMATS:
      raise ValueError(
          f"position_format must be one of {packed.POSITION_FORMATS},"
          f" got {self.position_format!r}")
    packed.check_formats(self.granularity, self.value_format, self.position_format)

  @property
  def exact(self) -> bool:
    return self.prune_ratio == 0.0

  def pack(self, x, row_ndim: int = 1):
    """The packed residual, built in full during the forward (see barriers.materialize).

    `row_ndim` trailing axes of x make a token's row (granularity "token").
    """
    return barriers.materialize(
        lambda a: packed.pack(a, self.prune_ratio, self.granularity,
                              value_format=self.value_format,
                              position_format=self.position_format, row_ndim=row_ndim,
                              keep_rule=self.keep_rule), x)

  def prune_reference(self, x, row_ndim: int = 1):
    return packed.prune_reference(x, self.prune_ratio, self.granularity, self.value_format,
                                  row_ndim, self.keep_rule)

  def _energy_axes(self, ndim: int, row_ndim: int) -> tuple:
    first = 1 if self.granularity == "sample" else ndim - row_ndim
    return tuple(range(first, ndim))

  def energy(self, x, row_ndim: int = 1):
    """What the estimator stores besides the packed copy: per group |x|^2 (float32,
    broadcastable to x), or None without an estimator."""
    if self.estimator == "none":
      return None
    x32 = x.astype(jnp.float32)
    return jnp.sum(x32 * x32, axis=self._energy_axes(x.ndim, row_ndim), keepdims=True)

  def weight_copy(self, pruned, energy, row_ndim: int = 1):
    """The pruned copy the weight gradients see: scaled per group by |x|^2 / |x_kept|^2
    under the "energy" estimator (1 where nothing was kept), else `pruned` itself."""
    if energy is None:
      return pruned
    p32 = pruned.astype(jnp.float32)
    kept = jnp.sum(p32 * p32, axis=self._energy_axes(pruned.ndim, row_ndim), keepdims=True)
    scale = jnp.where(kept > 0, energy / jnp.where(kept > 0, kept, 1.0), 1.0)
    return (p32 * scale).astype(pruned.dtype)


def is_exact(spec: Optional[PackSpec]) -> bool:
  """Whether `spec` prunes nothing (None or prune_ratio 0): the op is then the plain one."""
  return spec is None or spec.exact


def check_packable(spec: Optional[PackSpec], row_ndim: int = 1, **arrays):
  """Raises now, not at differentiation time, if an input cannot be packed by `spec`."""
  for name, x in arrays.items():
    check_float(name, x)
    if not is_exact(spec):
      try:
        _, n = packed.group_shape(jnp.shape(x), spec.granularity, row_ndim)
        packed.keep_count(n, spec.prune_ratio, spec.keep_rule)
      except ValueError as e:
        raise ValueError(f"{name} of shape {jnp.shape(x)}: {e}") from None


def map_row_ndim(ndim: int) -> int:
  """Trailing axes in a "token" row of a feature map (a conv's or BatchNorm's input).

  All but the batch and the first spatial axis: one image row (W x C in NHWC). A
  pixel's channels alone are too few to prune (the stem's 3 input channels keep
  round(0.3) = 0 at 0.9), and would keep as many of a background pixel's as of an
  object's.
  """
  return max(1, ndim - 2)


def check_float(name: str, x):
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def _straight_through(x, pruned):
  """Value of `pruned`, gradient passed to `x` unchanged."""
  return lax.stop_gradient(pruned) + (x - lax.stop_gradient(x))


def with_value_of(exact, surrogate):
  """Value of `exact`, gradient of `surrogate`."""
  return surrogate + lax.stop_gradient(exact - surrogate)


# ----------------------------------------------------------------- dense_general

def canonical_axes(axis, ndim: int) -> tuple[int, ...]:
  """`axis` (an int or a sequence) as sorted non-negative axes of an `ndim`-array."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def row_ndim(axes, ndim: int) -> int:
  """A token's row for "token" pruning of a dense input: its contracted axes when they
  are the trailing ones (the out-projection contracts heads and head features)."""
  return len(axes) if tuple(axes) == tuple(range(ndim - len(axes), ndim)) else 1


def dense_general_plain(x, kernel, bias, axes, precision):
  """flax DenseGeneral's computation contracting the sorted `axes` of x (no pruning).

  The kernel and bias are cast to x's dtype here, inside the custom VJPs: a residual
  then holds the param itself (in a scanned model a slice of the stacked params, which
  the scan does not copy) instead of a cast copy of every layer's kernels.
  """
  kernel = kernel.astype(x.dtype)
  bias = None if bias is None else bias.astype(x.dtype)
  n = len(axes)
  y = lax.dot_general(x, kernel, ((axes, tuple(range(n))), ((), ())), precision=precision)
  if bias is not None:
    # Same broadcast as flax: ones for every non-contracted input axis.
    y += jnp.reshape(bias, (1,) * (x.ndim - n) + bias.shape)
  return y


def dense_multi_plain(x, kernels, biases, axes, precision):
  """`dense_general_plain` of x with each kernel, as a tuple."""
  return tuple(dense_general_plain(x, k, b, axes, precision) for k, b in zip(kernels, biases))


def param_grads_first(fn, params, dtype, g, *waiting):
  """(the VJP of `fn(*params)` for cotangent `g`, *waiting), all through one barrier.

  Whatever the caller derives from the returned `waiting` values (its input gradient)
  waits for the param gradients (barriers.together). XLA:GPU otherwise defers a weight
  gradient, off the critical path, past the backward of the layers before, and keeps
  the unpacked activation it reads alive there, under their temporaries. The grads pass
  the barrier in the compute `dtype`; the cast to each param's dtype (exact: the
  transpose of the forward's cast) comes after, where it fuses into the scan's
  gradient update.
  """
  _, vjp = jax.vjp(fn, *jax.tree.map(lambda p: p.astype(dtype), params))
  grads, *waiting = barriers.together((vjp(g), *waiting))
  return (jax.tree.map(lambda d, p: d.astype(p.dtype), grads, tuple(params)), *waiting)


def bilinear_vjp(fn, x, params, g):
  """(dx, *dparams) of `fn(x, *params)`, bilinear in x and the params, at cotangent `g`:
  the param gradients first (param_grads_first), then dx from the params alone."""
  grads, g = param_grads_first(lambda *ps: fn(x, *ps), params, x.dtype, g, g)
  _, vjp_x = jax.vjp(lambda a: fn(a, *params), x)
  return (vjp_x(g)[0], *grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dense_multi(x, kernels, biases, axes, spec, precision):
  return dense_multi_plain(x, kernels, biases, axes, precision)


def _dense_multi_fwd(x, kernels, biases, axes, spec, precision):
  out = dense_multi_plain(x, kernels, biases, axes, precision)
  # One packed copy of x serves every projection that reads it (q, k and v).
  rows = row_ndim(axes, x.ndim)
  x_packed = spec.pack(x, rows)
  return barriers.depend(out, x_packed), (x_packed, spec.energy(x, rows), kernels, biases)


def _dense_multi_bwd(axes, spec, precision, res, gs):
  x_packed, energy, kernels, biases = res
  x_pruned = packed.unpack(x_packed, after=gs[0])
  x_pruned = spec.weight_copy(x_pruned, energy, row_ndim(axes, x_pruned.ndim))
  # The op is bilinear in (x, kernel): its VJP at the pruned x gives dx from the
  # kernel alone and dkernel from the pruned copy, which is Back Razor's rule.
  return bilinear_vjp(lambda a, ks, bs: dense_multi_plain(a, ks, bs, axes, precision),
                      x_pruned, (kernels, biases), tuple(gs))


_dense_multi.defvjp(_dense_multi_fwd, _dense_multi_bwd)


def dense_multi(x, kernels: Sequence, biases: Sequence, spec: Optional[PackSpec],
                axis=-1, precision=None):
  """Several dense_general projections of the same `x` sharing one packed residual.

  Args:
    x: input; the axes in `axis` are contracted with the leading kernel axes.
    kernels: kernels of shape (x.shape[axis]..., features...).
    biases: per kernel, a bias of shape (features...) or None.
    spec: how x is pruned for the backward; None or prune_ratio 0 is the plain op.
  Returns:
    A tuple of outputs, one per kernel.
  """
  check_packable(spec, x=x)
  axes = canonical_axes(axis, jnp.ndim(x))
  kernels, biases = tuple(kernels), tuple(biases)
  if len(kernels) != len(biases):
    raise ValueError(f"got {len(kernels)} kernels but {len(biases)} biases")
  for k in kernels:
    want = tuple(x.shape[a] for a in axes)
    if tuple(k.shape[:len(axes)]) != want:
      raise ValueError(f"kernel of shape {k.shape} does not contract input axes {axes} of"
                       f" shape {x.shape}: expected leading kernel dims {want}")
  if is_exact(spec):
    return dense_multi_plain(x, kernels, biases, axes, precision)
  return _dense_multi(x, kernels, biases, axes, spec, precision)


def dense_general(x, kernel, bias, spec: Optional[PackSpec], axis=-1, precision=None):
  """flax.linen.DenseGeneral's computation with a pruned residual."""
  return dense_multi(x, (kernel,), (bias,), spec, axis, precision)[0]


def dense(x, kernel, bias, spec: Optional[PackSpec], precision=None):
  """flax.linen.Dense's computation with a pruned residual."""
  return dense_general(x, kernel, bias, spec, -1, precision)


def dense_general_reference(x, kernel, bias, spec: Optional[PackSpec], axis=-1, precision=None):
  axes = canonical_axes(axis, jnp.ndim(x))
  exact = dense_general_plain(x, kernel, bias, axes, precision)
  if is_exact(spec):
    return exact
  x_st = _straight_through(x, weight_copy_reference(x, spec, row_ndim(axes, jnp.ndim(x))))
  return with_value_of(exact, dense_general_plain(x_st, kernel, bias, axes, precision))


def weight_copy_reference(x, spec: PackSpec, row_ndim: int = 1):
  """What a weight gradient sees of x: the pruned copy, under "energy" scaled per group
  by |x|^2 / |x_kept|^2 (written apart from `PackSpec.weight_copy`)."""
  pruned = spec.prune_reference(x, row_ndim)
  if spec.estimator == "none":
    return pruned
  first = 1 if spec.granularity == "sample" else x.ndim - row_ndim
  axes = tuple(range(first, x.ndim))
  total = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True)
  kept = jnp.sum(jnp.square(pruned.astype(jnp.float32)), axis=axes, keepdims=True)
  return jnp.where(kept > 0, pruned * (total / jnp.maximum(kept, 1e-38)),
                   pruned).astype(x.dtype)


def dense_reference(x, kernel, bias, spec: Optional[PackSpec], precision=None):
  return dense_general_reference(x, kernel, bias, spec, -1, precision)


# ----------------------------------------------------------------- attention

def _qk_plain(q, k, precision):
  return jnp.einsum("...qhd,...khd->...hqk", q, k, precision=precision,
                    _dot_general=lax.dot_general)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qk(q, k, spec, precision):
  return _qk_plain(q, k, precision)


def _qk_fwd(q, k, spec, precision):
  # A token's row: all heads' features (q and k are (..., tokens, heads, features)).
  res = (spec.pack(q, 2), spec.pack(k, 2))
  return barriers.depend(_qk_plain(q, k, precision), res), res


def _qk_bwd(spec, precision, res, g):
  q_pruned = packed.unpack(res[0], after=g)
  k_pruned = packed.unpack(res[1], after=g)
  # Bilinear: dq uses the pruned k and dk the pruned q.
  _, vjp = jax.vjp(lambda a, b: _qk_plain(a, b, precision), q_pruned, k_pruned)
  return vjp(g)


_qk.defvjp(_qk_fwd, _qk_bwd)


def attention_logits(q, k, spec: Optional[PackSpec], precision=None):
  """einsum('...qhd,...khd->...hqk'), both sides pruned for the backward."""
  check_packable(spec, q=q, k=k)
  if is_exact(spec):
    return _qk_plain(q, k, precision)
  return _qk(q, k, spec, precision)


def attention_logits_reference(q, k, spec: Optional[PackSpec], precision=None):
  exact = _qk_plain(q, k, precision)
  if is_exact(spec):
    return exact
  q_st = _straight_through(q, spec.prune_reference(q, 2))
  k_st = _straight_through(k, spec.prune_reference(k, 2))
  return with_value_of(exact, _qk_plain(q_st, k_st, precision))


def _softmax(logits, dtype, softmax_in_float32):
  if softmax_in_float32 and logits.dtype != jnp.float32:
    # As flax's force_fp32_for_softmax: the probabilities stay float32, so the product
    # with v is computed (and returned) in float32 too.
    return jax.nn.softmax(logits.astype(jnp.float32))
  return jax.nn.softmax(logits).astype(dtype)


def _pv_plain(p, v, precision):
  return jnp.einsum("...hqk,...khd->...qhd", p, v, precision=precision,
                    _dot_general=lax.dot_general)


# Where softmax_attend's p_spec is not given: the probabilities pruned as v.
SAME = "same"


def _probability_spec(spec, p_spec):
  """The spec that prunes softmax(.)V's probabilities: `p_spec`, or `spec` for SAME."""
  return spec if isinstance(p_spec, str) and p_spec == SAME else p_spec


def _pack_or_keep(spec, x, row_ndim=1):
  return x if spec is None else spec.pack(x, row_ndim)


def _unpack_or_kept(res, g):
  return res if isinstance(res, jax.Array) else packed.unpack(res, after=g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _softmax_pv(logits, v, spec, p_spec, precision, softmax_in_float32):
  p = _softmax(logits, v.dtype, softmax_in_float32)
  return _pv_plain(p, v, precision)


def _softmax_pv_fwd(logits, v, spec, p_spec, precision, softmax_in_float32):
  p = _softmax(logits, v.dtype, softmax_in_float32)
  # Rows: one query's probabilities over the keys; v, as q and k, a token's features.
  # An exact side (spec None) keeps its dense array.
  res = (_pack_or_keep(p_spec, p), _pack_or_keep(spec, v, 2), jnp.zeros((0,), logits.dtype))
  return barriers.depend(_pv_plain(p, v, precision), res[:2]), res


def _softmax_pv_bwd(spec, p_spec, precision, softmax_in_float32, res, g):
  p_pruned = _unpack_or_kept(res[0], g)
  v_pruned = _unpack_or_kept(res[1], g)
  _, vjp = jax.vjp(lambda a, b: _pv_plain(a, b, precision), p_pruned, v_pruned)
  dp, dv = vjp(g)
  # Softmax backward with the pruned probabilities in place of the exact ones.
  p32, dp32 = p_pruned.astype(jnp.float32), dp.astype(jnp.float32)
  dlogits = p32 * (dp32 - jnp.sum(dp32 * p32, axis=-1, keepdims=True))
  # res[2] is an empty array that carries the logits' dtype.
  return dlogits.astype(res[2].dtype), dv


_softmax_pv.defvjp(_softmax_pv_fwd, _softmax_pv_bwd)


def softmax_attend(logits, v, spec: Optional[PackSpec], precision=None,
                   softmax_in_float32: bool = False, p_spec=SAME):
  """softmax(logits) then einsum('...hqk,...khd->...qhd', p, v); p and v pruned.

  `spec` prunes v and, unless `p_spec` says otherwise (a PackSpec, or None to keep the
  probabilities exact), the probabilities p: the policy's "softmax" op type.
  """
  p_spec = _probability_spec(spec, p_spec)
  check_packable(spec, logits=logits, v=v)
  check_packable(p_spec, logits=logits)
  if is_exact(spec) and is_exact(p_spec):
    return _pv_plain(_softmax(logits, v.dtype, softmax_in_float32), v, precision)
  spec, p_spec = (None if is_exact(s) else s for s in (spec, p_spec))
  return _softmax_pv(logits, v, spec, p_spec, precision, softmax_in_float32)


def softmax_attend_reference(logits, v, spec: Optional[PackSpec], precision=None,
                             softmax_in_float32: bool = False, p_spec=SAME):
  p_spec = _probability_spec(spec, p_spec)
  p = _softmax(logits, v.dtype, softmax_in_float32)
  exact = _pv_plain(p, v, precision)
  if is_exact(spec) and is_exact(p_spec):
    return exact
  p_pruned = lax.stop_gradient(p if is_exact(p_spec) else p_spec.prune_reference(p))
  p_pruned = p_pruned.astype(jnp.float32)
  # A map that is linear in the logits with Jacobian diag(p~) - p~ p~^T (symmetric), the
  # softmax Jacobian at the pruned probabilities.
  l32 = logits.astype(jnp.float32)
  lin = p_pruned * l32 - p_pruned * jnp.sum(p_pruned * l32, axis=-1, keepdims=True)
  p_st = with_value_of(p_pruned, lin).astype(p.dtype)
  v_st = v if is_exact(spec) else _straight_through(v, spec.prune_reference(v, 2))
  return with_value_of(exact, _pv_plain(p_st, v_st, precision))


# ----------------------------------------------------------------- layer norm

def layer_norm_stats(x):
  """Per-row mean and variance over the last axis, as flax computes them."""
  # flax's fast variance in float32: E[x^2] - E[x]^2, clipped at zero.
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = x32.mean(-1)
  mean2 = lax.square(x32).mean(-1)
  var = jnp.maximum(0.0, mean2 - lax.square(mean))
  return mean, var


def layer_norm_apply(x, mean, var, scale, bias, eps):
  """Normalizes x with the given statistics, then scales and shifts it (flax's order)."""
  # Operation order of flax.linen.normalization._normalize, for bit-identical output.
  y = x - mean[..., None]
  mul = lax.rsqrt(var[..., None] + eps)
  args = [x]
  if scale is not None:
    mul *= scale
    args.append(scale)
  y *= mul
  if bias is not None:
    y += bias
    args.append(bias)
  return jnp.asarray(y, jnp.result_type(*args))


def layer_norm_plain(x, scale, bias, eps):
  """flax LayerNorm's computation over the last axis (no pruning)."""
  mean, var = layer_norm_stats(x)
  return layer_norm_apply(x, mean, var, scale, bias, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, spec):
  return layer_norm_plain(x, scale, bias, eps)


def _layer_norm_fwd(x, scale, bias, eps, spec):
  mean, var = layer_norm_stats(x)
  y = layer_norm_apply(x, mean, var, scale, bias, eps)
  rstd = lax.rsqrt(var + eps)
  x_packed = spec.pack(x)
  return barriers.depend(y, x_packed), (x_packed, mean, rstd, scale, bias)


def layer_norm_param_grads(x_hat, g, reduce_axes):
  """LayerNorm's scale and bias gradients from the normalized input (float32)."""
  g32 = g.astype(jnp.float32)
  return jnp.sum(g32 * x_hat, axis=reduce_axes), jnp.sum(g32, axis=reduce_axes)


def layer_norm_input_grad(x_hat, rstd, scale, g):
  """LayerNorm's input gradient from the normalized input and 1/std (float32)."""
  g32 = g.astype(jnp.float32)
  u = g32 * scale.astype(jnp.float32) if scale is not None else g32
  return rstd[..., None] * (u - u.mean(-1, keepdims=True)
                            - x_hat * (u * x_hat).mean(-1, keepdims=True))


def layer_norm_grads(x_hat, rstd, scale, g, reduce_axes):
  """Closed-form LayerNorm VJP from the normalized input and 1/std (float32)."""
  dscale, dbias = layer_norm_param_grads(x_hat, g, reduce_axes)
  return layer_norm_input_grad(x_hat, rstd, scale, g), dscale, dbias


def _layer_norm_bwd(eps, spec, res, g):
  x_packed, mean, rstd, scale, bias = res
  x_pruned = packed.unpack(x_packed, after=g).astype(jnp.float32)
  x_hat = (x_pruned - mean[..., None]) * rstd[..., None]
  dx, dscale, dbias = layer_norm_grads(x_hat, rstd, scale, g, tuple(range(g.ndim - 1)))
  return (dx.astype(x_packed.dtype),
          None if scale is None else dscale.astype(scale.dtype),
          None if bias is None else dbias.astype(bias.dtype))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x, scale, bias, spec: Optional[PackSpec], epsilon: float = 1e-6):
  """LayerNorm over the last axis (flax's computation); the input pruned for the backward.

  The backward uses the exact per-row mean and 1/std with the pruned input.
  """
  check_packable(spec, x=x)
  if is_exact(spec):
    return layer_norm_plain(x, scale, bias, epsilon)
  return _layer_norm(x, scale, bias, epsilon, spec)


def layer_norm_reference(x, scale, bias, spec: Optional[PackSpec], epsilon: float = 1e-6):
  exact = layer_norm_plain(x, scale, bias, epsilon)
  if is_exact(spec):
    return exact
  mean, var = layer_norm_stats(lax.stop_gradient(x))
  rstd = lax.rsqrt(var + epsilon)[..., None]
  x_hat = lax.stop_gradient(
      (spec.prune_reference(x).astype(jnp.float32) - mean[..., None]) * rstd)
  x32 = x.astype(jnp.float32)
  # Linear in x with the (symmetric) LayerNorm Jacobian at x_hat:
  # rstd * (I - 11^T / n - x_hat x_hat^T / n).
  lin = rstd * (x32 - x32.mean(-1, keepdims=True)
                - x_hat * (x_hat * x32).mean(-1, keepdims=True))
  y = lin
  if scale is not None:
    # dx sees the scale, dscale sees x_hat.
    scale_sg = lax.stop_gradient(scale)
    y = lin * scale_sg + x_hat * (scale - scale_sg)
  if bias is not None:
    y = y + bias
  return with_value_of(exact, y.astype(exact.dtype))


# ----------------------------------------------------------------- gelu

# gelu'(x) lies in [-0.17, 1.13] for both forms; b-bit codes of the derivative over
# that range have a step of 1.3 / (2**b - 1): 0.0051 at 8 bits, finer than 8-bit storage
# of the input itself (whose derivative error grows with the input's range); 0.087 at
# 4 bits and 0.43 at 2 bits (levels -0.17, 0.26, 0.70, 1.13: the regions where the
# unit is off, near its dip, half on and on).
_DGELU_LO, _DGELU_HI = -0.1702, 1.1290


def _gelu_grad(x, approximate):
  return jax.vmap(jax.grad(lambda a: jax.nn.gelu(a, approximate=approximate)))(
      x.reshape(-1)).reshape(x.shape)


def _quantize_dgelu(d, bits: int = 8):
  levels = (1 << bits) - 1
  q = jnp.round((d - _DGELU_LO) * (levels / (_DGELU_HI - _DGELU_LO)))
  return jnp.clip(q, 0, levels).astype(jnp.uint8)


def _dequantize_dgelu(q, bits: int = 8):
  return q.astype(jnp.float32) * ((_DGELU_HI - _DGELU_LO) / ((1 << bits) - 1)) + _DGELU_LO


def _pack_codes(q, bits: int):
  """uint8 codes of `bits` bits, 8 // bits to a byte along the flattened array (padded)."""
  per = 8 // bits
  flat = q.reshape(-1)
  flat = jnp.pad(flat, (0, (-flat.size) % per)).reshape(-1, per)
  out = flat[:, 0]
  for j in range(1, per):
    out = out | (flat[:, j] << (bits * j))
  return out


def _unpack_codes(codes, bits: int, shape):
  per = 8 // bits
  shifts = (bits * jnp.arange(per, dtype=jnp.uint8))[None, :]
  q = (codes[:, None] >> shifts) & ((1 << bits) - 1)
  return q.reshape(-1)[:math.prod(shape)].reshape(shape)


def _dgelu_codes(x, approximate, bits: int):
  return _pack_codes(_quantize_dgelu(_gelu_grad(x.astype(jnp.float32), approximate), bits), bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gelu(x, approximate, storage):
  return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, approximate, storage):
  y = jax.nn.gelu(x, approximate=approximate)
  if storage in _GELU_CODE_BITS:
    bits = _GELU_CODE_BITS[storage]
    res = barriers.materialize(lambda a: _dgelu_codes(a, approximate, bits), x)
  else:
    res = barriers.materialize(lambda a: a.astype(_GELU_INPUT_DTYPES[storage]), x)
  return barriers.depend(y, res), res


def _gelu_bwd(approximate, storage, res, g):
  stored = barriers.depend(res, g)
  if storage in _GELU_CODE_BITS:
    bits = _GELU_CODE_BITS[storage]
    d = _dequantize_dgelu(_unpack_codes(stored, bits, g.shape), bits)
  else:
    d = _gelu_grad(stored.astype(jnp.float32), approximate)
  return ((g.astype(jnp.float32) * d).astype(g.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x, approximate: bool = True, storage: Optional[str] = "uint8"):
  """jax.nn.gelu with a compact residual.

  Args:
    storage: "uint8", "uint4" or "uint2" keep gelu'(x) in that many bits over its fixed
      range [-0.17, 1.13] (8 // bits codes to a byte); "bfloat16" / "float16" keep x in
      that dtype (float16: the original code's); None is the plain op (exact gradient).
  """
  check_float("x", x)
  if storage is None:
    return jax.nn.gelu(x, approximate=approximate)
  if storage not in GELU_FORMATS:
    raise ValueError(f"gelu storage must be one of {GELU_FORMATS} or None, got {storage!r}")
  return _gelu(x, approximate, storage)


def gelu_reference(x, approximate: bool = True, storage: Optional[str] = "uint8"):
  exact = jax.nn.gelu(x, approximate=approximate)
  if storage is None:
    return exact
  x32 = x.astype(jnp.float32)
  if storage in _GELU_CODE_BITS:
    bits = _GELU_CODE_BITS[storage]
    d = _dequantize_dgelu(_quantize_dgelu(_gelu_grad(x32, approximate), bits), bits)
  else:
    d = _gelu_grad(x32.astype(_GELU_INPUT_DTYPES[storage]).astype(jnp.float32), approximate)
  lin = lax.stop_gradient(d) * x32
  return with_value_of(exact, lin.astype(x.dtype))


# ----------------------------------------------------------------- relu

def one_bit_unit(fn, passes):
  """`fn` (an elementwise unit whose derivative is 1 where `passes(x)`, else 0) with a
  custom VJP whose residual is that 1-bit mask: 32x less than a float32 input."""

  @jax.custom_vjp
  def unit(x):
    return fn(x)

  def unit_fwd(x):
    bits = barriers.materialize(lambda a: jnp.packbits(passes(a).reshape(-1)), x)
    return barriers.depend(fn(x), bits), bits

  def unit_bwd(bits, g):
    # g has the shape and dtype of x; the unpack waits for it (see barriers.depend).
    bits = barriers.depend(bits, g)
    mask = jnp.unpackbits(bits, count=g.size).reshape(g.shape).astype(bool)
    return (jnp.where(mask, g, 0).astype(g.dtype),)

  unit.defvjp(unit_fwd, unit_bwd)
  return unit


_relu = one_bit_unit(jax.nn.relu, lambda x: x > 0)


def relu(x, compact: bool = True):
  """jax.nn.relu whose residual is a 1-bit mask (exact gradient)."""
  check_float("x", x)
  return _relu(x) if compact else jax.nn.relu(x)


def relu_reference(x, compact: bool = True):
  return jax.nn.relu(x)


# ----------------------------------------------------------------- conv

def conv_plain(x, kernel, bias, conv_kwargs):
  y = lax.conv_general_dilated(x, kernel, **dict(conv_kwargs))
  if bias is not None:
    y += bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv(x, kernel, bias, conv_kwargs, spec):
  return conv_plain(x, kernel, bias, conv_kwargs)


def _conv_fwd(x, kernel, bias, conv_kwargs, spec):
  rows = map_row_ndim(x.ndim)
  x_packed = spec.pack(x, rows)
  y = conv_plain(x, kernel, bias, conv_kwargs)
  return barriers.depend(y, x_packed), (x_packed, spec.energy(x, rows), kernel, bias)


def _conv_bwd(conv_kwargs, spec, res, g):
  x_packed, energy, kernel, bias = res
  x = packed.unpack(x_packed, after=g)
  x_pruned = spec.weight_copy(x, energy, map_row_ndim(x.ndim))
  return bilinear_vjp(lambda a, w, b: conv_plain(a, w, b, conv_kwargs), x_pruned,
                      (kernel, bias), g)


_conv.defvjp(_conv_fwd, _conv_bwd)


def freeze_conv_kwargs(kwargs) -> tuple:
  frozen = []
  for key, val in sorted(kwargs.items()):
    if isinstance(val, list):
      val = tuple(tuple(v) if isinstance(v, list) else v for v in val)
    frozen.append((key, val))
  return tuple(frozen)


def conv(x, kernel, bias, spec: Optional[PackSpec], **conv_kwargs):
  """lax.conv_general_dilated (+ bias) with the input pruned for the backward.

  `conv_kwargs` are those of `lax.conv_general_dilated` (window_strides, padding,
  lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision...).
  """
  check_packable(spec, map_row_ndim(jnp.ndim(x)), x=x)
  frozen = freeze_conv_kwargs(conv_kwargs)
  if is_exact(spec):
    return conv_plain(x, kernel, bias, frozen)
  return _conv(x, kernel, bias, frozen, spec)


def conv_reference(x, kernel, bias, spec: Optional[PackSpec], **conv_kwargs):
  frozen = freeze_conv_kwargs(conv_kwargs)
  exact = conv_plain(x, kernel, bias, frozen)
  if is_exact(spec):
    return exact
  x_st = _straight_through(x, weight_copy_reference(x, spec, map_row_ndim(jnp.ndim(x))))
  return with_value_of(exact, conv_plain(x_st, kernel, bias, frozen))
