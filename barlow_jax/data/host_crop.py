"""ImageNet's crops, cut on the host from the whole JPEG, as the official recipe does.

The official code applies ``RandomResizedCrop(224, interpolation=BICUBIC)`` to
the full-resolution PIL image, so a crop can come from anywhere in a
non-square image and a small crop keeps its full resolution. Here each view's
box is sampled from the JPEG's header (``tf.image.extract_jpeg_shape``, no
decoding) exactly as ``augment.random_crop_box`` samples it on the device
(torchvision's ``RandomResizedCrop.get_params``), only that box is decoded
(``tf.image.decode_and_crop_jpeg``, as BYOL and SimCLR do) and resized to the
crop size with antialiased bicubic interpolation (PIL's bicubic resize
antialiases too). Every photometric op stays on the device (data/augment.py),
which skips its own crop for these views.

Randomness is stateless: the box of view ``v`` of example ``i`` of step ``s``
is drawn from a seed folded from ``(seed, process, s, i, v)``, so a batch is a
pure function of ``(seed, step)`` and a resumed run cuts the same crops.

Evaluation follows the official linear evaluation: shorter side resized to
256 (bilinear, torchvision's default), centre crop 224.

TFDS stores ImageNet as JPEG (its builder re-encodes the few PNG and CMYK
files); these functions read JPEG bytes only.
"""

import math
from typing import NamedTuple

import tensorflow as tf

from barlow_jax.data import augment


class HostCrops(NamedTuple):
  """What the host needs to cut the training views."""
  size: int  # Side of each square crop (config.augment.crop_size).
  views: tuple[augment.ViewAugment, ...]  # Their crop, crop_scale and crop_ratio are used.


def example_seed(seed: int, process: int, step, example) -> tf.Tensor:
  """The stateless seed ([2] int64) of one example of one step of one process."""
  key = tf.constant([seed, process], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(example, tf.int64))


def _centre_crop_fallback(height, width, ratio):
  """augment._centre_crop_fallback on traced sides: the largest centred box of clamped aspect."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  in_ratio = w / h
  lo, hi = min(ratio), max(ratio)
  fb_w = tf.where(in_ratio > hi, tf.round(h * hi), w)
  fb_h = tf.where(in_ratio < lo, tf.round(w / lo), h)
  fb_h, fb_w = tf.cast(fb_h, tf.int32), tf.cast(fb_w, tf.int32)
  return (height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w


def random_crop_box(seed, height, width, scale, ratio) -> tf.Tensor:
  """A box ``[y0, x0, h, w]`` (int32) sampled as torchvision's RandomResizedCrop.get_params.

  The same algorithm as ``augment.random_crop_box`` (up to 10 attempts of area
  U(scale)*H*W and aspect exp(U(log ratio)), sides rounded half to even as
  Python's round, the first that fits placed uniformly at an integer offset,
  else the centred fallback), in TF ops on the traced image sides, in float64
  as torchvision's Python floats.

  Args:
    seed: [2] int stateless seed.
    height, width: int32 scalars, the image's sides.
    scale, ratio: (low, high) of the area fraction and of the aspect w/h.
  """
  return crop_box_from_uniforms(crop_box_uniforms(seed), height, width, scale, ratio)


def crop_box_uniforms(seed) -> tf.Tensor:
  """The ``augment.CROP_UNIFORMS`` float64 uniforms random_crop_box draws from ``seed``."""
  return tf.random.stateless_uniform([augment.CROP_UNIFORMS], seed, dtype=tf.float64)


def crop_box_from_uniforms(u, height, width, scale, ratio) -> tf.Tensor:
  """augment.crop_box_from_uniforms in TF ops on traced sides, in float64: ``[y0, x0, h, w]``."""
  n = augment.CROP_ATTEMPTS
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = (scale[0] + (scale[1] - scale[0]) * u[:n]) * h_f * w_f
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[n:2 * n])
  ws = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # 0 if none fits.
  found = fits[first]
  y_fb, x_fb, h_fb, w_fb = _centre_crop_fallback(height, width, ratio)
  h = tf.where(found, hs[first], h_fb)
  w = tf.where(found, ws[first], w_fb)

  def offset(u, free):  # Uniform on {0, ..., free}, as randint(0, free + 1).
    return tf.minimum(tf.cast(tf.floor(u * tf.cast(free + 1, tf.float64)), tf.int32), free)

  y0 = tf.where(found, offset(u[-2], height - h), y_fb)
  x0 = tf.where(found, offset(u[-1], width - w), x_fb)
  return tf.stack([y0, x0, h, w])


def view_box(seed, shape, view: augment.ViewAugment) -> tf.Tensor:
  """The box of one view: a random crop with probability ``view.crop``, else the whole image."""
  height, width = shape[0], shape[1]
  whole = tf.stack([0, 0, height, width])
  if view.crop <= 0:
    return whole
  box = random_crop_box(tf.random.experimental.stateless_fold_in(seed, 0), height, width,
                        view.crop_scale, view.crop_ratio)
  if view.crop >= 1:
    return box
  use_seed = tf.random.experimental.stateless_fold_in(seed, 1)
  use = tf.random.stateless_uniform([], use_seed) < view.crop
  return tf.where(use, box, whole)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def crop_and_resize(jpeg: tf.Tensor, box: tf.Tensor, size: int) -> tf.Tensor:
  """Decodes only ``box`` ([y0, x0, h, w]) of the JPEG and resizes it to uint8 [size, size, 3]."""
  crop = tf.image.decode_and_crop_jpeg(jpeg, box, channels=3)
  return _to_uint8(tf.image.resize(crop, [size, size], method='bicubic', antialias=True))


def train_views(jpeg: tf.Tensor, seed: tf.Tensor, crops: HostCrops) -> tf.Tensor:
  """One crop per view of one JPEG: uint8 [len(crops.views), size, size, 3]."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  return tf.stack([
      crop_and_resize(jpeg, view_box(tf.random.experimental.stateless_fold_in(seed, v), shape,
                                     view), crops.size)
      for v, view in enumerate(crops.views)])


def resized_shape(height, width, shorter: int):
  """torchvision's Resize(shorter) output (h, w): shorter side to ``shorter``, the
  longer ``int(shorter * long / short)`` (truncated)."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(tf.floor(shorter * long / short), tf.int32)
  return (tf.where(h <= w, shorter, new_long), tf.where(h <= w, new_long, shorter))


def eval_centre_crop(jpeg: tf.Tensor, resize: int, size: int) -> tf.Tensor:
  """Resize(resize) then CenterCrop(size), as the official linear evaluation: uint8 [size, size, 3].

  The offsets are torchvision's ``int(round((side - size) / 2))`` (half to even).
  """
  image = tf.io.decode_jpeg(jpeg, channels=3)
  new_h, new_w = resized_shape(tf.shape(image)[0], tf.shape(image)[1], resize)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method='bilinear', antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2), tf.int32)
  return _to_uint8(image[top:top + size, left:left + size])

