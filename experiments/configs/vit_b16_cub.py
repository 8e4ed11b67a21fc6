"""ViT-B/16 on CUB-200-2011 with Back Razor's default policy (0.8).

  python experiments/finetune.py --config vit_b16_cub \
      --config.init_path=/path/to/ViT-B_16.npz --workdir workdir/vit_b16_cub

Expected: close to full fine-tuning (rerun with --config.prune_ratio=0 to compare);
the project has not recorded a reference accuracy for this config yet. The schedule
follows the ViT-L/16 CUB recipe; it is a starting point, not a tuned one.
"""
from razor_jax.train import config as train_config


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "caltech_birds2011"  # 200 bird species, 5994 train / 5794 test images
  config.model.variant = "B/16"  # 12 blocks of width 768, 16x16 patches
  config.init_path = f"{train_config.PUBLIC_CHECKPOINTS}/ViT-B_16.npz"  # ImageNet-21k weights
  config.lr = 0.01  # peak of the cosine schedule (SGD, momentum 0.9)
  config.total_steps = 6000  # about 128 epochs of the 5994 training images at batch 128
  return config
