"""The crop and the colour jitter against NumPy transcriptions of torchvision.

The transcriptions are written from torchvision's algorithms (RandomResizedCrop.get_params,
ColorJitter.forward and the float-tensor adjust_* functions), with NumPy's RNG; the crop is
compared in distribution (two-sample Kolmogorov-Smirnov distance), the jitter op by op.
"""

import colorsys
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from barlow_jax.data import augment

N_BOXES = 20_000
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
GRAY = np.array([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale weights.


# --- Random resized crop -------------------------------------------------------------------------

def _torchvision_box(rng, height, width, scale, ratio):
  """RandomResizedCrop.get_params, transcribed: (i, j, h, w)."""
  area = height * width
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _clipped_box(rng, height, width, scale, ratio):
  """The sampler before issue 10: one attempt, the sides clipped to the image."""
  area = rng.uniform(*scale) * height * width
  aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
  w = min(max(math.sqrt(area * aspect), 1.0), width)
  h = min(max(math.sqrt(area / aspect), 1.0), height)
  return rng.uniform() * (height - h), rng.uniform() * (width - w), h, w


def _numpy_boxes(sampler, height, width, scale=SCALE, ratio=RATIO, n=N_BOXES, seed=0):
  rng = np.random.default_rng(seed)
  return np.array([sampler(rng, height, width, scale, ratio) for _ in range(n)], np.float64).T


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _our_boxes(keys, height, width, scale, ratio):
  return jnp.stack(jax.vmap(lambda k: augment.random_crop_box(k, height, width, scale, ratio))(keys))


def _ours(height, width, scale=SCALE, ratio=RATIO, n=N_BOXES, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return np.asarray(_our_boxes(keys, height, width, scale, ratio), np.float64)


def _ks(a, b):
  """Two-sample Kolmogorov-Smirnov distance: max |ECDF_a - ECDF_b| (ties handled)."""
  a, b = np.sort(a), np.sort(b)
  at = np.concatenate([a, b])
  return np.max(np.abs(np.searchsorted(a, at, side='right') / a.size
                       - np.searchsorted(b, at, side='right') / b.size))


def _area_and_aspect(boxes, height, width):
  _, _, h, w = boxes
  return h * w / (height * width), w / h


@pytest.mark.parametrize('height, width, max_ks', [(224, 224, 0.02), (32, 32, 0.05),
                                                   (180, 320, 0.02)])
def test_crop_box_distribution_matches_torchvision(height, width, max_ks):
  ours = _ours(height, width)
  theirs = _numpy_boxes(_torchvision_box, height, width)
  y0, x0, h, w = ours
  assert np.all(ours == np.round(ours)), 'boxes are integer-valued'
  assert np.all((y0 >= 0) & (x0 >= 0) & (h >= 1) & (w >= 1))
  assert np.all((y0 + h <= height) & (x0 + w <= width)), 'boxes lie inside the image'
  for name, a, b in zip(('area', 'aspect'), _area_and_aspect(ours, height, width),
                        _area_and_aspect(theirs, height, width)):
    assert _ks(a, b) <= max_ks, (name, _ks(a, b), a.mean(), b.mean())
  # The offsets too: uniform over the free range, as torchvision's randint.
  for a, b in ((y0 / height, theirs[0] / height), (x0 / width, theirs[1] / width)):
    assert _ks(a, b) <= max_ks


def test_old_clipped_sampler_fails_the_same_check():
  """The KS check is sharp enough to see the bias of clipping instead of resampling."""
  theirs = _area_and_aspect(_numpy_boxes(_torchvision_box, 224, 224), 224, 224)
  old = _area_and_aspect(_numpy_boxes(_clipped_box, 224, 224, seed=1), 224, 224)
  assert _ks(old[0], theirs[0]) > 0.06  # Area; measured 0.12 (threshold 0.02).
  assert old[0].mean() > theirs[0].mean() + 0.03  # Clipped boxes are larger on average.


@pytest.mark.parametrize('height, width, box', [(180, 320, (0, 40, 180, 240)),
                                                (320, 180, (40, 0, 240, 180))])
def test_crop_box_falls_back_to_torchvision_centre_crop(height, width, box):
  """With scale (1, 1) no box of aspect in [3/4, 4/3] fits a 16:9 image: centre fallback."""
  rng = np.random.default_rng(0)
  assert _torchvision_box(rng, height, width, (1.0, 1.0), RATIO) == box
  ours = _ours(height, width, scale=(1.0, 1.0), n=64)
  np.testing.assert_array_equal(ours, np.tile(np.array(box, np.float64)[:, None], (1, 64)))


# --- Colour jitter -------------------------------------------------------------------------------

def _np_blend(x, other, f):
  return np.clip(f * x + (1 - f) * other, 0, 1)


def _np_adjust(op, x, f):
  """torchvision's adjust_{brightness,contrast,saturation,hue} on a float HWC image."""
  gray = x @ GRAY
  if op == 0:
    return _np_blend(x, 0.0, f)
  if op == 1:
    return _np_blend(x, gray.mean(), f)
  if op == 2:
    return _np_blend(x, gray[..., None], f)
  hsv = [colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]
  rgb = [colorsys.hsv_to_rgb((h + f) % 1.0, s, v) for h, s, v in hsv]
  return np.clip(np.array(rgb).reshape(x.shape), 0, 1)


def _np_color_jitter(x, order, factors):
  """ColorJitter.forward, transcribed, given its randperm and factors."""
  for op in order:
    x = _np_adjust(int(op), x, float(factors[op]))
  return x


def _image(size=8, seed=0):
  return np.random.default_rng(seed).random((size, size, 3))


def _adjust(op: int):
  """Our op ``op`` of JITTER_OPS alone: the blend that color_jitter runs, or hue."""
  if op == augment.JITTER_OPS.index('hue'):
    return augment.adjust_hue
  return lambda x, f: augment._blend_op(x, jnp.int32(op), jnp.full((4,), f, jnp.float32))  # pylint: disable=protected-access


def test_contrast_is_torchvisions_grayscale_mean_blend():
  x = _image(16)
  contrast = _adjust(augment.JITTER_OPS.index('contrast'))
  for f in (0.0, 0.6, 1.4):
    ours = np.asarray(contrast(jnp.asarray(x, jnp.float32), f))
    np.testing.assert_allclose(ours, np.clip(f * x + (1 - f) * (x @ GRAY).mean(), 0, 1), atol=1e-6)
  # dm-pix blends each channel with its own mean: a different result.
  pix_out = augment.pix.adjust_contrast(jnp.asarray(x, jnp.float32), 0.6)
  assert np.abs(np.asarray(pix_out) - np.asarray(contrast(x, 0.6))).max() > 1e-3


@pytest.mark.parametrize('op', [0, 2, 3])
def test_brightness_saturation_hue_are_torchvisions(op):
  x = _image(16)
  fn = _adjust(op)
  for f in ((0.6, 1.4) if op < 3 else (-0.1, 0.07)):
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x, jnp.float32), f)),
                               _np_adjust(op, x, f), atol=2e-5)


