"""Barlow Twins image augmentations, run on the accelerator inside the train step.

Each function augments ONE uint8 image with its own PRNG key; the train step
``vmap``s it over the batch with one key per example, so every example (and
every view) draws its own crop, flip, jitter, ... independently. The host only
decodes and batches, which keeps it out of the step.

The ops follow the official repo's torchvision pipeline (RandomResizedCrop,
RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8,
RandomGrayscale(0.2), GaussianBlur, Solarization), built from dm-pix and
``jax.image``. Differences: the jitter ops run in a fixed order (torchvision
shuffles them), and the crop box is clipped to the image instead of being
resampled up to ten times.
"""

import math
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp


class ViewAugment(NamedTuple):
  """Augmentation of one branch. Probabilities in [0, 1]; strengths as torchvision."""
  crop: float = 1.0  # P(random resized crop); otherwise the whole image is resized.
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: float = 0.5
  jitter: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale: float = 0.2
  blur: float = 1.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_kernel: int = 23  # Odd; ~10% of the crop size as in SimCLR/BYOL.
  solarize: float = 0.0
  solarize_threshold: float = 0.5


def view_from_config(cfg) -> ViewAugment:
  """Builds a ViewAugment from a ConfigDict/dict, rejecting unknown keys."""
  cfg = dict(cfg)
  unknown = set(cfg) - set(ViewAugment._fields)
  if unknown:
    raise ValueError(f'Unknown augmentation keys {sorted(unknown)}; '
                     f'known: {list(ViewAugment._fields)}.')
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  return ViewAugment(**cfg)


def _resize_box(image, box, out_size: int):
  """Crops ``box = (y0, x0, h, w)`` (float, traced) and resizes it to out_size^2."""
  y0, x0, h, w = box
  scale = jnp.stack([out_size / h, out_size / w])
  translation = jnp.stack([-y0 * out_size / h, -x0 * out_size / w])
  return jax.image.scale_and_translate(
      image, (out_size, out_size, image.shape[-1]), (0, 1), scale, translation,
      method='linear', antialias=True)


def random_crop_box(key, height: int, width: int, scale, ratio):
  """Box of area U(scale)*H*W and aspect exp(U(log ratio)), clipped to the image."""
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * height * width
  log_ratio = jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_ratio)
  w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
  h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
  y0 = jax.random.uniform(k_y, ()) * (height - h)
  x0 = jax.random.uniform(k_x, ()) * (width - w)
  return y0, x0, h, w


def _maybe(key, probability: float, fn, x):
  """fn(x) with the given probability; statically skipped or forced at 0 and 1."""
  if probability <= 0.0:
    return x
  if probability >= 1.0:
    return fn(x)
  return jnp.where(jax.random.uniform(key, ()) < probability, fn(x), x)


def _color_jitter(key, x, aug: ViewAugment):
  k_b, k_c, k_s, k_h = jax.random.split(key, 4)
  # torchvision's brightness is multiplicative (dm-pix's random_brightness is additive).
  x = x * jax.random.uniform(k_b, (), minval=1 - aug.brightness, maxval=1 + aug.brightness)
  x = pix.random_contrast(k_c, x, 1 - aug.contrast, 1 + aug.contrast)
  x = pix.random_saturation(k_s, jnp.clip(x, 0, 1), 1 - aug.saturation, 1 + aug.saturation)
  x = pix.random_hue(k_h, jnp.clip(x, 0, 1), aug.hue)
  return jnp.clip(x, 0.0, 1.0)


def augment_view(key: jax.Array, image: jax.Array, aug: ViewAugment, out_size: int) -> jax.Array:
  """One augmented view of one image.

  Args:
    key: PRNG key for this image and view.
    image: [H, W, C] uint8 (or float in [0, 1]).
    aug: the branch's augmentation parameters.
    out_size: side of the square output.

  Returns:
    [out_size, out_size, C] float32 in [0, 1].
  """
  keys = jax.random.split(key, 7)
  x = image.astype(jnp.float32)
  if image.dtype == jnp.uint8:
    x = x / 255.0
  height, width = x.shape[:2]
  full = (jnp.float32(0), jnp.float32(0), jnp.float32(height), jnp.float32(width))
  if aug.crop > 0:
    crop = random_crop_box(keys[0], height, width, aug.crop_scale, aug.crop_ratio)
    use_crop = jax.random.uniform(keys[1], ()) < aug.crop
    box = tuple(jnp.where(use_crop, c, f) for c, f in zip(crop, full))
  else:
    box = full
  x = jnp.clip(_resize_box(x, box, out_size), 0.0, 1.0)
  x = pix.random_flip_left_right(keys[2], x, probability=aug.flip) if aug.flip > 0 else x
  x = _maybe(keys[3], aug.jitter, lambda y: _color_jitter(jax.random.fold_in(keys[3], 1), y, aug), x)
  x = _maybe(keys[4], aug.grayscale,
             lambda y: jnp.broadcast_to(pix.rgb_to_grayscale(y, keep_dims=True), y.shape), x)

  def blur(y):
    sigma = jax.random.uniform(jax.random.fold_in(keys[5], 1), (),
                               minval=aug.blur_sigma[0], maxval=aug.blur_sigma[1])
    return pix.gaussian_blur(y, sigma, aug.blur_kernel)

  x = _maybe(keys[5], aug.blur, blur, x)
  x = _maybe(keys[6], aug.solarize, lambda y: pix.solarize(y, aug.solarize_threshold), x)
  return x


def augment_batch(keys: jax.Array, images: jax.Array, aug: ViewAugment, out_size: int) -> jax.Array:
  """``augment_view`` over a batch, one key per example."""
  return jax.vmap(lambda k, im: augment_view(k, im, aug, out_size))(keys, images)


def normalize(x: jax.Array, mean, std) -> jax.Array:
  """Per-channel standardisation with the dataset's mean/std (in [0, 1] units)."""
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def model_inputs(images: jax.Array, key: jax.Array, view, out_size: int, mean, std,
                 dtype=jnp.float32) -> jax.Array:
  """A uint8 batch as the network's standardised input, for evaluation.

  Args:
    images: [N, H, W, C] uint8, the global batch.
    key: with ``view``, example i is augmented with ``split(key, N)[i]`` (so a
      view does not depend on the device count); unused without.
    view: a ViewAugment, or None for no augmentation: the images are only
      scaled to [0, 1] and centre-cropped to ``out_size`` if larger (ImageNet:
      256 on the host, 224 here).
    out_size: side of the network's input.
    mean: per-channel mean, in [0, 1] units.
    std: per-channel std, likewise.
    dtype: the network's compute dtype.

  Returns:
    [N, out_size, out_size, C] of ``dtype``.
  """
  if view is None:
    x = images.astype(jnp.float32) / 255.0
    off = (x.shape[1] - out_size) // 2
    x = x[:, off:off + out_size, off:off + out_size]
  else:
    x = augment_batch(jax.random.split(key, images.shape[0]), images, view, out_size)
  return normalize(x, mean, std).astype(dtype)

