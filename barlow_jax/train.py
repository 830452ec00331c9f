"""Barlow Twins pretraining: state, the shard_map train step, checkpoints, the loop.

One program runs on every device of a 1-D ``data`` mesh (``jax.shard_map``,
which is also what ``jax.pmap`` is built on in current JAX). Parameters and
optimiser state are replicated; each device augments and encodes its slice of
the global batch; BatchNorm and the Barlow Twins normalisation see the global
batch through collectives over ``DATA_AXIS``; each device computes its own
block of rows of the cross-correlation matrix (losses.py).

Gradients: with ``check_vma=True`` shard_map tracks which values differ per
device, so the gradient of the (device-invariant) global loss with respect to
the replicated parameters comes out already summed over devices and correct.
Adding a ``pmean`` of grads here would be the pmap habit and is not needed;
tests/test_train_step.py checks 8 devices against 1.
"""

import functools
import os
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
from clu import metric_writers
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from barlow_jax import augment
from barlow_jax import config_validation
from barlow_jax import distributed
from barlow_jax import input_pipeline
from barlow_jax import losses
from barlow_jax import models
from barlow_jax import optim
from barlow_jax import plots

# The one mesh axis; BatchNorm, the loss and every collective use this name.
DATA_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates done.
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # Base key; step keys are fold_in(rng, step), so resume is exact.


