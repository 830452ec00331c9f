"""The training loop every stage that trains runs: steps, logging, saves, preemption.

``run_steps`` knows nothing about Barlow Twins: it calls a jitted
``train_step(state, batch, *frozen) -> (state, metrics)`` until the last
step, logs averaged metrics, checks them before every save, saves the state
with Orbax, stops after a complete save on SIGTERM, and calls hooks (the kNN
monitor) between steps.
"""

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from barlow_jax.errors import CheckpointSaveError
from barlow_jax.errors import Preempted
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import distributed

# Called after a step with (updates done, state); returns summaries to write, or
# None: scalars, and images as [N, H, W, C] arrays of floats in [0, 1].
Hook = Callable[[int, Any], Optional[dict]]


class Progress:
  """Console line every ``log_every`` steps: chosen metrics, images/s, ETA.

  Args:
    total_steps: the step the run ends at.
    global_batch: images per step, for images/s.
    start_step: the step this process started (or resumed) at.
    console_keys: metric names shown on the console, in order (all of them
      go to TensorBoard regardless).
  """

  def __init__(self, total_steps: int, global_batch: int, start_step: int,
               console_keys: Sequence[str]):
    self.total, self.batch, self.keys = total_steps, global_batch, tuple(console_keys)
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


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the loop logs and saves, in steps."""
  total_steps: int
  log_every: int
  save_every: int


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the loop: when, from which step, and where it saves, writes and reports."""
  schedule: Schedule
  start_step: int  # The step the state is at (0, or the restored checkpoint's).
  mngr: ocp.CheckpointManager  # The run's Orbax manager.
  writer: Any  # A clu metric writer (runtime/writers.create).
  progress: Progress  # The console line.


def _check_finite(scalars: dict, first: int, last: int, mngr: ocp.CheckpointManager) -> None:
  if all(np.isfinite(v) for v in scalars.values()):
    return
  mngr.wait_until_finished()
  raise FloatingPointError(
      f'Non-finite metrics between steps {first} and {last}: {scalars}. '
      f'The last good checkpoint (step {mngr.latest_step()}) is kept.')


def _saving(mngr: ocp.CheckpointManager, step: Optional[int], action: Callable[[], Any]) -> None:
  """Runs a save-related ``action`` of ``mngr``; a failed save becomes CheckpointSaveError.

  Orbax saves in a background thread and reports its failure (a full disk, a
  read-only directory) at the next save, check or wait: here, at the latest
  one step after it happened. The partial checkpoint is removed.
  """
  try:
    action()
  except Exception as e:  # pylint: disable=broad-except  # OSError, tensorstore's ValueError, ...
    directory = str(mngr.directory)
    partial = [int(d.split('.')[0]) for d in checkpoint.remove_partial(directory)
               if d.split('.')[0].isdigit()]
    complete = checkpoint.complete_steps(directory)
    which = f'step {max(partial)}' if partial else ('' if step is None else f'step {step}')
    raise CheckpointSaveError(
        f'Saving checkpoint{f" {which}" if which else ""} into {directory} failed: '
        f'{type(e).__name__}: {e}. The '
        f'partial checkpoint was removed; the last complete checkpoint is '
        f'{f"step {complete[-1]}" if complete else "none"}. Free space (or fix the permissions) '
        'there and run the same command again to resume from it.') from e


def _save(mngr: ocp.CheckpointManager, state, step: int, last: int, save_now: bool) -> int:
  """Reports a failed background save at once; saves ``state`` if ``save_now``; the last step saved."""
  _saving(mngr, last, mngr.check_for_errors)
  if not save_now:
    return last
  _saving(mngr, last, lambda: mngr.save(step, args=ocp.args.StandardSave(state)))
  logging.info('Saving checkpoint step %d in %s.', step, mngr.directory)
  return step


def finish_saves(mngr: ocp.CheckpointManager) -> None:
  """Waits for the save in flight (CheckpointSaveError if it failed) and closes ``mngr``."""
  _saving(mngr, None, mngr.wait_until_finished)
  mngr.close()


@contextlib.contextmanager
def finishing(run: Run):
  """Ends ``run`` however its block exits: saves complete, manager closed, metrics flushed.

  An in-flight save is completed (or its failure reported) on any exception
  too, and a stop signal ends the process at once again
  (distributed.training_loop_ended); on an exception the metrics so far are
  flushed, and that first error is the one reported.
  """
  try:
    yield
  except BaseException:
    with contextlib.suppress(Exception):
      run.writer.flush()
    raise
  finally:
    try:
      finish_saves(run.mngr)
    finally:
      distributed.training_loop_ended()
  run.writer.flush()


def _write_summaries(write: Callable[[int, dict], Any], step: int, values: dict) -> None:
  """TensorBoard summaries are diagnostics: a failed write (a full disk) is logged, not fatal.

  The checkpoint save that follows reports the same cause with the exit
  status and the last complete checkpoint (_saving).
  """
  try:
    write(step, values)
  except Exception as e:  # pylint: disable=broad-except  # tf.errors.*, OSError, ...
    logging.warning('Writing TensorBoard summaries at step %d failed: %s: %s', step,
                    type(e).__name__, str(e).splitlines()[0][:200])


