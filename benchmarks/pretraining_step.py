"""The pretraining train step on random uint8 images, for the benchmarks (no flags here)."""

import jax
import numpy as np

from barlow_jax import optim
from barlow_jax import trainer
from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
from barlow_jax.models import factory
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.stages import pretrain


def build(config):
  """(state, the jitted pretraining step, a random uint8 batch in the pipeline's shape, crops)."""
  n = config.batch_size
  crops = host_crop.HostCrops(config.augment.crop_size, trainer.views_of(config, 2))
  shape = pipeline.train_image_shape(datasets.dataset_spec(config.dataset), crops)
  mesh = mesh_lib.make_mesh()
  model = factory.create_model(config, datasets.num_classes(config), axis_name=mesh_lib.DATA_AXIS)
  tx, schedule = optim.create_optimizer(config, 100, 1000)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, config.augment.crop_size)
  step = trainer.make_train_step(config, pretrain.make_loss_fn(model, config.lambd), tx, mesh,
                                 schedule, num_views=2, spec=datasets.dataset_spec(config.dataset))
  sharding = mesh_lib.batch_sharded(mesh)
  rng = np.random.default_rng(0)
  batch = {'image': jax.device_put(rng.integers(0, 256, (n, *shape), dtype=np.uint8), sharding),
           'label': jax.device_put(rng.integers(0, 10, n).astype(np.int32), sharding)}
  return state, step, batch, crops


class LiveStep:
  """The pretraining step on its own state: each call runs one step and keeps the new state.

  The step donates the state it is given, so the live one is always ``self.state``.
  """

  def __init__(self, config):
    self.state, self.step, self.batch, self.crops = build(config)

  def __call__(self):
    """One step; returns its metrics (asynchronously, as the step does)."""
    self.state, metrics = self.step(self.state, self.batch)
    return metrics

  def compiled_text(self) -> str:
    return self.step.lower(self.state, self.batch).compile().as_text()
