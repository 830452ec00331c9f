"""Several JAX processes on 127.0.0.1, for real: same numbers as one process, checkpoints cross over.

launch/local_multiprocess.sh starts 2 processes x 4 CPU devices with a gloo
coordinator on a free port. Each process reads its own half of CIFAR-10
(tfds.split_for_jax_process), so the global batch of step s is process 0's
local batch s (rows 0-7) followed by process 1's (rows 8-15). The reference is
one process with 8 devices fed exactly those global batches. It also writes
the checkpoint the 2-process run starts from, and reads the one it ends with.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from barlow_jax import input_pipeline
from barlow_jax import models
from barlow_jax import optim
from barlow_jax import train
import cli_runs
from conftest import needs_cifar10, tiny_config


def _reference_run(config, save_at: int, workdir):
  """One process, 8 devices, the 2-process run's global batches.

  The state at ``save_at`` is saved to ``workdir`` as a single-device
  checkpoint (what a 1-process, 1-device run writes).

  Returns:
    (final state as numpy, {step: bt_loss}).
  """
  data = input_pipeline.load_train_data(config)
  steps_per_epoch = data.num_global // config.batch_size
  total = optim.num_train_steps(config, steps_per_epoch)
  local_batch = config.batch_size // 2
  streams = []
  for i in range(2):
    split = tfds.split_for_jax_process(config.train_split, process_index=i, process_count=2)
    half = input_pipeline.TrainData(data.builder, split, None,
                                    data.builder.info.splits[split].num_examples,
                                    data.num_global, data.spec)
    streams.append(input_pipeline.train_dataset(half, local_batch, config.seed).as_numpy_iterator())

  mesh = train.make_mesh()
  model = models.create_model(config, axis_name=train.DATA_AXIS)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch, total)
  state = train.create_train_state(config, model, tx, mesh)
  train_step = train.make_train_step(config, model, tx, mesh, schedule)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.DATA_AXIS))
  losses = {}
  for step in range(total):
    parts = [next(s) for s in streams]
    batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]), sharding) for k in parts[0]}
    state, metrics = train_step(state, batch)
    losses[step + 1] = float(metrics['bt_loss'])
    if step + 1 == save_at:
      manager = train.checkpoint_manager(workdir, config)
      one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      manager.save(save_at, args=ocp.args.StandardSave(jax.device_put(state, one_device)))
      manager.wait_until_finished()
      manager.close()
  return jax.device_get(state), losses


@needs_cifar10
def test_two_processes_match_one_and_checkpoints_restore_across_process_and_device_counts(
    tmp_path):
  config = tiny_config()  # Global batch 16, 4 steps, checkpoints every 2.
  config.log_every = 1
  # 1 process x 8 devices on the 2-process run's global batches. Its state
  # after step 1 is saved by this single process, from one device.
  workdir = tmp_path / 'run'
  reference, reference_losses = _reference_run(config, save_at=1, workdir=workdir)

  # 2 processes x 4 devices resume from that checkpoint (another process and
  # device count) and train steps 2 to 4 on their own halves of the data.
  result = cli_runs.run(cli_runs.launcher_cmd(2, 4, workdir, config), cli_runs.env(),
                        timeout=400)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Resuming from checkpoint step 1' in result.stderr
  assert 'start at 1; 8 devices, 2 processes' in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '4']
  # Console from process 0 only: one progress line per step, process 1 silent.
  assert 'JAX process 0/2' in result.stderr and 'JAX process 1/2' not in result.stderr
  assert result.stderr.count('step 4/4') == 1

  two_losses = cli_runs.read_scalars(workdir, 'train/bt_loss')
  assert sorted(two_losses) == [2, 3, 4]
  np.testing.assert_allclose([two_losses[s] for s in (2, 3, 4)],
                             [reference_losses[s] for s in (2, 3, 4)], rtol=1e-5)
  # Written by 2 processes, restored in 1 process onto 8 devices and onto 1.
  restored = cli_runs.load_state(workdir, config)
  on_one_device = cli_runs.load_state(workdir, config, devices=jax.devices()[:1])
  cli_runs.assert_states_equal(on_one_device, restored)
  assert int(restored.step) == int(reference.step) == 4
  start = cli_runs.load_state(workdir, config, step=1)
  assert cli_runs.max_abs_diff(restored.params, start.params) > 1e-4  # Training moved them.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               restored.params, reference.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               restored.batch_stats, reference.batch_stats)
  print(f'\n2x4 vs 1x8, steps 2-4: max |d loss| '
        f'{max(abs(two_losses[s] - reference_losses[s]) for s in (2, 3, 4)):.3g}, '
        f'max |d param| {cli_runs.max_abs_diff(restored.params, reference.params):.3g}, '
        f'max |d batch_stats| '
        f'{cli_runs.max_abs_diff(restored.batch_stats, reference.batch_stats):.3g}')
