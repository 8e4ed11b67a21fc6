"""The original Back Razor code's gradients for a whole pre-norm ViT, in plain jnp.

Written from the rules of the original PyTorch code (ViT path, quantization off; see
issue 13), not through razor_jax's ops, selection or packing, so that the tests can
check `Policy.paper` against something independent:

- each pruned activation a, per sample over the whole tensor: num_small =
  clip(floor(n * ratio), 1, n), t = the num_small-th smallest |a| (a sort here, the
  original's kthvalue), kept = |a| >= t (ties kept), kept values rounded to float16
  (LayerNorm inputs: float32);
- Linear: dW = g^T a_pruned, dx and db exact;
- QK^T: dq = g k_pruned, dk = g^T q_pruned;
- softmax(S) V: dV = P_pruned^T g, dP = g V_pruned^T, dS = P_pruned (dP - sum(dP P_pruned));
- LayerNorm: backward evaluated at the pruned input with the exact mean and 1/std,
  its output pruned again as the projections' input;
- GELU: backward at the float16 input;
- patch embedding, cls, position embedding, encoder norm and head exact.

The forward is the plain model (flax's vit_jax layout, unscanned parameter names:
`Transformer/encoderblock_{i}/LayerNorm_0`, `MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`). q is scaled by 1/sqrt(head_dim) before QK^T as flax
does, so the pruned q is the scaled one.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

EPS = 1e-6


def prune(a, ratio: float, dtype=jnp.float16):
  """The original's pruned copy of `a` (batch first), as float32."""
  b = a.shape[0]
  flat = a.reshape(b, -1).astype(jnp.float32)
  n = flat.shape[1]
  num_small = min(max(int(math.floor(n * ratio)), 1), n)
  mags = jnp.abs(flat)
  t = jnp.sort(mags, axis=1)[:, num_small - 1:num_small]
  kept = jnp.where(mags >= t, flat.astype(dtype).astype(jnp.float32), 0.0)
  return kept.reshape(a.shape)


# Each op: a custom VJP whose forward is the plain computation and whose backward is
# the rule above; `ratio` is static (0 = the plain op, differentiated by autodiff).

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear(x, w, b, ratio):
  """x @ w + b over x's last axis (w: (d, ...features))."""
  return jnp.tensordot(x, w, axes=1) + b


def _linear_fwd(x, w, b, ratio):
  return linear(x, w, b, ratio), (prune(x, ratio), w)


def _linear_bwd(ratio, res, g):
  xp, w = res
  feat = w.ndim - 1
  lead = g.ndim - feat
  dx = jnp.tensordot(g, w, axes=(tuple(range(lead, g.ndim)), tuple(range(1, w.ndim))))
  dw = jnp.tensordot(xp, g, axes=(tuple(range(lead)), tuple(range(lead))))
  db = g.sum(axis=tuple(range(lead)))
  return dx, dw, db


linear.defvjp(_linear_fwd, _linear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qk(q, k, ratio):
  """(b, t, h, d) x (b, s, h, d) -> logits (b, h, t, s)."""
  return jnp.einsum("bthd,bshd->bhts", q, k)


def _qk_fwd(q, k, ratio):
  return qk(q, k, ratio), (prune(q, ratio), prune(k, ratio))


def _qk_bwd(ratio, res, g):
  qp, kp = res
  return jnp.einsum("bhts,bshd->bthd", g, kp), jnp.einsum("bhts,bthd->bshd", g, qp)


qk.defvjp(_qk_fwd, _qk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def softmax_v(s, v, ratio):
  """softmax(s) over keys, times v: (b, h, t, s) x (b, s, h, d) -> (b, t, h, d)."""
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def _softmax_v_fwd(s, v, ratio):
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", p, v), (prune(p, ratio), prune(v, ratio))


def _softmax_v_bwd(ratio, res, g):
  pp, vp = res
  dv = jnp.einsum("bhts,bthd->bshd", pp, g)
  dp = jnp.einsum("bthd,bshd->bhts", g, vp)
  ds = pp * (dp - jnp.sum(dp * pp, axis=-1, keepdims=True))
  return ds, dv


softmax_v.defvjp(_softmax_v_fwd, _softmax_v_bwd)


def _ln_stats(x):
  mean = x.mean(-1, keepdims=True)
  var = jnp.maximum((x * x).mean(-1, keepdims=True) - mean * mean, 0.0)
  return mean, jax.lax.rsqrt(var + EPS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, ratio):
  mean, rstd = _ln_stats(x)
  return (x - mean) * rstd * scale + bias


def _layer_norm_fwd(x, scale, bias, ratio):
  mean, rstd = _ln_stats(x)
  return layer_norm(x, scale, bias, ratio), (prune(x, ratio, jnp.float32), mean, rstd, scale)


def _layer_norm_bwd(ratio, res, g):
  xp, mean, rstd, scale = res
  x_hat = (xp - mean) * rstd  # at the pruned input: a pruned entry is (0 - mean) * rstd
  dx_hat = g * scale
  dx = rstd * (dx_hat - dx_hat.mean(-1, keepdims=True)
               - x_hat * (dx_hat * x_hat).mean(-1, keepdims=True))
  lead = tuple(range(g.ndim - 1))
  return dx, (g * x_hat).sum(lead), g.sum(lead)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x, ratio):
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x, ratio):
  return gelu(x, ratio), x.astype(jnp.float16)


