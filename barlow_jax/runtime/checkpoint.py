"""Orbax checkpoints of a workdir: the manager, and the one way to restore.

Every restore goes through ``restore``: it reads the checkpoint's metadata
first and compares shapes with what the caller expects, so a checkpoint of
another architecture fails with the list of differing arrays, and one of
another optimiser with the few lines in which the two optimiser states
differ, instead of an Orbax error; an unreadable one fails naming its path. Both raise
``CheckpointError`` (exit status 2 on the command line); nothing in the
workdir is changed.

A run resumes from its own workdir (``restore``, from trainer.fit once the
config it recorded is checked; ``restore_latest``); a stage that reads
another run's encoder (linear probe, fine-tuning) opens that workdir read-only
(``restore_variables``), so evaluation never writes into it.
"""

import contextlib
import logging as logging_std
import os
import re
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from barlow_jax.errors import CheckpointError
from barlow_jax.runtime import distributed
from barlow_jax.runtime import mesh as mesh_lib

CHECKPOINTS = 'checkpoints'  # Sub-directory of the workdir.
TMP_MARK = '.orbax-checkpoint-tmp'  # In the name of a checkpoint being written (locally).
COMMIT_FILE = 'commit_success.txt'  # The last file of a checkpoint Orbax writes to a bucket.
# The arrays whose shapes tell an architecture; checked before restoring.
_CHECKED = ('params', 'batch_stats')


def _not_read_only_notice(record: logging_std.LogRecord) -> bool:
  return not str(record.msg).startswith('Given directory is read only')


def manager(workdir: str, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The Orbax manager of ``workdir``/checkpoints (asynchronous saves).

  Creating a writable manager is collective (every process, in the same order):
  Orbax creates the directory on process 0 behind a barrier.

  Args:
    workdir: the run's directory.
    max_to_keep: older checkpoints are deleted beyond this many.
    read_only: open another run's checkpoints without creating or deleting
      anything.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=not read_only, read_only=read_only,
      create=not read_only,
      # Partial saves of a run that was killed or failed (``<step>.orbax-checkpoint-tmp*``).
      cleanup_tmp_directories=not read_only)
  # The explicit handler lets a fresh manager read item metadata (shapes)
  # before restoring. Orbax warns on every read-only manager, which here is
  # always on purpose (another run's workdir): the warning is dropped.
  absl_logger = logging_std.getLogger('absl')
  absl_logger.addFilter(_not_read_only_notice)
  try:
    return ocp.CheckpointManager(checkpoints_dir(workdir),
                                 options=options, item_handlers=ocp.StandardCheckpointHandler())
  finally:
    absl_logger.removeFilter(_not_read_only_notice)


def checkpoints_dir(workdir) -> epath.Path:
  """``workdir``/checkpoints as an epath (local, or ``gs://``: Orbax takes either)."""
  path = epath.Path(workdir)
  return (path if '://' in str(workdir) else path.absolute()) / CHECKPOINTS


def _is_partial(path: epath.Path) -> bool:
  """Whether ``path`` is a checkpoint Orbax has not finished writing.

  Locally Orbax writes into ``<step>.orbax-checkpoint-tmp*`` and renames it
  to ``<step>`` once complete. On a bucket (``gs://``), where a rename is a
  copy, it writes ``<step>`` in place and adds COMMIT_FILE last.
  """
  if TMP_MARK in path.name:
    return True
  return '://' in str(path) and path.name.isdigit() and not (path / COMMIT_FILE).exists()


