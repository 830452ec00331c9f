"""A multi-process start decides from the workdir once: no race however the processes are timed.

Two real JAX processes on 127.0.0.1 (tests/start_process.py) start one run in
turn, one of them held back after the workdir lock so that the other has
already created ``checkpoints/`` (and, on later starts, saved a step and
written config.json) when it looks. Before the start-up decision was agreed
on process 0, a fresh start with process 1 held back failed every time with
Orbax's ``sync_global_devices name mismatch ('CheckpointManager:create_directory')``
(and two times in three unprovoked, through launch/local_multiprocess.sh).
"""

import socket
import subprocess
import sys

import pytest

import cli_runs
from conftest import REPO

_DELAY_S = 3.0  # Longer than the other process takes to create checkpoints/ and save.


def _start(workdir, delayed: int) -> list[str]:
  """Each process's last output line, after both exited 0."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [cli_runs.start([sys.executable, str(REPO / 'tests' / 'start_process.py'), str(port),
                           str(i), str(workdir), str(delayed), str(_DELAY_S)],
                          cli_runs.env(devices=2))
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=120)
      assert proc.returncode == 0, err[-3000:]
      assert 'mismatch' not in err and 'read only' not in err, err[-3000:]
      outputs.append(out.splitlines()[-1])  # After gloo's connection notices.
  except subprocess.TimeoutExpired:
    pytest.fail('a start-up process hung')
  finally:
    for proc in procs:
      cli_runs.kill_group(proc)
  return outputs


def test_start_is_agreed_whichever_process_is_late(tmp_path):
  workdir = tmp_path / 'run'
  # A fresh run, process 1 late: it used to see process 0's checkpoints/ and
  # take another path into Orbax's collectives.
  for step, delayed in enumerate((1, 0)):  # Fresh, then a resume, each side late once.
    outputs = _start(workdir, delayed)
    assert outputs == [f'process {i}: started at {step}, saved {step + 1}' for i in range(2)]
  assert (workdir / 'config.json').is_file()
