"""MobileNetV2 (width 1.0) on Oxford Flowers-102 with Back Razor@0.9, from Keras's ImageNet weights.

  python experiments/finetune.py --config mbv2_flowers \
      --config.init_path=/path/to/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5

The paper fine-tunes ProxylessNAS-Mobile; this is its recipe (proxyless_flowers.py:
batch 8, Adam at 1e-4, 50 epochs, label smoothing 0.7, BatchNorm fixed, conv and
classifier inputs pruned at 0.9) on MobileNetV2, whose public ImageNet weights load
directly: Keras's .h5 from
https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/ (the file
of your --config.model.width; they take [-1, 1] pixels, as razor_jax.data gives),
read by razor_jax.models.mobilenet_checkpoint.load_keras_h5 with a new 102-class head.
The default init_path is that file's name in the working directory.

Expected: no reference accuracy is recorded for this config yet.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proxyless_flowers  # noqa: E402  pylint: disable=wrong-import-position


def get_config():
  config = proxyless_flowers.get_config()
  config.model.name = "mobilenet_v2"  # 3,504,872 parameters at width 1.0, 1000 classes
  config.model.width = 1.0  # 0.35-1.4 have public weights: change init_path with it
  config.init_path = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
  return config
