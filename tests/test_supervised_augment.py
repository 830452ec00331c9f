"""Each ablation's targeted transformations reach one branch only (configs and statistics)."""

import jax
import numpy as np
import pytest

from barlow_jax import errors
from barlow_jax.data import augment
from barlow_jax import config_validation
from barlow_jax.stages import supervised
from conftest import config_module, tiny_supervised_config

cifar_finetune = config_module('cifar_finetune')
cifar_supervised = config_module('cifar_supervised')
cifar_supervised_bt = config_module('cifar_supervised_bt')
stl10_supervised_bt = config_module('stl10_supervised_bt')

N = 256


def _views(ablation):
  view1, view2 = cifar_supervised_bt.views(ablation)
  return augment.view_from_config(view1), augment.view_from_config(view2)


def _augment(images, view, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(images))
  return np.asarray(jax.jit(lambda k, x: augment.augment_batch(k, x, view, 32))(keys, images))


@pytest.mark.parametrize('ablation', sorted(cifar_supervised_bt.ABLATIONS))
def test_targeted_transformations_are_on_view1_only(ablation):
  view1, view2 = _views(ablation)
  for name in cifar_supervised_bt.ABLATIONS[ablation]:
    assert getattr(view1, name) > 0 and getattr(view2, name) == 0, name
  for name in ('jitter', 'blur'):  # Not part of the seed's pipeline.
    assert getattr(view1, name) == getattr(view2, name) == 0


def test_grayscale_and_solarize_statistics_over_a_batch():
  # A flat colour survives crop and flip unchanged, so each image shows
  # exactly which of grayscale (R = G = B) and solarize (dark) it received.
  # Its grey level (204) is above the threshold: solarize is visible on both.
  images = np.broadcast_to(np.array([230, 200, 160], np.uint8), (N, 32, 32, 3)).copy()
  view1, view2 = _views('grayscale_solarize')
  out1, out2 = _augment(images, view1, 0), _augment(images, view2, 1)
  gray1 = np.ptp(out1, axis=-1).max(axis=(1, 2)) < 1e-3
  solarized1 = out1.mean(axis=(1, 2, 3)) < 0.5
  assert 0.4 < gray1.mean() < 0.6 and 0.4 < solarized1.mean() < 0.6
  assert 0.1 < (gray1 & solarized1).mean() < 0.4  # Independent draws.
  np.testing.assert_allclose(out2, images / 255.0, atol=2e-6)  # View 2: neither, ever.


def test_crop_on_one_branch_only():
  images = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
  x = images / 255.0
  view1, view2 = _views('crop')
  out1, out2 = _augment(images, view1, 0), _augment(images, view2, 1)

  def uncropped(out):  # The image itself or its mirror image.
    same = np.abs(out - x).max(axis=(1, 2, 3)) < 1e-5
    mirrored = np.abs(out - x[:, :, ::-1]).max(axis=(1, 2, 3)) < 1e-5
    return same | mirrored, mirrored

  kept2, mirrored2 = uncropped(out2)
  assert kept2.all() and 0.4 < mirrored2.mean() < 0.6  # Flip, never a crop.
  assert uncropped(out1)[0].mean() < 0.05  # Cropped (a crop of scale ~1 may look uncropped).


def test_crop_flip_other_branch_is_the_identity():
  images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  _, view2 = _views('crop_flip')
  np.testing.assert_allclose(_augment(images, view2, 0), images / 255.0, atol=1e-5)


@pytest.mark.parametrize('arg', ['', 'vgg16', 'crop', 'vgg16,solarize', 'flip,resnet18'])
def test_configs_are_valid(arg):
  config = cifar_supervised_bt.get_config(arg)
  config_validation.validate_supervised(config)
  assert config.batch_size == (512 if 'vgg16' in arg else 128)


def test_baseline_configs_are_valid():
  for config in (cifar_supervised.get_config(), cifar_supervised.get_config('noaug')):
    config_validation.validate_supervised(config)
    assert config.num_branches == 1 and config.gamma == 0
  assert cifar_supervised.get_config('noaug').augment.view1.crop == 0
  config = cifar_finetune.get_config()
  assert config.optimizer.head_lr == 0.5 and config.optimizer.lr == 0.002


def test_stl10_adds_unlabelled_images_only_for_the_bt_term():
  config = stl10_supervised_bt.get_config()
  config_validation.validate_supervised(config)
  assert supervised.train_split(config) == 'train+unlabelled[:5000]'
  config.gamma = 0.0  # The baseline: the 5000 labelled images alone (§4.4).
  assert supervised.train_split(config) == 'train'


def test_unknown_config_argument_names_the_choices():
  with pytest.raises(ValueError, match='grayscale_solarize'):
    cifar_supervised_bt.get_config('resnet7')


@pytest.mark.parametrize('key, value, message', [
    ('gamma', -1.0, r'config.gamma=-1.0'),
    ('num_branches', 3, r'config.num_branches=3'),
    ('model.embedding', '12-x', r'config.model.embedding'),
    ('eval.aug_view', 'view3', r"config.eval.aug_view='view3'"),
    ('optimizer.head_lr', -0.1, r'config.optimizer.head_lr=-0.1'),

])
def test_invalid_values_name_the_key(key, value, message):
  config = tiny_supervised_config()
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_validation.validate_supervised(config)


def test_bt_term_needs_two_branches():
  config = tiny_supervised_config()
  config.num_branches = 1
  with pytest.raises(errors.ConfigError, match='num_branches=2'):
    config_validation.validate_supervised(config)
