"""A plain flax ViT written as google-research/vision_transformer's linen model is, and
the small inputs the ViT tests share.

Only for tests: the parameter tree and the numbers razor_jax's ViT must reproduce.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

TINY = dict(patch_size=4, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = lambda f: nn.Dense(f, kernel_init=nn.initializers.xavier_uniform(),
                               bias_init=nn.initializers.normal(stddev=1e-6))
    h = nn.gelu(dense(self.mlp_dim)(x))
    return dense(d)(h)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, inputs):
    x = nn.LayerNorm(epsilon=1e-6)(inputs)
    x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                        kernel_init=nn.initializers.xavier_uniform())(x, x)
    x = x + inputs
    y = nn.LayerNorm(epsilon=1e-6)(x)
    return x + MlpBlock(self.mlp_dim)(y)


class PosEmbed(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x + self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                          (1,) + x.shape[1:])


class Encoder(nn.Module):
  num_layers: int
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    x = PosEmbed(name="posembed_input")(x)
    for i in range(self.num_layers):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)


class ReferenceViT(nn.Module):
  num_classes: int
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  representation_size: Optional[int] = None
  classifier: str = "token"

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = Encoder(self.num_layers, self.mlp_dim, self.num_heads, name="Transformer")(x)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)


def make_images(batch=3, size=16, seed=1):
  """Random (batch, size, size, 3) images."""
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


def reference_params(num_classes=10, seed=0, **kw):
  """(ReferenceViT of TINY's sizes, its params with noise added everywhere)."""
  ref = ReferenceViT(num_classes, **{**TINY, **kw})
  params = ref.init(jax.random.PRNGKey(seed), make_images())["params"]
  # Non-zero head and cls, so every parameter reaches the output.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 7), len(leaves))
  leaves = [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  return ref, jax.tree.unflatten(tree, leaves)


def loss_fn(model, batch_images, labels):
  """Mean cross entropy of `model` (a ReferenceViT or a razor ViT in training) on a batch."""
  kwargs = {} if isinstance(model, ReferenceViT) else {"train": True}

  def loss(params):
    logits = model.apply({"params": params}, batch_images, **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss


def stack_blocks(params, num_layers):
  """Unrolled -> scanned param layout."""
  params = jax.tree.map(lambda a: a, params)
  blocks = [params["Transformer"].pop(f"encoderblock_{i}") for i in range(num_layers)]
  params["Transformer"]["encoderblock"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  return params
