"""Models with Back Razor inside."""
from razor_jax.models.vit import VARIANTS, ViT, export, load_pretrained  # noqa: F401
