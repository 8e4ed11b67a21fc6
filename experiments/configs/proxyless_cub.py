"""ProxylessNAS-Mobile on CUB-200-2011 with Back Razor@0.9: the paper's Table 2.

  python experiments/finetune.py --config proxyless_cub \
      --config.init_path=/path/to/proxyless_mobile.npz --workdir workdir/proxyless_cub

The recipe of proxyless_flowers.py (the original code's cmds/CNN/CUB200.sh: batch 8,
Adam at 1e-4, 50 epochs, label smoothing 0.7, BatchNorm fixed, conv and classifier
inputs pruned at 0.9) on CUB's 5994 training images; the same init (a converted .npz,
see proxyless_flowers.py; --config.init_path='' for random initialization).

Expected (the paper's Table 2): 81.0% top-1 on the test split, as the ActNN-style
peer. The project has not run this config to the end yet.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proxyless_flowers  # noqa: E402  pylint: disable=wrong-import-position


def get_config():
  config = proxyless_flowers.get_config()
  config.dataset = "caltech_birds2011"  # 200 species; train (5994) / test (5794)
  config.total_steps = 37500  # 50 epochs of 5994 images at batch 8 (750 steps each)
  config.eval_every = 3750  # every 5 epochs
  config.checkpoint_every = 3750
  return config
