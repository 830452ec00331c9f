"""A pretraining run's encoder read back from its workdir, for the stages that use it.

The linear probe, fine-tuning, the notebook and the converted torchvision
checkpoints all restore an encoder this one way: the architecture from the
run's recorded config.json (runtime/workdir), the model built from it
(factory), the weights from its Orbax checkpoint, checked against the
model's shapes (runtime/checkpoint.restore_variables). The workdir is only
read.
"""

from typing import NamedTuple, Optional

import ml_collections

from barlow_jax.data import datasets
from barlow_jax.models import factory
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import state as state_lib
from barlow_jax.runtime import workdir as workdir_lib


class Pretrained(NamedTuple):
  """A pretraining run's encoder, read back from its workdir."""
  config: ml_collections.ConfigDict  # The run's recorded config.
  model: factory.BarlowTwinsModel  # Without axis_name: for inference.
  variables: dict  # {'params', 'batch_stats'}, replicated over the mesh.
  step: int


def read_config(workdir: str, data_overrides: Optional[dict] = None):
  """The config a pretraining run recorded, with the non-None ``data_overrides`` applied.

  Raises:
    WorkdirError: no config.json, or the workdir of another mode.
  """
  config = workdir_lib.read_config(workdir, 'pretraining', mode='pretrain',
                                   key='pretrained_workdir')
  for key, value in (data_overrides or {}).items():
    if value is not None:  # The data may live elsewhere now.
      config[key] = value
  return config


def load(workdir: str, mesh, step: Optional[int] = None,
         data_overrides: Optional[dict] = None) -> Pretrained:
  """The model and weights of the pretraining run in ``workdir`` (opened read-only).

  Args:
    workdir: a pretraining workdir (config.json + checkpoints/).
    mesh: where to place the variables.
    step: the checkpoint step; None for the latest.
    data_overrides: {'data_dir': ..., 'download': ...} values that are not
      None replace the recorded ones (the data may live elsewhere now).

  Raises:
    WorkdirError: no config.json, or the workdir of another mode (a supervised
      run, a probe, ...).
    CheckpointError: no such checkpoint, unreadable, or not this architecture.
  """
  config = read_config(workdir, data_overrides)
  model = factory.create_model(config, datasets.num_classes(config))
  expected = state_lib.variable_shapes(model, config.augment.crop_size)
  variables, step = checkpoint.restore_variables(workdir, expected, mesh, step)
  return Pretrained(config, model, variables, step)
