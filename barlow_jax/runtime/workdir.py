"""The files of a workdir besides checkpoints: the config a run follows, and its results.

Every access goes through ``etils.epath``, so a workdir may be local or on an
object store (``gs://bucket/run``) alike. A local file is written aside and
renamed into place, so a kill mid-write never leaves a truncated file; on an
object store a rename is a copy plus a delete (not atomic), while a
single-object upload is atomic already, so remote files are written directly. A run is "done" when its ``results.json`` exists:
every stage writes it last (after results.md and its pictures), and the sweep
and the reproduction reuse a run only then, and only if it recorded the same
config on the keys that change what a run computes (``finished_results``).

``config.json`` is the config a run started with; it is never rewritten while
the run has checkpoints. Resuming compares it with the new config first
(``check_resume``): any difference outside ``FREE_KEYS`` (where the data is,
how often and where the run logs and saves, the kNN monitor) would mix two runs and is
refused, unless the user allows it (``--allow_config_change``); an accepted
change is appended to ``config_changes.json`` (step, differing keys, the
whole new config), and the config a run follows is then the latest one there
(``read_config``).
"""

import contextlib
import datetime
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
from etils import epath
import jax
import ml_collections

from barlow_jax.errors import ConfigChangedError, WorkdirError
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import distributed

CONFIG = 'config.json'
CONFIG_CHANGES = 'config_changes.json'
RESULTS = 'results.json'
RESULTS_MD = 'results.md'
# Config keys (a trailing '.': every key under it) whose value does not change
# what a run computes, so they may differ between a run and its resumption.
FREE_KEYS = ('data_dir', 'download', 'bad_images', 'cache_dataset', 'log_every',
             'checkpoint.every_steps', 'checkpoint.max_to_keep', 'knn_monitor.', 'logging.',
             'model.conv')
# The run's length: a change is a meaningful one (the learning-rate schedule
# is computed over the length), allowed only with --allow_config_change.
LENGTH_KEYS = ('num_epochs', 'num_steps')
ABSENT = '<absent>'  # The value of a key one of two configs lacks.
_SHOWN = 12  # Differences listed in a message; the rest are counted.


def is_remote(path) -> bool:
  """Whether ``path`` is on an object store (``gs://``, ``s3://``...): no rename, no flock."""
  return '://' in str(path)


