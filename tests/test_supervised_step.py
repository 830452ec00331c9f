"""The supervised step (CE + CE + gamma * BT) against NumPy, 8 devices against 1, masking."""

import jax
import numpy as np
import pytest

from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.models import factory
from barlow_jax import optim
from barlow_jax.stages import supervised
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax import trainer
from conftest import tiny_supervised_config


def _batch(num_unlabelled: int = 0):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  labels[:num_unlabelled] = -1  # As STL-10's unlabelled images.
  return {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), 'label': labels}


def _one_step(config, devices, batch):
  """(initial state, state after one step, metrics), all on the host."""
  mesh = mesh_lib.make_mesh(devices)
  model = factory.create_supervised_model(config, 10, axis_name=mesh_lib.DATA_AXIS)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=10, total_steps=20)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, config.augment.crop_size)
  initial = jax.device_get(state)  # Before the step donates it.
  step = trainer.make_train_step(
      config, supervised.make_loss_fn(model, config.gamma, config.lambd), tx, mesh, schedule,
      num_views=config.num_branches, spec=datasets.dataset_spec(config.dataset))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS))
  state, metrics = step(state, {k: jax.device_put(v, sharding) for k, v in batch.items()})
  return initial, jax.device_get(state), jax.device_get(metrics)


def _numpy_cross_entropy(logits, labels):
  """Mean over labelled examples of -log softmax(logits)[label], float64."""
  logits = np.asarray(logits, np.float64)
  valid = labels >= 0
  shifted = logits - logits.max(1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return -log_probs[valid, labels[valid]].mean()


def _numpy_barlow_twins(z1, z2, lambd, eps=1e-5):
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  z1 = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)
  z2 = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
  c = z1.T @ z2 / len(z1)
  on = ((1 - np.diag(c)) ** 2).sum()
  return on + lambd * ((c ** 2).sum() - (np.diag(c) ** 2).sum())


def _reference(config, state, batch):
  """CE1, CE2 and BT of one step, recomputed on one device outside the step."""
  model = factory.create_supervised_model(config, 10)  # No axis name: one device.
  spec = datasets.dataset_spec(config.dataset)
  keys1, keys2 = trainer.view_keys(state.rng, state.step, len(batch['label']), num_views=2)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  outs = []
  for keys, name in ((keys1, 'view1'), (keys2, 'view2')):
    view = augment.view_from_config(config.augment[name])
    x = augment.normalize(augment.augment_batch(keys, batch['image'], view, 32), spec.mean, spec.std)
    out, upd = model.apply(variables, x, train=True, mutable=['batch_stats'])
    variables = {'params': state.params, 'batch_stats': upd['batch_stats']}
    outs.append(jax.device_get(out))
  labels = batch['label']
  return (_numpy_cross_entropy(outs[0]['logits'], labels),
          _numpy_cross_entropy(outs[1]['logits'], labels),
          _numpy_barlow_twins(outs[0]['embeddings'], outs[1]['embeddings'], config.lambd))


def test_gamma_zero_loss_is_the_sum_of_the_two_cross_entropies(small_resnet):
  config = tiny_supervised_config()
  config.model.encoder = small_resnet
  config.gamma = 0.0
  batch = _batch()
  initial, _, metrics = _one_step(config, jax.devices(), batch)
  ce1, ce2, bt = _reference(config, initial, batch)
  np.testing.assert_allclose(metrics['ce1'], ce1, rtol=1e-5)
  np.testing.assert_allclose(metrics['ce2'], ce2, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], ce1 + ce2, rtol=1e-5)
  # BT is still logged for the baseline, but is not part of its loss.
  np.testing.assert_allclose(metrics['bt_loss'], bt, rtol=1e-4)


@pytest.fixture(scope='module')
def gamma_runs(small_resnet):
  """One step with gamma > 0 and 4 of 16 labels hidden, on 1 and on 8 devices."""
  config = tiny_supervised_config()
  config.model.encoder = small_resnet
  config.gamma = 0.05
  batch = _batch(num_unlabelled=4)
  return config, batch, _one_step(config, jax.devices()[:1], batch), _one_step(
      config, jax.devices(), batch)


def test_loss_adds_gamma_bt_and_ignores_unlabelled_examples_in_ce(gamma_runs):
  config, batch, _, (initial, _, metrics) = gamma_runs
  ce1, ce2, bt = _reference(config, initial, batch)  # CE over the 12 labelled only.
  np.testing.assert_allclose(metrics['ce1'], ce1, rtol=1e-5)
  np.testing.assert_allclose(metrics['ce2'], ce2, rtol=1e-5)
  np.testing.assert_allclose(metrics['bt_loss'], bt, rtol=1e-4)  # BT over all 16.
  np.testing.assert_allclose(metrics['loss'], ce1 + ce2 + config.gamma * bt, rtol=1e-5)


def test_eight_devices_match_one(gamma_runs):
  _, _, (initial, state1, metrics1), (_, state8, metrics8) = gamma_runs
  for key in ('loss', 'ce1', 'ce2', 'bt_loss', 'accuracy', 'grad_norm'):
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-5, err_msg=key)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), state1.params,
                                       initial.params))
  assert max(moved) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               state8.params, state1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               state8.batch_stats, state1.batch_stats)


def test_head_gets_its_own_group_only_when_head_lr_is_set():
  params = {'backbone': {'conv': np.zeros((3, 3, 3, 4)), 'bn': np.zeros(4)},
            'classifier': {'kernel': np.zeros((4, 10)), 'bias': np.zeros(10)}}
  assert optim.param_groups(params)['classifier'] == {'kernel': 'weights', 'bias': 'norm_and_bias'}
  groups = optim.param_groups(params, separate_head=True)
  assert groups['classifier'] == {'kernel': 'head', 'bias': 'head'}
  assert groups['backbone'] == {'conv': 'weights', 'bn': 'norm_and_bias'}


def test_fresh_state_takes_only_the_encoder_of_pretrained_variables(small_resnet):
  config = tiny_supervised_config()
  config.model.encoder = small_resnet
  model = factory.create_supervised_model(config, datasets.num_classes(config))
  tx = optim.create_optimizer(config, 10, 20)[0]
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  fresh = state_lib.create_train_state(model, tx, mesh, config.seed, 32)
  pretrained = jax.tree.map(lambda x: x + 7.0, {'params': dict(fresh.params),
                                                'batch_stats': dict(fresh.batch_stats)})
  pretrained['params'].pop('classifier')  # Fine-tuning with head_init='random'.
  pretrained['params']['head'] = {'w': np.ones(5)}  # A projector: not taken.
  state = state_lib.create_train_state(model, tx, mesh, config.seed, 32, pretrained)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 7.0),
               state.params['backbone'], fresh.params['backbone'])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 7.0),
               state.batch_stats['backbone'], fresh.batch_stats['backbone'])
  jax.tree.map(np.testing.assert_array_equal, state.params['classifier'],
               fresh.params['classifier'])
  assert 'head' not in state.params