def make_mesh(devices=None) -> Mesh:
  # Mesh(...) has Auto axis types (jax.make_mesh would default to Explicit).
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def create_train_state(config, model: models.BarlowTwinsModel, tx, mesh: Mesh) -> TrainState:
  """Initial state, replicated over the mesh."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  size = config.augment.crop_size

  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
  def init():
    dummy = jnp.zeros((2, size, size, 3), jnp.float32)
    variables = model.init(init_rng, dummy, train=False)
    params = variables['params']
    return TrainState(step=jnp.int32(0), params=params, batch_stats=variables['batch_stats'],
                      opt_state=tx.init(params), rng=state_rng)

  return init()


def make_train_step(config, model: models.BarlowTwinsModel, tx, mesh: Mesh,
                    lr_schedule: Callable) -> Callable:
  """Returns jitted ``train_step(state, batch) -> (state, metrics)``; state is donated.

  ``batch`` is {'image': uint8 [N, H, W, 3], 'label': int32 [N]} sharded over
  the mesh, N the global batch. Both views are augmented on the device.
  """
  aug = config.augment
  spec = input_pipeline.dataset_spec(config.dataset)
  view1, view2 = augment.view_from_config(aug.view1), augment.view_from_config(aug.view2)
  dtype = jnp.dtype(config.model.dtype)
  lambd = config.lambd

  def views(keys, images, view):
    x = augment.augment_batch(keys, images, view, aug.crop_size)
    return augment.normalize(x, spec.mean, spec.std).astype(dtype)

  def per_device(state, images, labels, keys1, keys2):
    x1, x2 = views(keys1, images, view1), views(keys2, images, view2)

    def loss_fn(params):
      # The encoder runs once per view, as in the official code, so BN
      # statistics are per view; running averages are updated twice in turn.
      out1, upd = model.apply({'params': params, 'batch_stats': state.batch_stats}, x1,
                              train=True, mutable=['batch_stats'])
      out2, upd = model.apply({'params': params, 'batch_stats': upd['batch_stats']}, x2,
                              train=True, mutable=['batch_stats'])
      terms = losses.barlow_twins_terms(out1['embeddings'], out2['embeddings'], DATA_AXIS)
      bt_loss = terms.on_diag + lambd * terms.off_diag
      probe_loss, probe_acc = losses.masked_cross_entropy(out1['probe_logits'], labels,
                                                          DATA_AXIS)
      # The probe reads stop_gradient(features): its loss trains only the probe.
      metrics = {'bt_loss': bt_loss, 'on_diag': terms.on_diag, 'off_diag': terms.off_diag,
                 'probe_loss': probe_loss, 'probe_accuracy': probe_acc}
      return bt_loss + probe_loss, (upd['batch_stats'], metrics)

    (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   learning_rate=lr_schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
      out_specs=(P(), P()), check_vma=True)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, batch: dict):
    # Keys for the global batch, then sliced per device: example i gets the
    # same augmentation whatever the device count.
    k1, k2 = jax.random.split(jax.random.fold_in(state.rng, state.step))
    n = batch['image'].shape[0]
    keys1, keys2 = jax.random.split(k1, n), jax.random.split(k2, n)
    return sharded(state, batch['image'], batch['label'], keys1, keys2)

  return train_step


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoint.max_to_keep, enable_async_checkpointing=True)
  # The explicit handler lets a fresh manager read item metadata (shapes)
  # before restoring, which evaluate.restore_encoder uses to check architectures.
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_handlers=ocp.StandardCheckpointHandler())


class CheckpointError(ValueError):
  """The workdir's latest checkpoint cannot be restored into this run's state."""


def shape_mismatches(expected, saved, name: str) -> list[str]:
  """Leaves of ``expected`` whose shape differs from, or is missing in, ``saved``."""
  want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  have = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  problems = []
  for path, leaf in want.items():
    got = have.get(path)
    if got is None or tuple(got.shape) != tuple(leaf.shape):
      problems.append(f'{name}{jax.tree_util.keystr(path)}: checkpoint '
                      f'{"missing" if got is None else tuple(got.shape)} vs config {leaf.shape}')
  return problems + [f'{name}{jax.tree_util.keystr(path)}: in the checkpoint only'
                     for path in have if path not in want]


def restore_or_keep(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """The latest checkpoint restored into ``state``'s structure and shardings, if any.

  Raises:
    CheckpointError: the checkpoint is unreadable (corrupt) or was written by
      another architecture; nothing in the workdir is changed.
  """
  step = manager.latest_step()
  if step is None:
    return state
  where = f'{manager.directory}/{step}'
  advice = (f'Move {where} aside to resume from the previous checkpoint, or use a new '
            '--workdir.')
  # The metadata is read first, so that a checkpoint of another architecture
  # fails with the list of differing parameters instead of a restore error.
  try:
    saved = manager.item_metadata(step)
    saved = {k: saved[k] for k in ('params', 'batch_stats') if k in saved}
  except Exception as e:  # Orbax and tensorstore raise many types for bad files.
    raise CheckpointError(f'Checkpoint {where} is unreadable (corrupt or incomplete?): '
                          f'{type(e).__name__}: {e}\n{advice}') from e
  # Any state with params/batch_stats fields (every stage's) is checked.
  expected = {k: getattr(state, k) for k in ('params', 'batch_stats') if hasattr(state, k)}
  problems = [p for k in expected for p in shape_mismatches(expected[k], saved.get(k, {}), k)]
  if problems:
    raise CheckpointError(f'Checkpoint {where} was written by another architecture than '
                          f'config.model describes; {len(problems)} differing arrays, e.g.:\n  ' +
                          '\n  '.join(problems[:10]))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  logging.info('Resuming from checkpoint step %d in %s.', step, manager.directory)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # As above: truncated or garbled array files.
    raise CheckpointError(f'Checkpoint {where} cannot be restored (corrupt, or saved with '
                          f'another optimizer?): {type(e).__name__}: {e}\n{advice}') from e


def _write_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    # Written aside and renamed: a kill mid-write never leaves a truncated file.
    path = os.path.join(workdir, 'config.json')
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + '.tmp', path)


class Progress:
  """Console line every config.log_every steps: chosen metrics, images/s, ETA.

  Args:
    total_steps: the step the run ends at.
    global_batch: images per step, for images/s.
    start_step: the step this process started (or resumed) at.
    console_keys: metric names shown on the console, in order (all of them
      go to TensorBoard regardless).
  """

  def __init__(self, total_steps: int, global_batch: int, start_step: int,
               console_keys=('bt_loss', 'on_diag', 'off_diag', 'probe_accuracy', 'learning_rate')):
    self.total, self.batch, self.keys = total_steps, global_batch, console_keys
    self.last_step, self.last_time = start_step, time.time()

  def __call__(self, step: int, scalars: dict) -> None:
    now = time.time()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(steps_per_s, 1e-9)
    scalars['steps_per_sec'], scalars['images_per_sec'] = steps_per_s, steps_per_s * self.batch
    shown = '  '.join(f'{k} {scalars[k]:.4g}' for k in self.keys if k in scalars)
    logging.info('step %d/%d  %s  %.1f img/s  ETA %s', step, self.total, shown,
                 scalars['images_per_sec'], time.strftime('%H:%M:%S', time.gmtime(eta)))


def _check_finite(scalars: dict, first: int, last: int, manager) -> None:
  if all(np.isfinite(v) for v in scalars.values()):
    return
  manager.wait_until_finished()
  raise FloatingPointError(
      f'Non-finite metrics between steps {first} and {last}: {scalars}. '
      f'The last good checkpoint (step {manager.latest_step()}) is kept.')


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Pretrains with Barlow Twins into ``workdir``, resuming from its latest checkpoint.

  Returns:
    The final TrainState (replicated over the mesh).
  """
  config_validation.validate_pretrain(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh()
  data = input_pipeline.load_train_data(config)
  steps_per_epoch = max(1, data.num_global // config.batch_size)
  total_steps = optim.num_train_steps(config, steps_per_epoch)
  model = models.create_model(config, axis_name=DATA_AXIS)
  tx, lr_schedule = optim.create_optimizer(config, steps_per_epoch, total_steps)

  manager = checkpoint_manager(workdir, config)
  state = restore_or_keep(manager, create_train_state(config, model, tx, mesh))
  start_step = int(state.step)
  _write_config(workdir, config)
  logging.info('%d examples, %d steps/epoch, %d steps, start at %d; %d devices, %d processes.',
               data.num_global, steps_per_epoch, total_steps, start_step,
               jax.device_count(), jax.process_count())

  # Imported here: knn_monitor uses evaluate, which imports this module.
  from barlow_jax import knn_monitor  # pylint: disable=g-import-not-at-top
  knn_hook = knn_monitor.make_hook(config, steps_per_epoch, total_steps, mesh)  # None: off.
  hooks = [knn_hook] if knn_hook else []
  train_step = make_train_step(config, model, tx, mesh, lr_schedule)
  local_batch = config.batch_size // jax.process_count()
  batches = input_pipeline.prefetch_to_mesh(
      input_pipeline.train_dataset(data, local_batch, config.seed, start_step,
                                   cache=config.cache_dataset).as_numpy_iterator(),
      NamedSharding(mesh, P(DATA_AXIS)))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  progress = Progress(total_steps, config.batch_size, start_step)

  try:
    state = run_steps(config, state, train_step, batches, manager, writer, progress,
                      start_step, total_steps, hooks)
  finally:
    # On any exception too: an in-flight save of a good state is completed,
    # never left half-written for the next run to trip over.
    manager.wait_until_finished()
    writer.flush()
  if jax.process_index() == 0:
    write_cross_correlation_png(config, state, os.path.join(workdir, 'cross_correlation.png'))
  return state


def write_cross_correlation_png(config, state: TrainState, path: str, num_images: int = 256,
                                max_dim: int = 128) -> None:
  """Pictures C for two augmented views of test images with the current weights.

  BatchNorm runs in inference mode and the matrix is computed on this
  process's first device; only its top-left ``max_dim`` block is drawn (a
  8192 x 8192 image would be unreadable).
  """
  spec = input_pipeline.dataset_spec(config.dataset)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir, config.download)
  images = next(input_pipeline.eval_batches(builder, spec, spec.test_split, num_images))['image']
  local = lambda x: x.addressable_data(0)  # Replicated: every device holds all of it.
  variables = {'params': jax.tree.map(local, state.params),
               'batch_stats': jax.tree.map(local, state.batch_stats)}
  model = models.create_model(config)
  aug = config.augment
  views = [augment.view_from_config(aug.view1), augment.view_from_config(aug.view2)]
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**31 - 1), 2)

  @jax.jit  # Both views and C in one program: one compile.
  def correlate(variables, images):
    def embed(key, view):
      x = augment.model_inputs(images, key, view, aug.crop_size, spec.mean, spec.std,
                               jnp.dtype(config.model.dtype))
      return model.apply(variables, x, train=False)['embeddings']
    return losses.cross_correlation(embed(keys[0], views[0]), embed(keys[1], views[1]))

  c = np.asarray(correlate(variables, images))
  plots.cross_correlation_png(c[:max_dim, :max_dim], path,
                              f'C of {len(images)} test images, step {int(local(state.step))}'
                              + (f', first {max_dim} of {c.shape[0]} dims' if c.shape[0] > max_dim else ''))


