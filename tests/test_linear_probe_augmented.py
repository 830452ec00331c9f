"""The linear probe trained on augmented views computed on the fly (config.probe.augment).

References: with augmentation off, the on-the-fly probe must train the
classifier that the cached-feature probe trains on the same batches in the
same order, and that a float64 NumPy SGD written out here trains; with
augmentation on, the views (keys per example from (seed, step)) and so the
classifier must not depend on the device count. End to end: the stage on a
2-step pretraining checkpoint.
"""

import json
import logging
import math

import jax
import numpy as np
import pytest

from barlow_jax import config_validation
from barlow_jax import errors
from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.evaluators import linear_probe
from barlow_jax.models import factory
from barlow_jax.models import pretrained
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.stages import linear
from conftest import (DATA_DIR, config_module, features, needs_cifar10, pretraining_workdir,
                      snapshot, tiny_config)


SPLIT = 'train[:96]'  # 3 batches of 32 per epoch.
HYPER = linear_probe.ProbeHParams(epochs=3, batch_size=32, lr=0.3, weight_decay=1e-3, momentum=0.9,
                                  seed=5)
NO_AUGMENTATION = augment.ViewAugment(crop=0.0, flip=0.0, jitter=0.0, grayscale=0.0, blur=0.0,
                                      solarize=0.0)
CROP_FLIP = augment.ViewAugment(crop=1.0, flip=0.5, jitter=0.0, grayscale=0.0, blur=0.0,
                                solarize=0.0)


def numpy_probe(x, y, order, num_classes, lr, weight_decay, momentum):
  """Float64 softmax regression: standardise, then SGD momentum with L2 and cosine lr.

  Step t uses rows order[t] and lr * (1 + cos(pi t / T)) / 2, T = len(order).
  """
  mean, std = x.mean(0), x.std(0) + 1e-6
  z = (x - mean) / std
  w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
  vw, vb = np.zeros_like(w), np.zeros_like(b)
  for t, rows in enumerate(order):
    logits = z[rows] @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(rows)), y[rows]] -= 1.0  # d(mean CE)/d(logits), times the batch size.
    gw, gb = z[rows].T @ p / len(rows) + weight_decay * w, p.mean(0) + weight_decay * b
    vw, vb = momentum * vw + gw, momentum * vb + gb
    step_lr = lr * 0.5 * (1 + math.cos(math.pi * t / len(order)))
    w, b = w - step_lr * vw, b - step_lr * vb
  return lambda f: ((f - mean) / std) @ w + b


@pytest.fixture(scope='module')
def encoder(small_resnet):
  """(the random-init encoder, data, clean features and labels of SPLIT)."""
  config = tiny_config()
  config.model.encoder = small_resnet
  config.train_split = SPLIT
  model = factory.create_model(config, datasets.num_classes(config))
  variables = state_lib.init_variables(model, 32, jax.random.PRNGKey(0))
  x, y = features(config, model, variables, SPLIT, 32, mesh_lib.make_mesh())
  return pretrained.Pretrained(config, model, variables, 0), pipeline.load_train_data(
      datasets.from_config(config), config.train_split, config.fraction, config.fraction_seed), x, y


def pipeline_order(config, data, steps: int) -> np.ndarray:
  """[steps, 32] rows of SPLIT (its order in extract_features) in the probe's batches."""
  builder = datasets.get_builder(config.dataset, config.data_dir, config.download)
  images = next(pipeline.eval_batches(builder, data.spec, SPLIT, 96))['image']
  row_of = {im.tobytes(): i for i, im in enumerate(images)}
  assert len(row_of) == 96  # No duplicate images: the mapping is exact.
  stream = pipeline.train_dataset(data, 32, HYPER.seed).as_numpy_iterator()
  return np.array([[row_of[im.tobytes()] for im in next(stream)['image']]
                   for _ in range(steps)])


@needs_cifar10
def test_without_augmentation_equals_cached_probe_and_numpy_in_the_same_order(encoder, tmp_path):
  encoder, data, x, y = encoder
  on_the_fly = linear_probe.train_augmented_probe(
      encoder, data, NO_AUGMENTATION, linear_probe.feature_standardizer(x), str(tmp_path), HYPER,
      mesh_lib.make_mesh())

  order = pipeline_order(encoder.config, data, steps=HYPER.epochs * 3)
  assert sorted(order[:3].ravel()) == list(range(96))  # Each epoch is a permutation.
  cached = linear_probe.train_linear_probe(x, y, 10, HYPER, batch_indices=order)
  reference = numpy_probe(x.astype(np.float64), y, order, 10, HYPER.lr, HYPER.weight_decay,
                          HYPER.momentum)

  logits = on_the_fly(x)
  assert np.abs(logits).max() > 1.0  # The classifier moved away from zero.
  np.testing.assert_allclose(logits, cached(x), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, reference(x), rtol=1e-3, atol=1e-3)
  np.testing.assert_array_equal(logits.argmax(1), reference(x).argmax(1))


@needs_cifar10
def test_augmented_views_do_not_depend_on_the_device_count(encoder, tmp_path):
  encoder, data, x, _ = encoder
  standardizer = linear_probe.feature_standardizer(x)
  hyper = HYPER._replace(epochs=1)
  logits = {n: linear_probe.train_augmented_probe(
      encoder, data, CROP_FLIP, standardizer, str(tmp_path / f'{n}'), hyper,
      mesh_lib.make_mesh(jax.devices()[:n]))(x) for n in (8, 1)}
  np.testing.assert_allclose(logits[8], logits[1], rtol=1e-4, atol=1e-5)
  clean = linear_probe.train_augmented_probe(encoder, data, NO_AUGMENTATION, standardizer,
                                             str(tmp_path / 'clean'), hyper,
                                             mesh_lib.make_mesh())(x)
  assert np.abs(logits[8] - clean).max() > 1e-2  # The augmentation did change the features.


