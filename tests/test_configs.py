"""Every shipped config loads and passes its mode's checks; the ImageNet recipe's step runs small."""


import functools
import pathlib

import jax
import numpy as np
import pytest

from barlow_jax import config_validation
from barlow_jax.models import factory
from barlow_jax import config_files
from barlow_jax import optim
from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
from barlow_jax.models import encoders
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.stages import pretrain
from barlow_jax import trainer

PRETRAIN_CONFIGS = ['cifar_bt', 'cifar_bt_cpu', 'imagenet_bt']
# Modes whose checks need no other workdir, and what they check of the config.
_CHECKS = {'pretrain': config_validation.validate_pretrain,
           'supervised': config_validation.validate_supervised,
           'sweep': lambda config: config_validation.validate_supervised(config.run),
           'baselines': config_validation.validate_baselines}
_SHIPPED = sorted(p.stem for p in pathlib.Path(config_files.configs_dir()).glob('*.py')
                  if p.stem != '__init__')


@pytest.mark.parametrize('name', _SHIPPED)
def test_every_shipped_config_loads_and_passes_its_checks(name):
  config = config_files.load(name)
  assert config.mode in (*_CHECKS, 'linear', 'finetune', 'reproduce', 'transfer'), config.mode
  if config.mode in _CHECKS:
    _CHECKS[config.mode](config)


@pytest.mark.parametrize('name', PRETRAIN_CONFIGS)
def test_pretrain_config_is_valid(name):
  config = config_files.load(name)
  assert config.mode == 'pretrain'
  config.batch_size = 64  # Divisible by the 8 test devices, as every shipped batch is.
  config_validation.validate_pretrain(config)


def test_imagenet_recipe_step_runs_at_small_scale(monkeypatch):
  """ImageNet stem, bfloat16, blur/solarize asymmetry, 3-layer projector; random images in
  the layout the host gives ImageNet: each view's crop, [N, 2, S, S, 3].

  The encoder is ResNet-50's bottleneck blocks, one per stage for two stages
  instead of 3-4-6-3: the same code, compiled in a fraction of the time.
  """
  config = config_files.load('imagenet_bt')
  assert config.model.encoder == 'resnet50'
  monkeypatch.setitem(encoders.ENCODERS, 'resnet50_small', functools.partial(
      encoders.ResNet, stage_sizes=(1, 1), block_cls=encoders.BottleneckBlock))
  config.model.encoder = 'resnet50_small'
  config.model.width = 4
  config.model.projector = '64-64-64'
  config.batch_size = 8
  config.augment.crop_size = 56
  for view in (config.augment.view1, config.augment.view2):
    view.blur_kernel = 7
  config_validation.validate_pretrain(config)
  mesh = mesh_lib.make_mesh()
  model = factory.create_model(config, datasets.num_classes(config), axis_name=mesh_lib.DATA_AXIS)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=10, total_steps=100)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, config.augment.crop_size)
  step = trainer.make_train_step(config, pretrain.make_loss_fn(model, config.lambd), tx, mesh,
                                  schedule, num_views=2, spec=datasets.dataset_spec(config.dataset))
  rng = np.random.default_rng(0)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS))
  shape = pipeline.train_image_shape(
      datasets.dataset_spec(config.dataset),
      host_crop.HostCrops(config.augment.crop_size, trainer.views_of(config, 2)))
  assert shape == (2, 56, 56, 3)
  batch = {'image': rng.integers(0, 256, (8, *shape), dtype=np.uint8),
           'label': rng.integers(0, 1000, 8).astype(np.int32)}
  state, metrics = step(state, {k: jax.device_put(v, sharding) for k, v in batch.items()})
  assert np.isfinite(float(metrics['bt_loss'])) and float(metrics['bt_loss']) > 0
  assert int(state.step) == 1
