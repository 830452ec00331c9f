"""Several JAX processes on 127.0.0.1, for real: same numbers as one process, checkpoints cross over.

launch/local_multiprocess.sh starts 2 processes x 4 CPU devices with a gloo
coordinator on a free port. Each process reads its own half of CIFAR-10
(tfds.split_for_jax_process), so the global batch of step s is process 0's
local batch s (rows 0-7) followed by process 1's (rows 8-15). The reference is
one process with 8 devices fed exactly those global batches. It also writes
the checkpoint the 2-process run starts from, and reads the one it ends with.
The 2-process run is stopped by a SIGTERM to one process only, as when one
host of a pod is preempted: JAX's preemption sync makes both save the same step.
"""

import hashlib
import os
import re
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from barlow_jax.data import datasets
from barlow_jax import errors
from barlow_jax.data import pipeline
from barlow_jax.models import factory
from barlow_jax import optim
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.stages import pretrain
from barlow_jax import trainer
import cli_runs
from conftest import needs_cifar10, tiny_config


def _reference_run(config, save_at: int, workdir):
  """One process, 8 devices, the 2-process run's global batches.

  The state at ``save_at`` is saved to ``workdir`` as a single-device
  checkpoint (what a 1-process, 1-device run writes).

  Returns:
    ({step: state as numpy}, {step: bt_loss}).
  """
  halves = [_process_train_data(config, i, 2) for i in range(2)]
  steps_per_epoch = halves[0].num_global // config.batch_size
  total = optim.num_train_steps(config, steps_per_epoch)
  local_batch = config.batch_size // 2
  streams = [pipeline.train_dataset(half, local_batch, config.seed).as_numpy_iterator()
             for half in halves]
  read = [[], []]  # Hashes of the images each process's pipeline yielded.

  mesh = mesh_lib.make_mesh()
  model = factory.create_model(config, datasets.num_classes(config), axis_name=mesh_lib.DATA_AXIS)
  tx, schedule = optim.create_optimizer(config, steps_per_epoch, total)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, config.augment.crop_size)
  train_step = trainer.make_train_step(config, pretrain.make_loss_fn(model, config.lambd), tx, mesh,
                                  schedule, num_views=2, spec=datasets.dataset_spec(config.dataset))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS))
  states, losses = {}, {}
  for step in range(total):
    parts = [next(s) for s in streams]
    for i, part in enumerate(parts):
      read[i].extend(_image_hashes(part['image']))
    batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]), sharding) for k in parts[0]}
    state, metrics = train_step(state, batch)
    losses[step + 1] = float(metrics['bt_loss'])
    states[step + 1] = jax.device_get(state)
    if step + 1 == save_at:
      manager = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
      one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      manager.save(save_at, args=ocp.args.StandardSave(jax.device_put(state, one_device)))
      manager.wait_until_finished()
      manager.close()
  return states, losses, halves, read


def _process_train_data(config, index: int, count: int) -> pipeline.TrainData:
  """pipeline.load_train_data(config) as process ``index`` of ``count`` resolves it."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, 'process_index', lambda *_: index)
    patch.setattr(jax, 'process_count', lambda *_: count)
    return pipeline.load_train_data(datasets.from_config(config), config.train_split,
                                    config.fraction, config.fraction_seed)


def _image_hashes(images) -> list[bytes]:
  return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest() for x in images]


def _assert_shards_partition_the_split(config, halves, read) -> None:
  """The processes' splits are disjoint and cover the split; each read only its own."""
  builder = halves[0].builder
  ids = [set(pipeline._scan_labels(builder, half.split)[0]) for half in halves]
  everything = pipeline._scan_labels(builder, config.train_split)[0]
  assert not ids[0] & ids[1]
  assert ids[0] | ids[1] == set(everything) and len(everything) == len(set(everything))
  assert abs(len(ids[0]) - len(ids[1])) <= 1
  for half, taken in zip(halves, read):
    own = set(_image_hashes(img for img, in builder.as_dataset(split=half.split).map(
        lambda ex: (ex['image'],)).as_numpy_iterator()))
    assert taken and set(taken) <= own, half.split
  assert not set(read[0]) & set(read[1])


@needs_cifar10
def test_two_processes_match_one_restore_across_counts_and_stop_together_on_sigterm(tmp_path):
  config = tiny_config()  # Global batch 16.
  config.num_steps = 8
  config.log_every = 1
  # 1 process x 8 devices on the 2-process run's global batches. Its state
  # after step 1 is saved by this single process, from one device.
  workdir = tmp_path / 'run'
  reference, reference_losses, halves, read = _reference_run(config, save_at=1, workdir=workdir)
  # Each process reads only its shard. The pipelines here are those the 2
  # processes build (load_train_data as process i of 2); the 2-process run's
  # losses matching this run's, below, ties them to the real processes.
  _assert_shards_partition_the_split(config, halves, read)

  # 2 processes x 4 devices resume from that checkpoint (another process and
  # device count) and train on their own halves of the data, until process 1
  # alone gets SIGTERM: both must save at the same step and exit 75.
  run = cli_runs.StreamingRun(cli_runs.launcher_cmd(2, 4, workdir, config), cli_runs.env())
  run.wait_for_step(3, timeout=400)
  os.kill(cli_runs.child_with_arg(run.proc.pid, '--process_id=1'), signal.SIGTERM)
  code, stderr = run.finish(timeout=120)
  assert code == errors.EXIT_PREEMPTED, stderr[-4000:]
  assert 'Resuming from checkpoint step 1' in stderr
  assert 'start at 1; 8 devices, 2 processes' in stderr
  saved = re.findall(r'^Preempted \(SIGTERM\): saved checkpoint step (\d+)', stderr, re.M)
  assert len(saved) == 2 and saved[0] == saved[1], saved  # One line per process.
  stop = int(saved[0])
  assert 2 <= stop < config.num_steps and cli_runs.latest_step(workdir) == stop
  # Console from process 0 only: one progress line per step, process 1 silent.
  assert 'JAX process 0/2' in stderr and 'JAX process 1/2' not in stderr
  assert stderr.count(f'step {stop}/{config.num_steps}') == 1

  steps = range(2, stop + 1)
  two_losses = cli_runs.read_scalars(workdir, 'train/bt_loss')
  assert sorted(two_losses) == list(steps)
  np.testing.assert_allclose([two_losses[s] for s in steps], [reference_losses[s] for s in steps],
                             rtol=1e-5)
  # Written by 2 processes, restored in 1 process onto 8 devices and onto 1.
  restored = cli_runs.load_state(workdir, config)
  on_one_device = cli_runs.load_state(workdir, config, devices=jax.devices()[:1])
  cli_runs.assert_states_equal(on_one_device, restored)
  expected = reference[stop]
  assert int(restored.step) == int(expected.step) == stop
  assert cli_runs.max_abs_diff(restored.params, reference[1].params) > 1e-4  # They trained.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               restored.params, expected.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               restored.batch_stats, expected.batch_stats)
  print(f'\n2x4 vs 1x8, steps 2-{stop} (SIGTERM to process 1 after step {run.step}): '
        f'max |d loss| {max(abs(two_losses[s] - reference_losses[s]) for s in steps):.3g}, '
        f'max |d param| {cli_runs.max_abs_diff(restored.params, expected.params):.3g}, '
        f'max |d batch_stats| '
        f'{cli_runs.max_abs_diff(restored.batch_stats, expected.batch_stats):.3g}')