def _jitter_params(aug, n, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  order, factors = jax.jit(jax.vmap(lambda k: augment.jitter_params(k, aug)))(keys)
  return keys, np.asarray(order), np.asarray(factors)


def test_jitter_order_is_a_uniform_random_permutation_and_factors_in_range():
  aug = augment.ViewAugment(brightness=0.4, contrast=1.5, saturation=0.2, hue=0.1)
  n = 24_000
  _, order, factors = _jitter_params(aug, n)
  counts = {p: 0 for p in itertools.permutations(range(4))}
  for row in order:
    counts[tuple(row)] += 1  # KeyError if a row is not a permutation.
  expected = n / 24
  chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
  assert min(counts.values()) > 0 and chi2 < 60, (chi2, counts)  # 23 dof: P(chi2 > 60) < 1e-4.
  lower = np.array([0.6, 0.0, 0.8, -0.1])  # Contrast 1.5: max(0, 1 - 1.5) = 0.
  upper = np.array([1.4, 2.5, 1.2, 0.1])
  assert np.all((factors >= lower) & (factors <= upper))
  np.testing.assert_allclose(factors.mean(0), (lower + upper) / 2, atol=0.02)


def test_color_jitter_follows_its_order_like_torchvision():
  """Every example equals the transcription of torchvision with its own order and factors."""
  aug = augment.ViewAugment()
  keys, order, factors = _jitter_params(aug, 48)
  x = _image()
  out = np.asarray(jax.jit(jax.vmap(lambda k: augment.color_jitter(k, jnp.asarray(x, jnp.float32),
                                                                    aug)))(keys))
  for o, p, f in zip(out, order, factors):
    np.testing.assert_allclose(o, _np_color_jitter(x, p, f), atol=1e-4)


def test_jitter_order_changes_the_output():
  """Brightness and contrast only: they commute except for clamping, so with a bright image the
  two orders give different outputs, and each example shows the one of its own order."""
  aug = augment.ViewAugment(brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0)
  n = 200
  keys, order, factors = _jitter_params(aug, n)
  x = 0.3 + 0.7 * _image()
  out = np.asarray(jax.jit(jax.vmap(lambda k: augment.color_jitter(k, jnp.asarray(x, jnp.float32),
                                                                    aug)))(keys))
  b_first = np.array([list(p).index(0) < list(p).index(1) for p in order])
  assert 0.4 < b_first.mean() < 0.6
  differ = 0
  for o, f, bf in zip(out, factors, b_first):
    bc = _np_color_jitter(x, [0, 1], f)
    cb = _np_color_jitter(x, [1, 0], f)
    np.testing.assert_allclose(o, bc if bf else cb, atol=1e-5)
    differ += np.abs(bc - cb).max() > 1e-3
  assert differ > n // 4  # The order is visible in the outputs.


def test_jitter_and_grayscale_fire_at_their_rates_together():
  aug = augment.ViewAugment(crop=0.0, flip=0.0, blur=0.0, solarize=0.0)  # Jitter 0.8, gray 0.2.
  n = 2000
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  out = np.asarray(jax.jit(augment.augment_batch, static_argnums=(2, 3))(keys, images, aug, 8))
  x = np.asarray(images) / 255.0
  gray = np.repeat((x @ GRAY)[..., None], 3, axis=-1)
  grayed = np.all(np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3))
  untouched = np.all(np.abs(out - np.where(grayed[:, None, None, None], gray, x)) < 1e-4,
                     axis=(1, 2, 3))
  for rate, p in ((grayed.mean(), aug.grayscale), (1 - untouched.mean(), aug.jitter)):
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (rate, p)