# Called after a step with (updates done, state); returns scalars to log, or None.
Hook = Callable[[int, Any], Optional[dict]]


def _run_hooks(hooks: Sequence[Hook], step: int, state, writer, progress: Progress) -> None:
  if not hooks:
    return
  t0 = time.time()
  scalars = {}
  for hook in hooks:
    scalars.update(hook(step, state) or {})
  if scalars:
    writer.write_scalars(step, scalars)
  progress.last_time += time.time() - t0  # Throughput counts training only.


def run_steps(config, state, train_step, batches, manager, writer, progress: Progress,
              start_step: int, total_steps: int, hooks: Sequence[Hook] = ()):
  """The training loop shared by every stage that trains.

  Runs ``state, metrics = train_step(state, batch)`` from start_step to
  total_steps; averages metrics on the device and logs them every
  config.log_every steps; saves ``state`` every config.checkpoint.every_steps
  and at the end, after checking the metrics are finite; then calls every
  hook. On SIGTERM (preemption, see distributed.py) it saves after the
  current step, waits for the save to complete and raises
  distributed.Preempted, without calling the hooks (a preempted machine has
  no time to spare).

  Args:
    config: needs log_every and checkpoint.every_steps.
    state: any pytree (a TrainState here); saved as is with StandardSave.
    train_step: jitted (state, batch) -> (state, metrics dict of scalars).
    batches: iterator of device batches.
    manager: the run's Orbax CheckpointManager.
    writer: a clu metric writer.
    progress: the console reporter.
    start_step: the step ``state`` is at.
    total_steps: the step to stop at.
    hooks: ``hook(step, state) -> dict of scalars or None``, called on every
      process after each step (with the number of updates done and the
      state after them, as saved), outside the jitted step; the scalars
      they return are written to ``writer`` at that step. Their time is left
      out of the images/s.

  Returns:
    The final state.

  Raises:
    FloatingPointError: non-finite metrics; the last good checkpoint is kept.
    distributed.Preempted: stopped by SIGTERM after a completed save.
  """
  summed, count = None, 0
  for step in range(start_step, total_steps):
    batch = next(batches)
    if step == start_step:
      t0 = time.time()
      train_step = train_step.lower(state, batch).compile()
      logging.info('Compiled the train step in %.1f s.', time.time() - t0)
      # Processes finish compiling at different times; the first step's
      # collectives would not wait long for a late one (30 s with gloo on CPU).
      distributed.wait_for_all_processes('compiled_train_step')
      progress.last_time = time.time()  # Throughput excludes compilation.
    state, metrics = train_step(state, batch)
    # Summed on the device: no host sync except at logging and saving steps.
    summed = metrics if summed is None else jax.tree.map(jnp.add, summed, metrics)
    count += 1
    done = step + 1
    # Asked after every step on every process: the processes of a multi-host
    # run must agree on the step at which they save.
    preempted = distributed.preemption_requested(done)
    log_now = done % config.log_every == 0 or done == total_steps
    save_now = done % config.checkpoint.every_steps == 0 or done == total_steps or preempted
    if log_now or save_now:
      # Checked before every save, so a non-finite state is never checkpointed.
      scalars = {k: float(v) / count for k, v in jax.device_get(summed).items()}
      _check_finite(scalars, done - count + 1, done, manager)
      if log_now:
        progress(done, scalars)
        writer.write_scalars(done, {f'train/{k}': v for k, v in scalars.items()})
        summed, count = None, 0
    if save_now:
      manager.save(done, args=ocp.args.StandardSave(state))
    if preempted:
      manager.wait_until_finished()  # Exit only with the checkpoint complete.
      raise distributed.Preempted(
          f'Preempted (SIGTERM): saved checkpoint step {done} of {total_steps} in '
          f'{manager.directory}; run the same command again to resume.')
    _run_hooks(hooks, done, state, writer, progress)
  distributed.training_loop_ended()
  return state
