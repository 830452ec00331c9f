"""A crashed run resumes from its last checkpoint and ends exactly where an uninterrupted run does."""

import json

import jax
import numpy as np
import pytest

from barlow_jax import errors
from barlow_jax.data import pipeline
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.stages import pretrain
from conftest import needs_cifar10, snapshot, tiny_config


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

  # The same workdir under another config: refused, naming the key, nothing written.
  before = snapshot(workdir)
  changed = tiny_config()
  changed.model.encoder = small_resnet
  changed.lambd, changed.log_every = 0.01, 1  # log_every may change freely.
  with pytest.raises(errors.ConfigChangedError, match=r'lambd: 0\.0051 -> 0\.01'):
    pretrain.run(changed, workdir)
  assert snapshot(workdir) == before
  # Allowed: resumed (here at its last step) and recorded beside the original config.json.
  pretrain.run(changed, workdir, allow_config_change=True)
  with open(f'{workdir}/config.json') as f:
    assert json.load(f)['lambd'] == 0.0051
  with open(f'{workdir}/config_changes.json') as f:
    change, = json.load(f)
  assert change['step'] == 4 and change['changes'] == {'lambd': {'recorded': 0.0051,
                                                                 'requested': 0.01}}
  assert change['config']['lambd'] == 0.01
  # The run now follows the new config: no flag needed for it, refused for the old one.
  assert workdir_lib.check_resume(workdir, changed, 4, allow_change=False) == []
  with pytest.raises(errors.ConfigChangedError, match=r'lambd: 0\.01 -> 0\.0051'):
    workdir_lib.check_resume(workdir, config, 4, allow_change=False)