def complete_steps(directory) -> list[int]:
  """The steps of the complete checkpoints in a checkpoints ``directory``, oldest first."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir()
                if d.name.isdigit() and not _is_partial(d))


def remove_partial(directory) -> list[str]:
  """Removes the partial checkpoints (_is_partial) of ``directory``; their names."""
  directory = epath.Path(directory)
  if jax.process_index() != 0 or not directory.is_dir():
    return []
  removed = [d for d in directory.iterdir() if _is_partial(d)]
  for d in removed:
    with contextlib.suppress(OSError):
      d.rmtree()
  return [d.name for d in removed]


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


def _names(path) -> tuple[str, ...]:
  """A pytree path as plain names: dict keys, attributes and indices alike, as Orbax saves them."""
  out = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        out.append(str(getattr(entry, attr)))
        break
  return tuple(out)


def _structure(tree, params) -> set[str]:
  """The leaves of an optimiser state, each suffix that is a parameter's path written '*'.

  An optimiser holds a copy of the parameter tree per slot (momentum, Adam's
  mu and nu, ...); with those collapsed, a state is a few lines whatever the
  model, and two optimisers differ in lines one can read.
  """
  names = {_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    n = _names(path)
    cut = next((i for i in range(len(n)) if n[i:] in names), len(n))
    out.add('/'.join(n[:cut]) + ('/*' if cut < len(n) else ''))
  return out


def optimizer_differences(expected, saved, params) -> list[str]:
  """How an optimiser state ``expected`` differs from ``saved`` in structure; [] if it does not.

  Args:
    expected: the state the config's optimiser builds (arrays or ShapeDtypeStructs).
    saved: the checkpoint's (item metadata).
    params: the parameters, to collapse their copies (see _structure).
  """
  want, have = _structure(expected, params), _structure(saved, params)
  few = lambda paths: ', '.join(sorted(paths)[:4]) + (f' (+{len(paths) - 4} more)'
                                                      if len(paths) > 4 else '')
  return ([f'in the checkpoint only: {few(have - want)}'] if have - want else []) + (
      [f"in the config's optimiser only: {few(want - have)}"] if want - have else [])


def _brief(e: Exception, limit: int = 300) -> str:
  """The innermost line of an error that says what failed, without TensorStore's spec dump.

  Orbax wraps TensorStore's error ("Error reading <array> ...: <file> ...")
  in one that prints the whole TensorStore spec (kilobytes); the cause is the
  one to show.
  """
  chain = [e]
  while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
    chain.append(cause)
  text = min((str(c) for c in chain if str(c).strip()), key=len, default=type(e).__name__)
  text = re.split(r'\s*\[tensorstore_spec=|\. See full TensorStore details', text)[0].strip()
  return text if len(text) <= limit else f'{text[:limit]} ...'


def _damaged_file(e: Exception, directory: epath.Path) -> Optional[str]:
  """The file of checkpoint ``directory`` the error ``e`` (or its causes) is about, if it can tell.

  TensorStore names the file it read (``local file "<path>"``), or, for an
  array of an OCDBT database, only the database and the size of the value it
  read ("... value of size N"): then the file of that size is the one.
  """
  text = ''
  while e is not None and len(text) < 100_000:
    text += f' {e}'
    e = e.__cause__ or e.__context__
  named = [f for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith('/')]
  if named:
    return named[-1]
  sizes = {int(n) for n in re.findall(r'value of size (\d+)', text)}
  if not sizes or '://' in str(directory):
    return None
  matches = [os.path.join(d, f) for d, _, files in os.walk(directory) for f in files
             if os.path.getsize(os.path.join(d, f)) in sizes]
  return matches[0] if len(matches) == 1 else None


def _unreadable(mngr: ocp.CheckpointManager, step: int, e: Exception) -> CheckpointError:
  """A few lines: the step, the damaged file (if known), what failed and what to do."""
  where = epath.Path(mngr.directory) / str(step)
  damaged = _damaged_file(e, where)
  earlier = [s for s in mngr.all_steps() if s < step]
  previous = f'step {max(earlier)}' if earlier else 'none: the run would start over'
  return CheckpointError(
      f'Checkpoint step {step} ({where}) is damaged and cannot be read'
      f'{f"; damaged file: {damaged}" if damaged else ""}.\n  {_brief(e)}\n'
      f'Nothing was changed. To resume from the previous complete checkpoint ({previous}), '
      f'move the damaged one aside (mv {where} {where}.damaged) and run the same command '
      'again; or use a new --workdir.')


def _metadata(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The saved tree of ``step`` as metadata (shapes, dtypes), or CheckpointError."""
  try:
    return dict(mngr.item_metadata(step).tree)
  except Exception as e:  # Orbax and tensorstore raise many types for bad files.
    raise _unreadable(mngr, step, e) from None


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint ``step`` restored into ``target``'s structure, dtypes and shardings.

  Args:
    mngr: the manager of the workdir.
    step: an existing step.
    target: a pytree of arrays or ShapeDtypeStructs (with shardings) whose
      'params' and 'batch_stats' (fields or keys) are checked against the
      checkpoint before anything is read.

  Raises:
    CheckpointError: unreadable, or written by another architecture.
  """
  where = f'{mngr.directory}/{step}'
  saved = _metadata(mngr, step)
  get = (lambda k: target.get(k)) if isinstance(target, dict) else (lambda k: getattr(target, k, None))
  problems = [p for k in _CHECKED if get(k) is not None
              for p in shape_mismatches(get(k), saved.get(k, {}), k)]
  if problems:
    raise CheckpointError(f'Checkpoint {where} was written by another architecture than '
                          f'config.model describes; {len(problems)} differing arrays, e.g.:\n  ' +
                          '\n  '.join(problems[:10]))
  if get('opt_state') is not None and get('params') is not None:
    lines = optimizer_differences(get('opt_state'), saved.get('opt_state', {}), get('params'))
    if lines:
      raise CheckpointError(
          f'Checkpoint {where} holds the state of another optimiser than config.optimizer '
          '(another optimizer.name, or head_lr / probe_lr set or unset?):\n  ' + '\n  '.join(lines)
          + '\nAn optimiser state cannot be carried over to another optimiser: resume with the '
          "run's own config.optimizer, or use a new --workdir.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # As above: truncated or garbled array files.
    raise _unreadable(mngr, step, e) from None


def saved_steps(workdir: str) -> list[int]:
  """The complete checkpoints of ``workdir``, oldest first; nothing is created or deleted.

  Read by this process alone: in a multi-process run, a decision taken on it
  goes through ``distributed.agree`` (see workdir.agree_on_start).
  """
  return complete_steps(checkpoints_dir(workdir))


def restore_latest(mngr: ocp.CheckpointManager, state: Any) -> Any:
  """The workdir's latest checkpoint restored into ``state``, or ``state`` if there is none.

  The step is the one process 0 sees (``distributed.agree``): every process
  restores the same one, or none.
  """
  step = distributed.agree(lambda: (complete_steps(mngr.directory) or [-1])[-1],
                          'finding the latest checkpoint')
  if step < 0:
    return state
  logging.info('Resuming from checkpoint step %d in %s.', step, mngr.directory)
  return restore(mngr, step, state)


def restore_variables(workdir: str, expected: dict, mesh: Mesh,
                      step: Optional[int] = None) -> tuple[dict, int]:
  """{'params', 'batch_stats'} of another run's checkpoint, replicated over ``mesh``.

  The workdir is opened read-only. The rest of the saved state (optimiser,
  step) is read as it was saved, so no optimiser has to be built to read it.

  Args:
    workdir: a run's directory holding ``checkpoints/``.
    expected: {'params', 'batch_stats'} of the architecture (arrays or
      ShapeDtypeStructs, e.g. ``jax.eval_shape(model.init, ...)``).
    mesh: where to place the variables.
    step: the checkpoint step; None for the latest.

  Returns:
    (variables, step).

  Raises:
    CheckpointError: no such checkpoint, unreadable, or another architecture.
  """
  directory = checkpoints_dir(workdir)
  have = saved_steps(workdir)
  if not have:
    raise CheckpointError(f'{workdir} has no checkpoint ({directory} is missing or empty): its '
                          'run has not saved one yet.')
  step = have[-1] if step is None else step
  if step not in have:
    raise CheckpointError(f'{workdir} has no checkpoint {step} (config.checkpoint_step); its '
                          f'checkpoints: {have}.')
  mngr = manager(workdir, read_only=True)
  replicated = mesh_lib.replicated(mesh)
  as_target = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated)
  try:
    target = jax.tree.map(as_target, _metadata(mngr, step))
    for k in _CHECKED:
      target[k] = jax.tree.map(as_target, expected[k])
    saved = restore(mngr, step, target)
  finally:
    mngr.close()
  return {k: saved[k] for k in _CHECKED}, step