@needs_cifar10
def test_stage_end_to_end_on_a_pretraining_checkpoint(tmp_path, small_resnet, caplog):
  """The linear stage with probe.augment, on 8 devices, from a 2-step checkpoint.

  In-process with the small encoder: a ResNet-18 checkpoint for a subprocess
  costs 35-50 s of compiling here; the command line adds nothing this stage
  does not share with the cached probe.
  """
  pretraining = tiny_config()
  pretraining.model.encoder = small_resnet
  pretraining_workdir(tmp_path / 'bt', pretraining, step=2)
  pretrained_files = snapshot(tmp_path / 'bt')

  config = cifar_linear.get_config()
  config.pretrained_workdir = str(tmp_path / 'bt')
  config.data_dir, config.download = DATA_DIR, False
  config.train_split, config.label_fraction = 'train[:500]', 0.2
  config.test_split, config.batch_size, config.knn.k = 'test[:40]', 64, (5,)
  config.probe.augment, config.probe.epochs, config.probe.batch_size = True, 2, 32
  config.probe.view.crop_scale = (0.2, 1.0)
  caplog.set_level(logging.INFO)
  results = linear.run(config, str(tmp_path / 'probe'))

  saved = json.loads((tmp_path / 'probe' / 'results.json').read_text())
  assert saved['linear']['top1'] == results['linear']['top1']
  assert saved['encoder'] == 'pretrained, step 2'
  assert saved['num_train'] == 100  # 20% of 500, balanced: 10 per class.
  probe = saved['linear']
  assert probe['augmented'] is True and probe['num_examples'] == 40
  assert probe['view']['crop_scale'] == [0.2, 1.0] and probe['view']['jitter'] == 0.0
  assert 0.0 <= probe['top1'] <= probe['top5'] <= 1.0
  assert saved['knn_k5']['num_examples'] == 40
  # The same probe on crop + flip views of the same 40 test images.
  assert saved['linear_aug_test']['num_examples'] == 40
  assert 0.0 <= saved['linear_aug_test']['top1'] <= 1.0
  # 100 examples in batches of 32: 3 steps per epoch, 2 epochs.
  assert 'Augmented probe: 100 examples, 6 steps of 32 (2 epochs), start at 0' in caplog.text
  assert 'step 6/6  loss' in caplog.text  # A progress line per epoch, the last one here.
  assert (tmp_path / 'probe' / 'checkpoints' / '6').is_dir()  # In the probe's own workdir,
  assert snapshot(tmp_path / 'bt') == pretrained_files  # never in the pretraining one.
  assert json.loads((tmp_path / 'probe' / 'config.json').read_text())['mode'] == 'linear'
  table = (tmp_path / 'probe' / 'results.md').read_text()
  assert '| linear, trained on augmented views |' in table
  assert '| linear, on augmented test images (probe.view) |' in table

cifar_linear = config_module('cifar_linear')


def test_invalid_probe_settings_name_the_key(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  config = cifar_linear.get_config()
  config.pretrained_workdir = str(tmp_path)
  config.probe.augment = True
  config.probe.batch_size = 12  # Not a multiple of the 8 test devices.
  with pytest.raises(errors.ConfigError, match=r'config\.probe\.batch_size=12'):
    config_validation.validate_linear(config)
  config.probe.batch_size = 16
  config.probe.view.flip = 1.5
  with pytest.raises(errors.ConfigError, match=r'config\.probe\.view\.flip=1\.5'):
    config_validation.validate_linear(config)
  config.probe.augment = False  # The view still makes the augmented test images.
  with pytest.raises(errors.ConfigError, match=r'config\.probe\.view\.flip=1\.5'):
    config_validation.validate_linear(config)
  config.probe.view.flip = 0.5
  config_validation.validate_linear(config)


@needs_cifar10
def test_random_init_baseline_has_the_recorded_architecture_and_fresh_weights(tmp_path,
                                                                            small_resnet):
  pretraining = tiny_config()
  pretraining.model.encoder = small_resnet
  pretraining_workdir(tmp_path / 'bt', pretraining, step=2)
  config = cifar_linear.get_config()
  config.pretrained_workdir, config.random_init, config.seed = str(tmp_path / 'bt'), True, 7
  config.data_dir = '/elsewhere/tfds'  # An override of the recorded data dir is applied.
  mesh = mesh_lib.make_mesh()
  random, description = linear.load_encoder(config, mesh)
  trained = pretrained.load(str(tmp_path / 'bt'), mesh)
  assert description == 'random init (same architecture)' and random.step == 0
  assert random.config.data_dir == '/elsewhere/tfds'
  assert trained.config.data_dir == DATA_DIR  # The recorded one, without overrides.
  shapes = lambda v: jax.tree.map(np.shape, v)
  assert shapes(random.variables['params']) == shapes(trained.variables['params'])
  differs = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                         random.variables['params']['backbone'],
                                         trained.variables['params']['backbone']))
  assert any(differs)  # Another initialisation (seed 7), not the checkpoint.
