"""Second transfer task: the demo's ViT (pretrained on digits 0-4) fine-tuned on all ten digits.

  python experiments/finetune.py --config demo_all

As experiments/configs/demo.py, but the task is all ten handwritten digits
(digits_demo/all, 360 test images): a new 10-class head, half of the classes unseen in
pretraining. With the demo, it keeps a default from being tuned to one task of 191
test images (see results/README.md, "Transfer accuracy").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo  # noqa: E402  pylint: disable=wrong-import-position


def get_config():
  config = demo.get_config()
  config.dataset = "digits_demo/all"  # digits 0-9, label = digit; built on first use
  config.keep_head = False  # ten classes: a new head
  return config
