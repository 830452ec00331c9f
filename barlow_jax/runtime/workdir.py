"""The files of a workdir besides checkpoints: config.json and the results.

Every file is written aside and renamed into place, so a kill mid-write never
leaves a truncated file. A run is "done" when its ``results.json`` exists:
every stage writes it last (after results.md and its pictures), and the sweep
and the reproduction reuse a run only then.
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections

from barlow_jax.errors import WorkdirError

CONFIG = 'config.json'
RESULTS = 'results.json'
RESULTS_MD = 'results.md'


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (aside, then renamed)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir``/config.json, from process 0 (processes share the workdir)."""
  if jax.process_index() == 0:
    write_text(os.path.join(workdir, CONFIG), config.to_json_best_effort(indent=2))


def read_config(workdir: str, kind: str = 'pretraining') -> ml_collections.ConfigDict:
  """The config a run recorded in its workdir.

  Args:
    workdir: the run's directory.
    kind: what the caller expects, for the error message.

  Raises:
    WorkdirError: ``workdir`` has no config.json.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise WorkdirError(f'No {kind} config at {path}: is {workdir!r} a {kind} workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def write_results(workdir: str, results: dict, markdown: str) -> None:
  """results.md, then results.json (last: its presence marks the run done); process 0 only."""
  if jax.process_index() > 0:
    return
  write_text(os.path.join(workdir, RESULTS_MD), markdown)
  write_text(os.path.join(workdir, RESULTS), json.dumps(results, indent=2))


def read_results(workdir: str) -> Optional[dict[str, Any]]:
  """The results of a finished run, or None if it has not finished."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
