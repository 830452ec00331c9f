"""A crashed run resumes from its last checkpoint and ends exactly where an uninterrupted run does."""

import jax
import numpy as np
import pytest

from barlow_jax.data import pipeline
from barlow_jax.runtime import checkpoint
from barlow_jax.stages import pretrain
from conftest import needs_cifar10, tiny_config


class SimulatedCrash(Exception):
  pass


@needs_cifar10
def test_crash_and_resume_gives_identical_parameters(tmp_path, monkeypatch, small_resnet):
  config = tiny_config()  # 4 steps, checkpoint every 2.
  config.model.encoder = small_resnet  # Resuming does not depend on the encoder.
  straight = jax.device_get(pretrain.run(config, str(tmp_path / 'straight')))

  real_prefetch = pipeline.prefetch_to_mesh

  def crash_after_two_batches(iterator, sharding, size=2):
    for i, batch in enumerate(real_prefetch(iterator, sharding, size)):
      if i == 2:
        raise SimulatedCrash()
      yield batch

  workdir = str(tmp_path / 'resumed')
  monkeypatch.setattr(pipeline, 'prefetch_to_mesh', crash_after_two_batches)
  with pytest.raises(SimulatedCrash):
    pretrain.run(config, workdir)
  assert checkpoint.manager(workdir, config.checkpoint.max_to_keep).latest_step() == 2
  monkeypatch.setattr(pipeline, 'prefetch_to_mesh', real_prefetch)
  resumed = jax.device_get(pretrain.run(config, workdir))

  assert int(resumed.step) == int(straight.step) == 4
  for tree in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(resumed, tree), getattr(straight, tree))
  np.testing.assert_array_equal(resumed.rng, straight.rng)
