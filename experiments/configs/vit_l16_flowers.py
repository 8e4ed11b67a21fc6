"""ViT-L/16 on Oxford Flowers-102 with Back Razor@0.8 (the paper's Table 1 dataset and model).

  python experiments/finetune.py --config vit_l16_flowers \
      --config.init_path=/path/to/ViT-L_16.npz --workdir workdir/vit_l16_flowers

Expected: about 99.5% top-1 on the test split. The paper's Table 1 reports 99.5% for
its Back Razor row (labelled @90%) and 99.6% for full fine-tuning
(--config.prune_ratio=0); the original Flowers runs pruned 80%, which this keeps.
"""
from razor_jax.train import config as train_config


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "oxford_flowers102"  # 102 species; train+validation (2040) / test (6149)
  config.model.variant = "L/16"  # 24 blocks of width 1024, 16x16 patches
  config.init_path = f"{train_config.PUBLIC_CHECKPOINTS}/ViT-L_16.npz"  # ImageNet-21k weights
  config.prune_ratio = 0.8  # Back Razor@80%: each saved activation keeps its top 20%
  config.lr = 0.03  # peak of the cosine schedule (SGD, momentum 0.9)
  config.total_steps = 2000  # about 125 epochs of the 2040 training images at batch 128
  return config