def _gelu_bwd(ratio, x16, g):
  x = x16.astype(jnp.float32)
  d = jax.vmap(jax.grad(lambda a: jax.nn.gelu(a, approximate=True)))(x.reshape(-1))
  return (g * d.reshape(x.shape),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _op(fn, ratio, plain):
  """`fn` with the ratio, or the plain computation at ratio 0 (exact autodiff)."""
  return (lambda *a: fn(*a, ratio)) if ratio else plain


def vit_logits(params, images, ratio: float, num_heads: int, patch_size: int):
  """Logits of the pre-norm ViT (classifier "token") with the original's backward at `ratio`."""
  lin = _op(linear, ratio, lambda x, w, b: jnp.tensordot(x, w, axes=1) + b)
  ln = _op(layer_norm, ratio, lambda x, s, b: (x - _ln_stats(x)[0]) * _ln_stats(x)[1] * s + b)
  logits_op = _op(qk, ratio, lambda q, k: jnp.einsum("bthd,bshd->bhts", q, k))
  attend = _op(softmax_v, ratio, lambda s, v: jnp.einsum(
      "bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v))
  act = _op(gelu, ratio, lambda x: jax.nn.gelu(x, approximate=True))

  # Patch embedding (exact): non-overlapping p x p patches times the conv kernel.
  b, hgt, wid, c = images.shape
  p = patch_size
  patches = images.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, (hgt // p) * (wid // p), p * p * c)
  emb = params["embedding"]
  x = patches @ emb["kernel"].reshape(p * p * c, -1) + emb["bias"]
  x = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, x.shape[-1])), x], axis=1)
  enc = params["Transformer"]
  x = x + enc["posembed_input"]["pos_embedding"]
  i = 0
  while f"encoderblock_{i}" in enc:
    blk = enc[f"encoderblock_{i}"]
    att = blk["MultiHeadDotProductAttention_0"]
    y = ln(x, blk["LayerNorm_0"]["scale"], blk["LayerNorm_0"]["bias"])
    q, k, v = (lin(y, att[n]["kernel"], att[n]["bias"]) for n in ("query", "key", "value"))
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    o = attend(logits_op(q, k), v)
    x = x + lin(o.reshape(o.shape[:2] + (-1,)),
                att["out"]["kernel"].reshape(-1, x.shape[-1]), att["out"]["bias"])
    mlp = blk["MlpBlock_0"]
    y = ln(x, blk["LayerNorm_1"]["scale"], blk["LayerNorm_1"]["bias"])
    h = act(lin(y, mlp["Dense_0"]["kernel"], mlp["Dense_0"]["bias"]))
    x = x + lin(h, mlp["Dense_1"]["kernel"], mlp["Dense_1"]["bias"])
    i += 1
  norm = enc["encoder_norm"]
  mean, rstd = _ln_stats(x[:, 0])
  cls = (x[:, 0] - mean) * rstd * norm["scale"] + norm["bias"]  # exact
  return cls @ params["head"]["kernel"] + params["head"]["bias"]
