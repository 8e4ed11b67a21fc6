"""Fine-tunes a ViT or a CNN (config.model.name) with Back Razor from a named config.

  python experiments/finetune.py --config demo
  python experiments/finetune.py --config cnn_demo
  python experiments/finetune.py --config vit_l16_cub --config.data_dir=/data/tfds \
      --config.init_path=/ckpt/ViT-L_16.npz --workdir /runs/cub

NAME is experiments/configs/NAME.py (or give a config file's path); rerunning with the
same --workdir resumes. The logic lives in razor_jax.train (its cli and loop), so all
of it is callable from Python.
"""
import os
import sys

from razor_jax.train import cli

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

if __name__ == "__main__":
  sys.exit(cli.main(sys.argv[1:], CONFIGS_DIR))
