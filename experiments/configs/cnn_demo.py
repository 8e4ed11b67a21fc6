"""Offline CNN demo: a tiny CNN fine-tuned with Back Razor@0.9 on handwritten digits 5-9.

  python experiments/finetune.py --config cnn_demo

The CNN counterpart of the `demo` config, without network or GPU: the 4-block
inverted-residual CNN of razor_jax.models.mobilenet (BatchNorm, ReLU6), pretrained on
digits 0-4 by experiments/cnn_digits.py (experiments/assets/cnn_demo_digits.npz),
fine-tuned on digits 5-9 (digits_demo/finetune, built on first use) with a new head.
As the paper's CNN runs: every conv and the classifier keep their input pruned at 0.9,
ReLU6 a 1-bit mask, BatchNorm fixed (running statistics, no gradient). Adam, batch 32.

Expected: eval accuracy about 97% on the 191 held-out digits after 300 steps (96% at
step 100), in about a minute on 2 CPU cores, with a compiled step peak of 3.3 MiB
against 5.4 MiB for full fine-tuning. --config.model.batch_norm=train trains BatchNorm
on batch statistics (the state then carries the running averages);
--config.prune_ratio=0 is full fine-tuning; --config.init_path='' trains the same CNN
from scratch.
"""
import os

from razor_jax.train import config as train_config

# Relative to this file, so the demo runs from any working directory.
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "assets")


def get_config():
  config = train_config.get_config()  # every field is documented there
  config.dataset = "digits_demo"  # digits 5-9 as labels 0-4; built on first use
  config.image_size = 16  # the size the CNN was pretrained at (the images are 32x32)
  config.batch_size = 32
  config.model.name = "tiny_cnn"  # stem 16, 4 inverted-residual blocks, head 128
  config.model.batch_norm = "fixed"  # the paper's CNN runs (TinyTL's full_noBN)
  config.init_path = os.path.normpath(os.path.join(_ASSETS, "cnn_demo_digits.npz"))
  config.prune_ratio = 0.9  # Back Razor@90%
  config.optimizer.name = "adam"  # as the paper's CNN runs (and cnn_digits.py)
  config.lr = 1e-3  # peak of the cosine schedule
  config.warmup_steps = 20
  config.total_steps = 300  # about 13 epochs of the ~720 training images
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100
  return config
