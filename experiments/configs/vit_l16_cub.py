"""ViT-L/16 on CUB-200-2011 with Back Razor@0.9: the paper's Table 1 (appendix B.1).

  python experiments/finetune.py --config vit_l16_cub \
      --config.init_path=/path/to/ViT-L_16.npz --workdir workdir/vit_l16_cub

Expected: about 86.9% top-1 on the test split (the paper's Back Razor@90%; full
fine-tuning, --config.prune_ratio=0, reached 86.6%), with 12.3 GB of training memory
at batch 128 against 51.3 GB for full fine-tuning in the paper's measurement.
"""
from razor_jax.train import config as train_config


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "caltech_birds2011"  # 200 bird species, 5994 train / 5794 test images
  config.model.variant = "L/16"  # 24 blocks of width 1024, 16x16 patches
  config.init_path = f"{train_config.PUBLIC_CHECKPOINTS}/ViT-L_16.npz"  # ImageNet-21k weights
  # The paper's Back Razor@90%, with 4-bit log values: at 0.9 the better-measured choice
  # (README, "The default policy"); drop both lines for the library's default policy.
  config.prune_ratio = 0.9
  config.policy.value_format = "log4"
  config.lr = 0.01  # peak of the cosine schedule (SGD, momentum 0.9)
  config.total_steps = 6000  # about 128 epochs of the 5994 training images at batch 128
  return config
