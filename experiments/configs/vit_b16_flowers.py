"""ViT-B/16 on Oxford Flowers-102 with Back Razor@0.8.

  python experiments/finetune.py --config vit_b16_flowers \
      --config.init_path=/path/to/ViT-B_16.npz --workdir workdir/vit_b16_flowers

Expected: close to full fine-tuning (rerun with --config.prune_ratio=0 to compare);
the project has not recorded a reference accuracy for this config yet. The schedule
follows the ViT-L/16 Flowers recipe; it is a starting point, not a tuned one.
"""
from razor_jax.train import config as train_config


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "oxford_flowers102"  # 102 species; train+validation (2040) / test (6149)
  config.model.variant = "B/16"  # 12 blocks of width 768, 16x16 patches
  config.init_path = f"{train_config.PUBLIC_CHECKPOINTS}/ViT-B_16.npz"  # ImageNet-21k weights
  config.prune_ratio = 0.8  # Back Razor@80%: each saved activation keeps its top 20%
  config.lr = 0.03  # peak of the cosine schedule (SGD, momentum 0.9)
  config.total_steps = 2000  # about 125 epochs of the 2040 training images at batch 128
  return config