def write_text(path, text: str) -> None:
  """Writes ``text`` to ``path`` atomically: aside then renamed locally, in one upload remotely."""
  if is_remote(path):
    # One object upload is atomic on GCS/S3 (readers see the old or the new
    # object); tmp + rename would be a copy and a delete there, not atomic.
    epath.Path(path).write_text(text)
    return
  tmp = f'{path}.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    # A full disk fails the write or the close: no empty or partial file is left.
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir``/config.json, from process 0 (processes share the workdir)."""
  if jax.process_index() == 0:
    write_text(os.path.join(workdir, CONFIG), config.to_json_best_effort(indent=2))


def _load_json(path) -> Any:
  return json.loads(epath.Path(path).read_text())


def config_changes(workdir: str) -> list[dict]:
  """The accepted config changes of a run, oldest first ([] if none)."""
  path = epath.Path(workdir) / CONFIG_CHANGES
  return _load_json(path) if path.exists() else []


def recorded_config(workdir: str) -> Optional[dict]:
  """The config the run in ``workdir`` follows, as JSON; None without config.json.

  That is config.json, or the config of the latest accepted change.
  """
  path = epath.Path(workdir) / CONFIG
  if not path.exists():
    return None
  changes = config_changes(workdir)
  return changes[-1]['config'] if changes else _load_json(path)


def read_config(workdir: str, kind: str = 'pretraining', mode: Optional[str] = None,
                key: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config a run follows (``recorded_config``), checked to be of the expected kind.

  Args:
    workdir: the run's directory.
    kind: what the caller expects, for the message.
    mode: the config.mode the run must have been run with (a config.json
      without mode is a pretraining one); None: any.
    key: the config key that named ``workdir``, for the message.

  Raises:
    WorkdirError: ``workdir`` has no config.json, or is the workdir of another mode.
  """
  where = f'config.{key}={workdir!r}' if key else repr(workdir)
  recorded = recorded_config(workdir)
  if recorded is None:
    raise WorkdirError(f'No {kind} config at {epath.Path(workdir) / CONFIG}: is {where} a '
                       f'{kind} workdir?')
  found = recorded.get('mode', 'pretrain')
  if mode is not None and found != mode:
    raise WorkdirError(f'{where} is the workdir of a {found!r} run (its config.json has '
                       f"mode={found!r}), not of a {kind} run (mode={mode!r}).")
  return ml_collections.ConfigDict(recorded)


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def _as_json(config) -> dict:
  """A config as config.json holds it (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def _free(key: str) -> bool:
  return any(key == f or (f.endswith('.') and key.startswith(f)) for f in FREE_KEYS)


def config_differences(recorded, requested) -> list[tuple[str, Any, Any]]:
  """(key, recorded value, requested value) of every key outside FREE_KEYS that differs.

  Args:
    recorded: a run's config (dict from JSON, or ConfigDict).
    requested: the new config.

  Returns:
    Sorted by dotted key; a key one config lacks has the value ABSENT there.
    A key one config lacks and the other leaves None (a placeholder added to
    the config files since the run was recorded, left unset) is no difference.
  """
  old, new = _flatten(_as_json(recorded)), _flatten(_as_json(requested))
  value = lambda config, k: ABSENT if config.get(k) is None else config[k]
  return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
          if not _free(k) and value(old, k) != value(new, k)]


def _short(value: Any, width: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= width else text[:width - 3] + '...'


def describe_differences(differences: Sequence[tuple[str, Any, Any]]) -> str:
  """A few lines: ``key: recorded -> requested``, the first _SHOWN of them."""
  lines = [f'  {k}: {_short(old)} -> {_short(new)}' for k, old, new in differences[:_SHOWN]]
  if len(differences) > _SHOWN:
    lines.append(f'  ... and {len(differences) - _SHOWN} more keys')
  return '\n'.join(lines)


def _refusal(workdir: str, what: str, differences, instead: str) -> str:
  length = [k for k, _, _ in differences if k in LENGTH_KEYS]
  note = (f'\nThe learning-rate schedule is computed over the run\'s length ({", ".join(length)}):'
          ' resumed with another length, the steps already taken followed the old schedule and '
          'the rest follow the new one (a cosine jumps to the new curve).' if length else '')
  return (f'{workdir} holds {what} recorded with another config; {len(differences)} key(s) '
          f'differ (recorded -> requested):\n{describe_differences(differences)}{note}\n'
          f'Use another --workdir, or pass --allow_config_change to {instead} (the change is '
          f'recorded in {CONFIG_CHANGES}, config.json is kept).')


def check_resume(workdir: str, config, step: Optional[int], allow_change: bool) -> list:
  """Before resuming ``workdir`` from checkpoint ``step``: how ``config`` differs from the run's.

  Args:
    workdir: the run's directory.
    config: the config to resume with.
    step: the checkpoint to resume from; None for a new run (nothing to compare).
    allow_change: accept differences (--allow_config_change) instead of refusing.

  Returns:
    The differences (config_differences) to pass to record_start.

  Raises:
    ConfigChangedError: listing the keys that differ, unless ``allow_change``.
  """
  recorded = recorded_config(workdir) if step is not None else None
  if recorded is None:
    if step is not None:
      logging.warning('%s has checkpoints but no %s: resuming unchecked.', workdir, CONFIG)
    return []
  differences = config_differences(recorded, config)
  if differences and not allow_change:
    raise ConfigChangedError(_refusal(
        workdir, f'a run (latest checkpoint: step {step})', differences,
        f'continue this run under the new config from step {step}'))
  return differences


def agree_on_start(workdir: str, config, allow_change: bool) -> tuple[Optional[int], list]:
  """Where a run starts: its newest complete checkpoint, once the recorded config allows it.

  Decided on process 0 from what the workdir holds, and agreed by every process
  (``distributed.agree``): each process reading the workdir itself would race
  with process 0 creating ``checkpoints/`` and writing config.json.

  Args:
    workdir: the run's directory.
    config: the config to start or resume with.
    allow_change: accept a changed config (--allow_config_change) instead of refusing.

  Returns:
    (step to resume from or None for a new run, the config differences for
    ``record_start``; [] on processes other than 0, which write nothing).

  Raises:
    ConfigChangedError (on process 0; WorkdirError on the others): see check_resume.
  """
  differences = []

  def decide() -> int:
    nonlocal differences
    steps = checkpoint.saved_steps(workdir)
    differences = check_resume(workdir, config, steps[-1] if steps else None, allow_change)
    return steps[-1] if steps else -1

  step = distributed.agree(decide, f'reading the checkpoints and config of {workdir}')
  return (None if step < 0 else step), differences


def record_start(workdir: str, config, step: Optional[int], differences) -> None:
  """Once the state is restored: config.json of a new run, or the accepted change of a resumed one.

  Args:
    workdir: the run's directory.
    config: the config the run goes on with.
    step: the checkpoint resumed from; None for a new run.
    differences: from check_resume.
  """
  if jax.process_index() > 0:
    return
  if step is None or not (epath.Path(workdir) / CONFIG).exists():
    write_config(workdir, config)
    if (epath.Path(workdir) / CONFIG_CHANGES).exists():  # Of an earlier run's.
      (epath.Path(workdir) / CONFIG_CHANGES).unlink()
  elif differences:
    logging.warning('Resuming %s at step %d with a changed config (--allow_config_change):\n%s',
                    workdir, step, describe_differences(differences))
    change = {'step': int(step), 'time': datetime.datetime.now().isoformat(timespec='seconds'),
              'changes': {k: {'recorded': old, 'requested': new} for k, old, new in differences},
              'config': _as_json(config)}
    write_text(os.path.join(workdir, CONFIG_CHANGES),
               json.dumps(config_changes(workdir) + [change], indent=2))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A Markdown table, the one way results.md files and the notebook build theirs.

  Args:
    headers: the column titles.
    rows: the cells of each row: strings as they are, floats with 4
      significant digits, tuples (shapes) as 3x3x3x8.

  Returns:
    The table's lines, without a final newline.
  """

  def cell(x):
    if isinstance(x, float):
      return f'{x:.4g}'
    if isinstance(x, tuple):
      return 'x'.join(map(str, x)) or 'scalar'
    return str(x)

  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(cell(x) for x in row) + ' |' for row in rows]
  return '\n'.join(lines)


