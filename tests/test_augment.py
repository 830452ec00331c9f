"""On-device augmentation: shapes, range, independence, determinism, firing rates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from barlow_jax.data import augment

N = 512  # Examples for the rate checks; 3 sigma of a p=0.5 rate is 0.066.
OFF = augment.ViewAugment(crop=0.0, flip=0.0, jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0,
                          blur_kernel=3)


def _images(n=N, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _run(keys, images, aug, out_size):
  return augment.augment_batch(keys, images, aug, out_size)


def _keys(n=N, seed=0):
  return jax.random.split(jax.random.PRNGKey(seed), n)


def test_shape_dtype_and_range():
  aug = augment.ViewAugment(blur_kernel=3, solarize=0.5)
  out = _run(_keys(64), _images(64, size=40), aug, 24)
  assert out.shape == (64, 24, 24, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_everything_off_is_identity():
  images = _images(8)
  np.testing.assert_allclose(np.asarray(_run(_keys(8), images, OFF, 16)),
                             np.asarray(images) / 255.0, atol=1e-5)


def test_deterministic_given_keys_and_independent_per_example():
  aug = augment.ViewAugment(blur_kernel=3)
  one = np.repeat(np.asarray(_images(1)), 32, axis=0)  # The same image 32 times.
  a = np.asarray(_run(_keys(32), jnp.asarray(one), aug, 16))
  b = np.asarray(_run(_keys(32), jnp.asarray(one), aug, 16))
  np.testing.assert_array_equal(a, b)
  flat = a.reshape(32, -1)
  distinct = {row.tobytes() for row in flat}
  assert len(distinct) == 32  # Every example drew its own augmentation.
  c = np.asarray(_run(_keys(32, seed=1), jnp.asarray(one), aug, 16))
  assert not np.allclose(a, c)


def _rate(aug, fired):
  images = _images()
  x = np.asarray(images) / 255.0
  out = np.asarray(_run(_keys(), images, aug, 16))
  return np.mean([fired(o, i) for o, i in zip(out, x)])


def _changed(o, i):
  return not np.allclose(o, i, atol=1e-4)


@pytest.mark.parametrize('field, p, fired', [
    ('flip', 0.5, lambda o, i: np.allclose(o, i[:, ::-1], atol=1e-5)),
    ('grayscale', 0.2, lambda o, i: np.allclose(o[..., 0], o[..., 1]) and np.allclose(o[..., 1], o[..., 2])),
    ('solarize', 0.2, _changed),
    ('jitter', 0.8, _changed),
    ('blur', 0.1, _changed),
    ('crop', 0.5, _changed),
])
def test_each_op_fires_at_its_configured_rate(field, p, fired):
  rate = _rate(OFF._replace(**{field: p}), fired)
  sigma = np.sqrt(p * (1 - p) / N)
  assert abs(rate - p) < 4 * sigma, (field, rate, p)


def test_view_from_config_rejects_unknown_keys():
  with pytest.raises(ValueError, match='solarise'):
    augment.view_from_config({'solarise': 0.2})
