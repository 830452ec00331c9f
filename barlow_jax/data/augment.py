"""Barlow Twins image augmentations, run on the accelerator inside the train step.

Each function augments ONE uint8 image with its own PRNG key; the train step
``vmap``s it over the batch with one key per example, so every example (and
every view) draws its own crop, flip, jitter, ... independently. The host only
decodes and batches, which keeps it out of the step; for ImageNet it also cuts
each view's random-resized crop from the whole JPEG (data/host_crop.py, the
same sampling), and the device skips its crop (``device_view``).

The ops follow the official repo's torchvision pipeline (RandomResizedCrop,
RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8,
RandomGrayscale(0.2), GaussianBlur, Solarization), built from dm-pix and
``jax.image``:

- the crop box is sampled as ``RandomResizedCrop.get_params``: ten attempts
  (drawn together, the first that fits wins), integer box, centre-crop
  fallback;
- the colour jitter applies brightness, contrast, saturation and hue in a random
  order per example (torchvision's ``randperm(4)``), with torchvision's
  operations on float images: brightness multiplies, contrast blends with the
  mean of the grayscale image, saturation blends with the grayscale image, hue
  shifts H in HSV, and every step is clamped to [0, 1].

Remaining differences: the official repo works on PIL images, which are
requantised to uint8 after every jitter step (here everything stays float), and
the device's crop is resized with antialiased bilinear interpolation
(``jax.image``) where the official repo uses bicubic (ImageNet's host crops are
bicubic).
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


CROP_ATTEMPTS = 10  # As torchvision's RandomResizedCrop.get_params.
# The uniforms one crop box takes: an area and an aspect per attempt, two offsets.
CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2


def _centre_crop_fallback(height: int, width: int, ratio) -> tuple[int, int, int, int]:
  """torchvision's fallback box when no attempt fits: the largest centred box
  whose aspect is clamped to ``ratio``."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_crop_box(key, height: int, width: int, scale, ratio):
  """A crop box ``(y0, x0, h, w)`` sampled as torchvision's RandomResizedCrop.

  Up to ``CROP_ATTEMPTS`` attempts of area U(scale)*H*W and aspect (w/h)
  exp(U(log ratio)), with w and h rounded to integers; the first attempt that
  fits in the image wins and is placed uniformly at an integer offset. If none
  fits, the centred fallback box of ``_centre_crop_fallback``. The attempts are
  drawn together and the first valid one picked with ``argmax``, so this runs
  under jit and vmap (one key per example).

  Returns:
    Four float32 scalars with integer values.
  """
  u = jax.random.uniform(key, (CROP_UNIFORMS,))  # One draw: cheaper to compile.
  return crop_box_from_uniforms(u, height, width, scale, ratio)


def crop_box_from_uniforms(u, height: int, width: int, scale, ratio):
  """random_crop_box's box from its ``CROP_UNIFORMS`` uniforms ``u`` in [0, 1).

  data/host_crop.crop_box_from_uniforms is the same map in TF ops, in float64:
  tests/test_host_crop.py holds the two to the same boxes from the same
  uniforms.
  """
  area = (scale[0] + (scale[1] - scale[0]) * u[:CROP_ATTEMPTS]) * (height * width)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[CROP_ATTEMPTS:2 * CROP_ATTEMPTS])
  ws = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # Half to even, as Python's round.
  hs = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(fits)  # The first attempt that fits (0 if none does).
  y_fb, x_fb, h_fb, w_fb = _centre_crop_fallback(height, width, ratio)
  found = fits[first]
  h = jnp.where(found, hs[first], h_fb)
  w = jnp.where(found, ws[first], w_fb)

  def offset(u, free):  # Uniform on {0, ..., free}, as randint(0, free + 1).
    return jnp.minimum(jnp.floor(u * (free + 1)).astype(jnp.int32), free)

  y0 = jnp.where(found, offset(u[-2], height - h), y_fb)
  x0 = jnp.where(found, offset(u[-1], width - w), x_fb)
  return tuple(v.astype(jnp.float32) for v in (y0, x0, h, w))


def _maybe(key, probability: float, fn, x):
  """fn(x) with the given probability; statically skipped or forced at 0 and 1."""
  if probability <= 0.0:
    return x
  if probability >= 1.0:
    return fn(x)
  return jnp.where(jax.random.uniform(key, ()) < probability, fn(x), x)


def _blend(x, other, factor):
  """torchvision's ``_blend`` for float images: factor*x + (1-factor)*other in [0, 1]."""
  return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


def adjust_hue(x, delta):
  """torchvision's adjust_hue: shifts H by ``delta`` turns in HSV."""
  return jnp.clip(pix.adjust_hue(x, delta), 0.0, 1.0)


JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')  # Indices of the jitter order.


