"""The online kNN monitor of pretraining (config.knn_monitor, evaluators/knn_monitor.py).

Reference: the values a run logs must equal kNN top-1 recomputed afterwards
from the checkpoints saved at the same steps (restored from disk, not the
run's in-memory state), and from the state the run returns.
"""

import logging

import numpy as np
import pytest

from barlow_jax.data import datasets
from barlow_jax import config_validation
from barlow_jax import errors
from barlow_jax.evaluators import knn
from barlow_jax.evaluators import knn_monitor
from barlow_jax.evaluators import predict
from barlow_jax.models import factory
from barlow_jax.models import pretrained
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.stages import pretrain
from cli_runs import read_scalars
from conftest import features, needs_cifar10, tiny_config


def monitored_config(encoder: str):
  """4 steps per epoch (64 images, batch 16), 5 steps, the monitor every half epoch."""
  config = tiny_config()
  config.model.encoder = encoder
  config.train_split = 'train[:64]'
  config.num_steps = 5
  config.knn_monitor.every_epochs = 0.5  # Every 2 steps: 2, 4, and 5 (the end).
  config.knn_monitor.train_split = 'train[:256]'
  # Enough test images for the accuracy to change from step to step; 250 is
  # not a multiple of the batch, so the last batch is padded.
  config.knn_monitor.test_split = 'test[:250]'
  config.knn_monitor.k = 20
  return config


def top1_from(config, variables, predict_fn) -> float:
  """kNN top-1 of ``variables`` on config.knn_monitor's splits, computed here."""
  m = config.knn_monitor
  model = factory.create_model(config, datasets.num_classes(config))
  bank_x, bank_y = features(config, model, variables, m.train_split, 16, fn=predict_fn)
  test_x, test_y = features(config, model, variables, m.test_split, 16, fn=predict_fn)
  assert len(bank_y) == 256 and len(test_y) == 250
  scores = knn.knn_scores(bank_x, bank_y, test_x, 10, m.k, m.temperature)
  return float(np.mean(scores.argmax(1) == test_y))


@needs_cifar10
def test_logged_knn_equals_knn_of_the_checkpoints_at_those_steps(tmp_path, small_resnet, caplog):
  config = monitored_config(small_resnet)
  caplog.set_level(logging.INFO)
  state = pretrain.run(config, str(tmp_path))

  logged = read_scalars(tmp_path, knn_monitor.METRIC)
  assert sorted(logged) == [2, 4, 5]
  assert len(set(logged.values())) == 3  # Distinct, so a mix-up of steps would show.
  assert f'step 5: kNN (k=20) top-1 {logged[5]:.4f}' in caplog.text
  predict_fn = predict.make_predict_fn(config, factory.create_model(config, 10),
                                       outputs=('features',), spec=datasets.DATASETS['cifar10'])
  for step in (2, 4, 5):  # Checkpoints every 2 steps and at the end.
    restored = pretrained.load(str(tmp_path), mesh_lib.make_mesh(), step)
    assert restored.step == step
    assert logged[step] == pytest.approx(top1_from(config, restored.variables, predict_fn),
                                         abs=1e-6)
  final = {'params': state.params, 'batch_stats': state.batch_stats}
  assert logged[5] == pytest.approx(top1_from(config, final, predict_fn), abs=1e-6)
  assert read_scalars(tmp_path, 'train/bt_loss')  # The loop's own scalars are still written.


def test_every_epochs_becomes_steps_once_and_zero_is_off():
  assert knn_monitor.every_steps(0.0, 100) == 0
  assert knn_monitor.every_steps(1.0, 195) == 195
  assert knn_monitor.every_steps(0.5, 5) == 2  # round(2.5): banker's rounding, 2.
  assert knn_monitor.every_steps(1e-6, 100) == 1  # At least every step.
  fired = [s for s in range(1, 11) if knn_monitor.fires_at(s, 3, total_steps=10)]
  assert fired == [3, 6, 9, 10]
  assert not any(knn_monitor.fires_at(s, 0, total_steps=10) for s in range(1, 11))
  config = tiny_config()  # Off in the tests' config: no hook, no data read.
  assert knn_monitor.make_hook(config, None, steps_per_epoch=4, total_steps=8,
                               mesh=None) is None


@pytest.mark.parametrize('key, value, message', [
    ('every_epochs', -1.0, r'config\.knn_monitor\.every_epochs=-1\.0 must be >= 0'),
    ('k', 0, r'config\.knn_monitor\.k=0 must be a positive integer'),
    ('temperature', 0.0, r'config\.knn_monitor\.temperature=0\.0 must be positive'),
    ('test_split', '', r"config\.knn_monitor\.test_split='' must be a TFDS split"),
])
def test_invalid_monitor_settings_name_the_key(key, value, message):
  config = tiny_config()
  config.knn_monitor[key] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_validation.validate_pretrain(config)


@needs_cifar10
@pytest.mark.parametrize('key, value, message', [
    ('test_split', 'tset', r"config\.knn_monitor\.test_split='tset' is not a split of cifar10"),
    ('k', 300, r"config\.knn_monitor\.k=300 is larger than the memory bank"),
])
def test_bad_splits_fail_before_training(tmp_path, key, value, message):
  config = monitored_config('resnet18')
  config.knn_monitor[key] = value
  with pytest.raises(errors.ConfigError, match=message):
    knn_monitor.make_hook(config, datasets.from_config(config), steps_per_epoch=4, total_steps=5,
                          mesh=mesh_lib.make_mesh())
