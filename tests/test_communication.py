"""Each gradient crosses the network once per step: the all-reduces of the compiled step.

Counted from XLA's optimized HLO of the step compiled for 8 devices
(barlow_jax/compiled_cost.py): the floats all-reduced per step must be at most
1.1 x the parameter count (BatchNorm statistics and the loss's sums are the
rest). Without the single psum of trainer.make_train_step, each application
of the model (one per view) all-reduces the whole gradient: 2x.
"""

import jax
import numpy as np
import pytest

from barlow_jax.data import datasets
from barlow_jax import compiled_cost
from barlow_jax import optim
from barlow_jax import trainer
from barlow_jax.models import factory
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.stages import pretrain
from barlow_jax.stages import supervised
from conftest import conv_backends, tiny_config, tiny_supervised_config


def _all_reduced_per_parameter(config, model, loss_fn, num_views: int) -> float:
  mesh = mesh_lib.make_mesh()
  tx, schedule = optim.create_optimizer(config, steps_per_epoch=10, total_steps=20)
  state = jax.eval_shape(lambda: state_lib.create_train_state(model, tx, mesh, config.seed, 32))
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.replicated(mesh)), state)
  n = config.batch_size
  batch = {'image': jax.ShapeDtypeStruct((n, 32, 32, 3), np.uint8,
                                         sharding=mesh_lib.batch_sharded(mesh)),
           'label': jax.ShapeDtypeStruct((n,), np.int32, sharding=mesh_lib.batch_sharded(mesh))}
  step = trainer.make_train_step(config, loss_fn, tx, mesh, schedule, num_views,
                                 spec=datasets.dataset_spec(config.dataset))
  hlo = step.lower(state, batch).compile().as_text()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return compiled_cost.collectives(hlo)['all-reduce']['elements'] / num_params


@pytest.fixture(scope='module')
def wide_head():
  """A small encoder under a wide head, so that the parameters are mostly dense kernels."""
  return '256-2048'


@pytest.mark.parametrize('conv_backend', conv_backends())
def test_pretraining_step_all_reduces_each_gradient_once(small_resnet, wide_head, conv_backend):
  # oneDNN's convolution psums the kernel gradient through its own cast (kernels/onednn.conv2d).
  config = tiny_config()
  config.model.encoder, config.model.projector = small_resnet, wide_head
  config.model.conv = conv_backend
  model = factory.create_model(config, datasets.num_classes(config), axis_name=mesh_lib.DATA_AXIS)
  ratio = _all_reduced_per_parameter(config, model, pretrain.make_loss_fn(model, config.lambd), 2)
  assert 1.0 <= ratio <= 1.1, ratio


def test_supervised_step_all_reduces_each_gradient_once(small_resnet, wide_head):
  config = tiny_supervised_config()
  config.model.encoder, config.model.embedding = small_resnet, wide_head
  model = factory.create_supervised_model(config, 10, axis_name=mesh_lib.DATA_AXIS)
  loss_fn = supervised.make_loss_fn(model, config.gamma, config.lambd)
  ratio = _all_reduced_per_parameter(config, model, loss_fn, 2)
  assert 1.0 <= ratio <= 1.1, ratio
