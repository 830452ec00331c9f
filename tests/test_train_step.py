"""One train step on 8 devices equals one step on 1 device with the same global batch."""

import jax
import numpy as np
import pytest

from barlow_jax.data import datasets
from barlow_jax import errors
from barlow_jax import config_validation
from barlow_jax.models import factory
from barlow_jax import optim
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.stages import pretrain
from barlow_jax import trainer
from conftest import conv_backends, tiny_config


def _one_step(config, devices, batch):
  mesh = mesh_lib.make_mesh(devices)
  model = factory.create_model(config, datasets.num_classes(config), axis_name=mesh_lib.DATA_AXIS)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=10, total_steps=20)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, config.augment.crop_size)
  step = trainer.make_train_step(config, pretrain.make_loss_fn(model, config.lambd), tx, mesh,
                                  schedule, num_views=2, spec=datasets.dataset_spec(config.dataset))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS))
  state, metrics = step(state, {k: jax.device_put(v, sharding) for k, v in batch.items()})
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize('conv_backend', conv_backends())
def test_eight_devices_match_one(conv_backend, small_resnet):
  config = tiny_config()
  # What 8 devices must agree on (BatchNorm's and the loss's global batch, LARS's
  # global norms, the gradient's one all-reduce) is the same at any depth; a
  # strided stage with its projection shortcut is still there.
  config.model.encoder = small_resnet
  config.model.conv = conv_backend
  config.optimizer.name = 'lars'  # The paper's; its trust ratio needs global grad norms.
  config.optimizer.warmup_epochs = 0.0
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  state1, metrics1 = _one_step(config, jax.devices()[:1], batch)
  state8, metrics8 = _one_step(config, jax.devices(), batch)

  for key in ('bt_loss', 'on_diag', 'off_diag', 'probe_loss', 'grad_norm'):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-5, err_msg=key)
  # Parameters moved, and moved the same way.
  init = jax.device_get(state_lib.create_train_state(
      factory.create_model(config, 10), optim.create_optimizer(config, 10, 20)[0],
      mesh_lib.make_mesh(jax.devices()[:1]), config.seed, config.augment.crop_size))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), state1.params, init.params))
  assert max(moved) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               state8.params, state1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               state8.batch_stats, state1.batch_stats)
  assert int(state8.step) == int(state1.step) == 1


def test_batch_not_divisible_by_devices_is_a_config_error():
  config = tiny_config()
  config.batch_size = 12  # 8 devices.
  with pytest.raises(errors.ConfigError, match=r'batch_size=12.*device count \(8\)'):
    config_validation.validate_pretrain(config)


@pytest.mark.parametrize('key, value, message', [
    ('lambd', -1.0, r'config.lambd=-1.0'),
    ('fraction', 1.5, r'config.fraction=1.5'),
    ('fraction', 0.0, r'config.fraction=0.0'),
    ('dataset', 'mnist', r"config.dataset='mnist'"),
    ('model.encoder', 'resnet7', r"config.model.encoder='resnet7'"),
    ('model.projector', '512-x', r'config.model.projector'),
    ('optimizer.name', 'rmsprop', r"config.optimizer.name='rmsprop'"),
    ('augment.view2.solarize', 1.2, r'config.augment.view2.solarize=1.2'),
    ('augment.view1.blur_kernel', 4, r'config.augment.view1.blur_kernel=4'),
])
def test_invalid_values_name_the_key(key, value, message):
  config = tiny_config()
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_validation.validate_pretrain(config)


def _leaf_dtypes(tree) -> set:
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def test_bfloat16_step_matches_float32(small_resnet):
  """model.dtype='bfloat16' (imagenet_bt's default): bf16 compute, float32 state and loss.

  Same batch and initial parameters (same seed) as a float32 step on 8 devices.
  """
  config = tiny_config()
  config.model.encoder = small_resnet
  config.optimizer.name = 'lars'
  rng = np.random.default_rng(1)
  batch = {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 16).astype(np.int32)}
  init = jax.device_get(state_lib.create_train_state(
      factory.create_model(config, 10), optim.create_optimizer(config, 10, 20)[0],
      mesh_lib.make_mesh(jax.devices()[:1]), config.seed, config.augment.crop_size))
  state32, metrics32 = _one_step(config, jax.devices(), batch)
  config.model.dtype = 'bfloat16'
  state16, metrics16 = _one_step(config, jax.devices(), batch)

  # bf16 really ran (a float32 program would give the identical loss) ...
  assert metrics16['bt_loss'] != metrics32['bt_loss']
  # ... and the loss, computed from float32 C, is within 1% of the float32 one.
  np.testing.assert_allclose(metrics16['bt_loss'], metrics32['bt_loss'], rtol=0.01)
  assert _leaf_dtypes(metrics16) == {'float32'}, metrics16
  # Parameters, BN statistics and optimizer state stay float32 (bf16 only in compute).
  for tree in (state16.params, state16.batch_stats, state16.opt_state):
    assert _leaf_dtypes(tree) <= {'float32', 'int32'}, _leaf_dtypes(tree)
  np.testing.assert_allclose(
      np.concatenate([x.ravel() for x in jax.tree.leaves(state16.batch_stats)]),
      np.concatenate([x.ravel() for x in jax.tree.leaves(state32.batch_stats)]),
      rtol=0.02, atol=2e-3)
  # The update (new - initial params) points the same way in bf16: its error is
  # small relative to the update itself. bf16 keeps 8 mantissa bits (rounding
  # 2^-9 = 0.2% per op), compounded over the forward and backward pass of every
  # layer and amplified by BN over 16 examples of 4 channels; LARS rescales each
  # layer's gradient to a fixed trust ratio, so the error is that of the gradient's
  # direction. Measured (2026-12-04): 7.8% over all parameters, at most 14% for one
  # layer (a BN bias); a wrong update (other batch, flipped sign) errs by O(1).
  # A layer that float32 leaves unchanged must stay unchanged (0 <= 0).
  def error_and_update(p16, p32, p0):
    return np.linalg.norm(p16 - p32), np.linalg.norm(p32 - p0)
  pairs = jax.tree.leaves(jax.tree.map(error_and_update, state16.params, state32.params,
                                       init.params), is_leaf=lambda x: isinstance(x, tuple))
  errors, updates = np.array(pairs).T
  assert (updates > 0).sum() > len(pairs) // 2
  assert all(errors <= 0.25 * updates), pairs
  overall = np.linalg.norm(errors) / np.linalg.norm(updates)
  print(f'bf16 vs f32 update error: overall {overall:.3f}, worst layer {max(errors / np.maximum(updates, 1e-30)):.3f}')
  assert overall < 0.15, overall
