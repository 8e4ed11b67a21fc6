"""A plain flax ViT written as google-research/vision_transformer's linen model is.

Only for tests: the parameter tree and the numbers razor_jax's ViT must reproduce.
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


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