def jitter_params(key, aug: ViewAugment):
  """The order and factors of one colour jitter, as torchvision's ColorJitter.

  Returns:
    order: int32[4], a random permutation of ``range(4)`` (indices into
      ``JITTER_OPS``), the order in which the ops are applied.
    factors: float32[4]: brightness, contrast and saturation factors from
      U[max(0, 1 - s), 1 + s] and the hue shift from U[-hue, hue].
  """
  u = jax.random.uniform(key, (2, len(JITTER_OPS)))  # One draw: cheaper to compile.
  order = jnp.argsort(u[0]).astype(jnp.int32)  # Uniform over the 24 permutations.
  lower = jnp.array([max(0.0, 1.0 - s) for s in (aug.brightness, aug.contrast, aug.saturation)]
                    + [-aug.hue], jnp.float32)
  upper = jnp.array([1.0 + aug.brightness, 1.0 + aug.contrast, 1.0 + aug.saturation, aug.hue],
                    jnp.float32)
  return order, lower + (upper - lower) * u[1]


def _blend_op(x, op, factors):
  """Brightness (op 0), contrast (1) or saturation (2), chosen by the traced
  ``op``: each is a blend with black, the grayscale mean or the grayscale image."""
  gray = pix.rgb_to_grayscale(x, keep_dims=True)
  other = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(gray), gray))
  return _blend(x, other, factors[op])


def color_jitter(key, x, aug: ViewAugment):
  """ColorJitter(brightness, contrast, saturation, hue) of one float image in [0, 1].

  The four ops run in the random order of ``jitter_params``. Written as: the
  blends (brightness, contrast, saturation) that come before hue in the order,
  hue, then the blends after it, each blend step masked by its position, so the
  HSV round trip of hue runs once. (A ``lax.switch`` per position, which vmap
  turns into evaluating all four ops at each of the four positions, was 10-15x
  slower on CPU, batch 32 at 224 px: XLA's fusion recomputed the chained ops.)
  An op of strength 0 is the identity (factor 1, or hue skipped), as torchvision
  skips it.
  """
  order, factors = jitter_params(key, aug)
  hue = JITTER_OPS.index('hue')
  hue_at = jnp.argmax(order == hue)
  blends = order[jnp.argsort(order == hue, stable=True)[:3]]  # The order without hue.
  for t in range(3):
    x = jnp.where(t < hue_at, _blend_op(x, blends[t], factors), x)
  if aug.hue > 0:
    x = adjust_hue(x, factors[hue])
  for t in range(3):
    x = jnp.where(t >= hue_at, _blend_op(x, blends[t], factors), x)
  return x


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
    x = jnp.clip(_resize_box(x, box, out_size), 0.0, 1.0)
  elif (height, width) != (out_size, out_size):  # Else resizing would be the identity.
    x = jnp.clip(_resize_box(x, full, out_size), 0.0, 1.0)
  x = pix.random_flip_left_right(keys[2], x, probability=aug.flip) if aug.flip > 0 else x
  x = _maybe(keys[3], aug.jitter, lambda y: color_jitter(jax.random.fold_in(keys[3], 1), y, aug), x)
  x = _maybe(keys[4], aug.grayscale,
             lambda y: jnp.broadcast_to(pix.rgb_to_grayscale(y, keep_dims=True), y.shape), x)

  def blur(y):
    sigma = jax.random.uniform(jax.random.fold_in(keys[5], 1), (),
                               minval=aug.blur_sigma[0], maxval=aug.blur_sigma[1])
    return pix.gaussian_blur(y, sigma, aug.blur_kernel)

  x = _maybe(keys[5], aug.blur, blur, x)
  x = _maybe(keys[6], aug.solarize, lambda y: pix.solarize(y, aug.solarize_threshold), x)
  return x


def device_view(images: jax.Array, index: int, aug: ViewAugment) -> tuple[jax.Array, ViewAugment]:
  """The images and the augmentation the device applies for view ``index``.

  Args:
    images: uint8 [N, H, W, C], the same images for every view (the device
      crops), or [N, V, S, S, C], each view's crop cut on the host
      (data/host_crop.py, ImageNet).
    index: the view.
    aug: the view's augmentation.

  Returns:
    ([N, H, W, C] images, ``aug``), or the host's crops of view ``index``
    with ``aug`` without its crop (done already).
  """
  if images.ndim == 5:
    return images[:, index], aug._replace(crop=0.0)
  return images, aug


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
    images: [N, H, W, C] uint8, the global batch (or [N, 1, S, S, C], crops
      cut on the host: see device_view).
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
    images, view = device_view(images, 0, view)
    x = augment_batch(jax.random.split(key, images.shape[0]), images, view, out_size)
  return normalize(x, mean, std).astype(dtype)

