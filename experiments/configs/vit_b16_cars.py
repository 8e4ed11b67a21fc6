"""ViT-B/16 on Stanford Cars with Back Razor's default policy (0.8).

  python experiments/finetune.py --config vit_b16_cars \
      --config.init_path=/path/to/ViT-B_16.npz --workdir workdir/vit_b16_cars

Cars196 cannot be downloaded automatically: put its files in a folder and pass
--config.manual_dir=DIR (python -m razor_jax.data cars196 --manual_dir DIR prepares it).

Expected: close to full fine-tuning (rerun with --config.prune_ratio=0 to compare);
the project has not recorded a reference accuracy for this config yet. The schedule
follows the CUB recipe (both fine-grained); it is a starting point, not a tuned one.
"""
from razor_jax.train import config as train_config


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "cars196"  # 196 models, 8144 train / 8041 test images (manual download)
  config.model.variant = "B/16"  # 12 blocks of width 768, 16x16 patches
  config.init_path = f"{train_config.PUBLIC_CHECKPOINTS}/ViT-B_16.npz"  # ImageNet-21k weights
  config.lr = 0.01  # peak of the cosine schedule (SGD, momentum 0.9)
  config.total_steps = 6000  # about 94 epochs of the 8144 training images at batch 128
  return config
