"""A multi-process start decides from the workdir once: no race however the processes are timed.

Two real JAX processes on 127.0.0.1 (tests/start_process.py) start one run in
turn, one of them held back after the workdir lock so that the other has
already created ``checkpoints/`` (and, on later starts, saved a step and
written config.json) when it looks. Before the start-up decision was agreed
on process 0, a fresh start with process 1 held back failed every time with
Orbax's ``sync_global_devices name mismatch ('CheckpointManager:create_directory')``
(and two times in three unprovoked, through launch/local_multiprocess.sh).
"""

import cli_runs

_DELAY_S = 3.0  # Longer than the other process takes to create checkpoints/ and save.


def _start(workdir, delayed: int) -> list[str]:
  """Each process's last output line, after both exited 0."""
  port = cli_runs.free_port()
  outputs = cli_runs.run_processes(
      'start_process.py', [[str(port), str(i), str(workdir), str(delayed), str(_DELAY_S)]
                           for i in range(2)], cli_runs.env(devices=2), timeout=120)
  for _, err in outputs:
    assert 'mismatch' not in err and 'read only' not in err, err[-3000:]
  return [out.splitlines()[-1] for out, _ in outputs]  # After gloo's connection notices.


def test_start_is_agreed_whichever_process_is_late(tmp_path):
  workdir = tmp_path / 'run'
  # A fresh run, process 1 late: it used to see process 0's checkpoints/ and
  # take another path into Orbax's collectives.
  for step, delayed in enumerate((1, 0)):  # Fresh, then a resume, each side late once.
    outputs = _start(workdir, delayed)
    assert outputs == [f'process {i}: started at {step}, saved {step + 1}' for i in range(2)]
  assert (workdir / 'config.json').is_file()