def _run_hooks(hooks: Sequence[Hook], step: int, state, writer, progress: Progress) -> None:
  if not hooks:
    return
  t0 = time.time()
  summaries = {}
  for hook in hooks:
    summaries.update(hook(step, state) or {})
  images = {k: v for k, v in summaries.items() if np.ndim(v) == 4}
  scalars = {k: v for k, v in summaries.items() if k not in images}
  if scalars:
    _write_summaries(writer.write_scalars, step, scalars)
  if images:
    _write_summaries(writer.write_images, step, images)
  progress.last_time += time.time() - t0  # Throughput counts training only.


def _report(summed: dict, count: int, done: int, save_now: bool, run: Run) -> bool:
  """Logs the metrics averaged since the last log, when it is time; whether it logged.

  Before every save the metrics are checked, so a non-finite state is never
  checkpointed (FloatingPointError).
  """
  log_now = done % run.schedule.log_every == 0 or done == run.schedule.total_steps
  if not (log_now or save_now):
    return False
  scalars = {k: float(v) / count for k, v in jax.device_get(summed).items()}
  _check_finite(scalars, done - count + 1, done, run.mngr)
  if log_now:
    run.progress(done, scalars)
    _write_summaries(run.writer.write_scalars, done,
                     {f'train/{k}': v for k, v in scalars.items()})
  return log_now


def _compile(train_step, state, batch, frozen: tuple, progress: Progress):
  t0 = time.time()
  compiled = train_step.lower(state, batch, *frozen).compile()
  logging.info('Compiled the train step in %.1f s.', time.time() - t0)
  # Processes finish compiling at different times; the first step's
  # collectives would not wait long for a late one (30 s with gloo on CPU).
  distributed.wait_for_all_processes('compiled_train_step')
  progress.last_time = time.time()  # Throughput excludes compilation.
  return compiled


def _stop_if_asked(mngr: ocp.CheckpointManager, saved: int, done: int, total: int,
                   preempted: bool) -> None:
  """Raises Preempted, with the checkpoint of step ``saved`` complete, if a stop signal came.

  After the last step nothing looks at the stop flag again: a signal that came
  since its check stops the run here, once the final save is complete, and a
  later one ends the process at once (distributed._on_signal).
  """
  if done == total and not preempted:
    distributed.pause_point('final_save')
    _saving(mngr, saved, mngr.wait_until_finished)
    preempted = distributed.training_loop_ended()
  if preempted:
    _saving(mngr, saved, mngr.wait_until_finished)  # Exit only with the checkpoint complete.
    raise Preempted(f'Preempted ({distributed.stop_signal()}): saved checkpoint step {done} '
                    f'of {total} in {mngr.directory}; run the same command again to resume.')


def run_steps(state, train_step, batches: Iterator[dict], run: Run, hooks: Sequence[Hook] = (),
              frozen: tuple = ()):
  """Runs ``state, metrics = train_step(state, batch, *frozen)`` from run.start_step to the end.

  Metrics are summed on the device and averaged every ``schedule.log_every``
  steps (no host sync in between); ``state`` is saved every
  ``schedule.save_every`` steps and at the end, after checking the metrics
  are finite; then the hooks run. On a stop signal the loop saves after the
  current step and raises Preempted (_stop_if_asked), without the hooks.

  Args:
    state: any pytree, at step ``run.start_step``; saved as is with StandardSave.
    train_step: jitted (state, batch, *frozen) -> (state, metrics dict of scalars).
    batches: iterator of device batches.
    run: the schedule, the start step, the Orbax manager, the writer and the
      console line.
    hooks: ``hook(step, state) -> summaries (Hook) or None``, called on every
      process after each step with the updates done and the state as saved;
      their summaries go to ``run.writer``, their time is not in the images/s.
    frozen: further arguments of every step that never change (a frozen
      encoder's variables); not saved.

  Returns:
    The final state.

  Raises:
    FloatingPointError: non-finite metrics; the last good checkpoint is kept.
    Preempted: stopped by SIGTERM after a completed save.
  """
  start_step, mngr, total = run.start_step, run.mngr, run.schedule.total_steps
  summed, count, saved = None, 0, start_step
  for step in range(start_step, total):
    batch = next(batches)
    if step == start_step:
      train_step = _compile(train_step, state, batch, frozen, run.progress)
    state, metrics = train_step(state, batch, *frozen)
    summed = metrics if summed is None else jax.tree.map(jnp.add, summed, metrics)
    count += 1
    done = step + 1
    if done == total:
      distributed.pause_point('last_step')
    # Asked after every step on every process: the processes of a multi-host
    # run must agree on the step at which they save.
    preempted = distributed.preemption_requested(done)
    save_now = done % run.schedule.save_every == 0 or done == total or preempted
    if _report(summed, count, done, save_now, run):
      summed, count = None, 0
    saved = _save(mngr, state, done, saved, save_now)
    _stop_if_asked(mngr, saved, done, total, preempted)
    _run_hooks(hooks, done, state, run.writer, run.progress)
  # The last save complete before a signal may end the process at once again.
  _saving(mngr, saved, mngr.wait_until_finished)
  distributed.training_loop_ended()
  distributed.pause_point('after_final_save')
  return state
