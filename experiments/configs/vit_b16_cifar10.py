"""ViT-B/16 on CIFAR-10 with Back Razor's default policy (0.8).

  python experiments/finetune.py --config vit_b16_cifar10 \
      --config.init_path=/path/to/ViT-B_16.npz --workdir workdir/vit_b16_cifar10

Expected: close to full fine-tuning (rerun with --config.prune_ratio=0 to compare);
the project has not recorded a reference accuracy for this config yet. The schedule
follows the ViT paper's 10k fine-tuning steps; it is a starting point, not a tuned one.
"""
from razor_jax.train import config as train_config


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "cifar10"  # 10 classes, 50000 train / 10000 test images (32x32, upsampled)
  config.model.variant = "B/16"  # 12 blocks of width 768, 16x16 patches
  config.init_path = f"{train_config.PUBLIC_CHECKPOINTS}/ViT-B_16.npz"  # ImageNet-21k weights
  config.lr = 0.03  # peak of the cosine schedule (SGD, momentum 0.9)
  config.total_steps = 10000  # about 26 epochs of the 50000 training images at batch 128
  return config
