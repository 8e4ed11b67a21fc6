"""razor_jax: Back Razor (self-sparsified backpropagation) for JAX/Flax."""
from razor_jax.packed import Packed, bits_per_element, pack, unpack
from razor_jax.intercept import razorize
from razor_jax.layers import (RazorConv, RazorDense, RazorDenseGeneral, RazorLayerNorm,
                              RazorMultiHeadDotProductAttention, UnsupportedConfigError)
from razor_jax.ops import PackSpec
from razor_jax.policy import Policy

__all__ = [
    "Packed", "PackSpec", "Policy", "RazorConv", "RazorDense", "RazorDenseGeneral",
    "RazorLayerNorm", "RazorMultiHeadDotProductAttention", "UnsupportedConfigError",
    "bits_per_element", "pack", "razorize", "unpack",
]