def write_results(workdir: str, results: dict, markdown: str) -> None:
  """results.md, then results.json (last: its presence marks the run done); process 0 only."""
  if jax.process_index() > 0:
    return
  write_text(os.path.join(workdir, RESULTS_MD), markdown)
  write_text(os.path.join(workdir, RESULTS), json.dumps(results, indent=2))


def read_results(workdir: str) -> Optional[dict[str, Any]]:
  """The results of a finished run, or None if it has not finished."""
  path = epath.Path(workdir) / RESULTS
  return _load_json(path) if path.exists() else None


def finished_results(workdir: str, config, allow_change: bool) -> Optional[dict[str, Any]]:
  """The results of the finished run in ``workdir`` if they are ``config``'s, else None.

  A finished run is reused only when its recorded config equals ``config``
  outside FREE_KEYS: otherwise its numbers are another config's.

  Args:
    workdir: the run's directory.
    config: the config the run would be run with now.
    allow_change: return None (run it again under ``config``) instead of refusing.

  Raises:
    ConfigChangedError: finished with another config (or none recorded), naming
      ``workdir`` and the keys, unless ``allow_change``.
  """
  results = read_results(workdir)
  if results is None:
    return None
  recorded = recorded_config(workdir)
  differences = config_differences(recorded, config) if recorded is not None else []
  if recorded is not None and not differences:
    return results
  if not allow_change:
    raise ConfigChangedError(
        _refusal(workdir, 'finished results', differences, 'run it again under the new config')
        if recorded is not None else
        f'{workdir} holds finished results but no {CONFIG}: which config they are for is '
        'unknown. Move it aside, or pass --allow_config_change to run it again.')
  logging.warning('%s finished with another config; running it again:\n%s', workdir,
                  describe_differences(differences))
  return None
