"""Image preprocessing for fine-tuning, as pure TensorFlow functions of their inputs.

Training: an inception-style crop (a random box of `crop_area_min`..100% of the image
area, aspect ratio 3/4..4/3) resized to the square `image_size`, then an optional
horizontal flip. Both draw from stateless ops seeded by the caller, so an example's
augmentation is a function of its seed alone and a resumed run repeats it exactly.

Evaluation: the whole image resized to the square (`crop_fraction=1`, the usual ViT
transfer protocol), or the shorter side resized to `image_size / crop_fraction` and
the centre square cropped (`crop_fraction=0.875` is the common ImageNet protocol).

Outputs are float32 in [-1, 1].
"""
from __future__ import annotations

import tensorflow as tf

_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """JPEG / PNG / GIF / BMP bytes as a uint8 (H, W, 3) image (grey becomes RGB)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def to_signed_unit(image: tf.Tensor) -> tf.Tensor:
  """Pixel values 0..255 as float32 in [-1, 1]."""
  image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)
  return image / 127.5 - 1.0


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  # Antialiasing keeps large photos from aliasing when shrunk to 224; for the
  # bilinear (triangle) filter it never overshoots the input range.
  return tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)


def train_image(encoded: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                crop_area_min: float, flip: bool) -> tf.Tensor:
  """Decoded, randomly cropped (and flipped) float32 (image_size, image_size, 3)."""
  image = decode(encoded)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=crop_seed,
      min_object_covered=0.0, aspect_ratio_range=_ASPECT_RATIO_RANGE,
      area_range=(crop_area_min, 1.0), max_attempts=_CROP_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  image = _resize(tf.slice(image, begin, size), image_size, image_size)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = to_signed_unit(image)
  image.set_shape([image_size, image_size, 3])
  return image


def eval_image(encoded: tf.Tensor, *, image_size: int, crop_fraction: float) -> tf.Tensor:
  """Decoded, resized (and centre-cropped) float32 (image_size, image_size, 3)."""
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
  image = decode(encoded)
  if crop_fraction == 1.0:
    image = _resize(image, image_size, image_size)
  else:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (image_size / crop_fraction) / tf.reduce_min(shape)
    # Never below image_size, so the centre crop always fits.
    height, width = tf.unstack(tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size))
    image = _resize(image, height, width)
    top = (height - image_size) // 2
    left = (width - image_size) // 2
    image = tf.slice(image, tf.stack([top, left, 0]), [image_size, image_size, 3])
  image = to_signed_unit(image)
  image.set_shape([image_size, image_size, 3])
  return image
