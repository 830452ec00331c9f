"""The one sharded train step and the one fit every stage that trains uses.

A stage (pretraining, supervised, fine-tuning) brings its model and its loss
function; this module makes the views, takes the gradient, all-reduces it
once, applies the optimiser, and runs the loop with checkpoints and resume.

The step is one program on every device of the 1-D data mesh
(``jax.shard_map`` with ``check_vma=True``). Parameters and optimiser state
are replicated; each device augments and encodes its slice of the global
batch; BatchNorm and the loss see the global batch through collectives over
``DATA_AXIS``.

Gradients cross the network once per step. The model is applied once per
view, and each application of replicated (device-invariant) parameters would
transpose to its own all-reduce of the whole gradient: two per step for two
views, where the official PyTorch code (DDP) reduces each gradient once. So
the gradient is taken with respect to a device-varying copy of the
parameters (``lax.pcast(..., to='varying')``): each device gets its own
contribution to the gradient of the global loss, and one ``psum`` adds them.
That psum is the only reduction of the gradient, never a second one
(JAX_NOTES: the gradient trap). tests/test_train_step.py checks 8 devices
against 1; tests/test_communication.py counts the floats the compiled step
all-reduces (at most 1.1x the parameters).
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from barlow_jax import optim
from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import loop
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.runtime import writers
from barlow_jax.runtime.mesh import DATA_AXIS
from barlow_jax.runtime.state import TrainState, create_train_state

# loss_fn(params, batch_stats, inputs, labels) -> (loss, (batch_stats, metrics)):
# one device's shard; ``inputs`` holds one standardised batch per view,
# collectives over DATA_AXIS make the loss and metrics global.
LossFn = Callable[[Any, Any, Sequence[jax.Array], jax.Array], tuple[jax.Array, tuple[Any, dict]]]


def apply_per_view(model, params, batch_stats, inputs: Sequence[jax.Array]):
  """The model applied to each view in turn, in training mode.

  BatchNorm statistics are per view, as in the official code (one forward
  pass per view); the running averages are updated in turn.

  Returns:
    (list of model outputs, new batch_stats).
  """
  outputs = []
  for x in inputs:
    out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                               mutable=['batch_stats'])
    outputs.append(out)
    batch_stats = updates['batch_stats']
  return outputs, batch_stats


def view_keys(rng: jax.Array, step: jax.Array, n: int, num_views: int) -> jax.Array:
  """[num_views, n] keys: one per view and example of the global batch of ``step``.

  Drawn for the global batch and sliced per device by shard_map, so example
  i gets the same augmentation whatever the device count.
  """
  branch = jax.random.split(jax.random.fold_in(rng, step))[:num_views]
  return jnp.stack([jax.random.split(k, n) for k in branch])


def views_of(config, num_views: int) -> tuple[augment.ViewAugment, ...]:
  """The augmentation of each view: ``config.augment.view1`` [and ``view2``]."""
  return tuple(augment.view_from_config(config.augment[f'view{i + 1}']) for i in range(num_views))


def make_train_step(config, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                    lr_schedule: Callable, num_views: int,
                    spec: datasets.DatasetSpec) -> Callable:
  """Returns jitted ``train_step(state, batch) -> (state, metrics)``; state is donated.

  Args:
    config: needs model.dtype and augment (crop_size, view1[, view2]).
    loss_fn: the stage's loss (see LossFn).
    tx: the optax transformation.
    mesh: the data mesh.
    lr_schedule: logged as 'learning_rate'.
    num_views: 1 or 2: views ``config.augment.view1`` [and ``view2``].
    spec: the dataset's (its channel mean and std standardise the views).

  Returns:
    The step; ``batch`` is {'image': uint8 [N, H, W, 3], 'label': int32 [N]}
    sharded over the mesh, N the global batch; or 'image' uint8
    [N, num_views, S, S, 3], each view's crop cut on the host (ImageNet), which
    the device does not crop again (augment.device_view).
  """
  aug = config.augment
  views = views_of(config, num_views)
  dtype = jnp.dtype(config.model.dtype)

  def per_device(state: TrainState, images, labels, keys):
    inputs = [augment.normalize(augment.augment_batch(k, *augment.device_view(images, i, view),
                                                      aug.crop_size),
                                spec.mean, spec.std).astype(dtype)
              for i, (k, view) in enumerate(zip(keys, views))]
    # Each device's own contribution to the gradient of the global loss,
    # then the one all-reduce of the gradient (see the module docstring).
    local_params = jax.lax.pcast(state.params, DATA_AXIS, to='varying')
    (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        local_params, state.batch_stats, inputs, labels)
    grads = jax.lax.psum(grads, DATA_AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   learning_rate=lr_schedule(state.step))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  sharded = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(None, DATA_AXIS)),
      out_specs=(P(), P()), check_vma=True)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, batch: dict):
    keys = view_keys(state.rng, state.step, batch['image'].shape[0], num_views)
    return sharded(state, batch['image'], batch['label'], keys)

  return train_step


@dataclasses.dataclass(frozen=True)
class Length:
  """How long a run is, in steps, from its config and its training set."""
  steps_per_epoch: int
  total_steps: int

  @classmethod
  def of(cls, config, num_examples: int) -> 'Length':
    steps_per_epoch = max(1, num_examples // config.batch_size)
    return cls(steps_per_epoch, optim.num_train_steps(config, steps_per_epoch))


def _restore_or_init(config, workdir: str, model, tx: optax.GradientTransformation, mesh: Mesh,
                     init_variables: Optional[dict], allow_config_change: bool):
  """The run's Orbax manager and state: its latest checkpoint restored, or a new state.

  Where to start is decided once for all processes (workdir.agree_on_start)
  before they create the manager together. The config the run recorded is
  compared with ``config`` before anything is restored (a change is refused
  unless allowed), and
  config.json (a new run) or the accepted change (config_changes.json) is
  written only once the state is restored: a refusal or a failed restore
  (bad input) changes nothing in the workdir.
  """
  resume_step, differences = workdir_lib.agree_on_start(workdir, config, allow_config_change)
  mngr = checkpoint.manager(workdir, config.checkpoint.max_to_keep)
  init = functools.partial(create_train_state, model, tx, mesh, config.seed,
                           config.augment.crop_size, init_variables)
  if resume_step is None:
    state = init()
  else:  # Restored into the state's shapes: nothing is initialised (or compiled) to be overwritten.
    replicated = mesh_lib.replicated(mesh)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(init))
    logging.info('Resuming from checkpoint step %d in %s.', resume_step, mngr.directory)
    state = checkpoint.restore(mngr, resume_step, target)
  workdir_lib.record_start(workdir, config, resume_step, differences)
  return mngr, state


class Task(NamedTuple):
  """What a stage brings to fit: its model and loss, how many views a step takes, what to show."""
  model: Any  # The Flax model, built with ``axis_name=DATA_AXIS``.
  loss_fn: LossFn
  num_views: int  # Views per example and step.
  console_keys: Sequence[str]  # Metrics on the progress line.


def fit(config, workdir: str, task: Task, data: pipeline.TrainData, mesh: Mesh, *,
        hooks: Sequence[loop.Hook] = (), init_variables: Optional[dict] = None,
        allow_config_change: bool = False) -> TrainState:
  """Trains ``task.model`` on ``data`` into ``workdir``, resuming from its latest checkpoint.

  A resumed run must have the config it recorded (workdir.check_resume);
  ``workdir``/config.json and the TensorBoard scalars are written only once
  the state is restored: a restore that fails (bad input) changes nothing.

  Args:
    config: the stage's config (batch_size, seed, optimizer, augment,
      num_epochs / num_steps, log_every, checkpoint, cache_dataset).
    workdir: checkpoints go to ``workdir``/checkpoints.
    task: the stage's model, loss, views per step and console metrics.
    data: the training examples of this process.
    mesh: the data mesh.
    hooks: called after every step (loop.run_steps).
    init_variables: {'params', 'batch_stats'} whose 'backbone' initialises the
      encoder of a fresh run; a resumed run keeps its own weights.
    allow_config_change: resume even if the config differs from the run's
      (recorded in config_changes.json) instead of refusing.

  Returns:
    The final state, replicated over the mesh.
  """
  pipeline.check_batch_fits(data, config.batch_size)
  length = Length.of(config, data.num_global)
  tx, lr_schedule = optim.create_optimizer(config, length.steps_per_epoch, length.total_steps)
  mngr, state = _restore_or_init(config, workdir, task.model, tx, mesh, init_variables,
                                 allow_config_change)
  writer = writers.create(workdir, config)
  start_step = int(state.step)
  logging.info('%d examples, %d steps/epoch, %d steps, start at %d; %d devices, %d processes.',
               data.num_global, length.steps_per_epoch, length.total_steps, start_step,
               jax.device_count(), jax.process_count())
  train_step = make_train_step(config, task.loss_fn, tx, mesh, lr_schedule, task.num_views,
                               data.spec)
  batches = pipeline.global_batches(
      data, config.batch_size, config.seed, start_step, config.cache_dataset,
      host_crop.HostCrops(config.augment.crop_size, views_of(config, task.num_views)),
      mesh_lib.batch_sharded(mesh))
  run = loop.Run(
      loop.Schedule(length.total_steps, config.log_every, config.checkpoint.every_steps),
      start_step, mngr, writer,
      loop.Progress(length.total_steps, config.batch_size, start_step, task.console_keys))
  with loop.finishing(run):
    state = loop.run_steps(state, train_step, batches, run, hooks)
  return state
