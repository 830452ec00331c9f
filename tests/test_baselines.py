"""Seed 000's raw-pixel baselines on CIFAR-10 (real, or fake and learnable), against a NumPy KNN."""

import json

import numpy as np
import pytest

from barlow_jax import errors
from barlow_jax.stages import baselines
from barlow_jax import config_validation
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from conftest import cifar10_split_sizes, config_module, DATA_DIR, needs_cifar10

cifar_baselines = config_module('cifar_baselines')


def _config():
  config = cifar_baselines.get_config()
  config.data_dir, config.download = DATA_DIR, False
  config.train_split = 'train[:1000]'
  config.label_fraction = 0.5  # 50 images per class.
  config.forest_trees = 10
  return config


def _knn5_numpy(train_x, train_y, test_x):
  """Brute force: standardise with the train statistics, 5 nearest in L2, majority vote."""
  mean, std = train_x.mean(0), train_x.std(0)
  std[std == 0] = 1.0
  a, b = (train_x - mean) / std, (test_x - mean) / std
  distances = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
  nearest = np.argsort(distances, axis=1, kind='stable')[:, :5]
  votes = np.stack([np.bincount(row, minlength=10) for row in train_y[nearest]])
  return votes.argmax(1)  # Ties: the smallest class, as argmax of sklearn's probabilities.


@needs_cifar10
def test_baselines_on_a_balanced_fraction(tmp_path):
  config = _config()
  results = baselines.run(config, str(tmp_path))

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved == json.loads(json.dumps(results))
  assert saved['num_train'] == 500
  for name in ('knn_k5', 'logistic_regression', 'random_forest'):
    # The whole test split, every image once (10000 real images, fewer fake ones).
    assert saved[name]['num_examples'] == cifar10_split_sizes()['test']
    assert 0.1 < saved[name]['top1'] < 0.6, (name, saved[name]['top1'])
  assert saved['logistic_regression']['chosen_c'] in config.logistic_cs
  assert '| logistic_regression |' in (tmp_path / 'results.md').read_text()

  dataset = datasets.resolve(config.dataset, data_dir=config.data_dir, download=False, crop_size=0)
  train_x, train_y = baselines.load_pixels(dataset, config.train_split)
  keep = pipeline.balanced_subset(train_y, 0.5, 10, config.fraction_seed)
  test_x, test_y = baselines.load_pixels(dataset, 'test')
  predicted = _knn5_numpy(train_x[keep].astype(np.float64), train_y[keep], test_x.astype(np.float64))
  assert saved['knn_k5']['top1'] == pytest.approx(float((predicted == test_y).mean()), abs=2e-4)


def test_bad_baseline_settings_name_the_key():
  config = _config()
  config.methods = ('knn_k5', 'svm')
  with pytest.raises(errors.ConfigError, match=r"config\.methods=.*unknown: \['svm'\]"):
    config_validation.validate_baselines(config)
  config = _config()
  config.logistic_cs = (0.1, 0.0)
  with pytest.raises(errors.ConfigError, match=r'config\.logistic_cs='):
    config_validation.validate_baselines(config)
