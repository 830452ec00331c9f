"""Bad input exits with status 2 and a message naming the problem, before compiling, workdir intact.

Also the NaN stop: a diverging run exits with status 3 naming the step range,
keeping its last good checkpoint.
"""

import concurrent.futures
import hashlib
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import cli_runs
from conftest import REPO, needs_cifar10, pretraining_workdir, tiny_config


def _snapshot(workdir: pathlib.Path) -> dict:
  """{relative path: sha256} of every file; the lock file is the one file a run may add."""
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob('*')) if p.is_file() and p.name != '.lock'}


def _corrupt_arrays(workdir: pathlib.Path) -> None:
  """Truncates every array data file of the checkpoint, as a full disk or a bad copy would."""
  data_files = [p for p in (workdir / 'checkpoints').rglob('*')
                if p.is_file() and p.parent.name == 'd']
  assert data_files, sorted(str(p) for p in workdir.rglob('*'))
  for p in data_files:
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])


def _locked_by_another_process(workdir: pathlib.Path) -> subprocess.Popen:
  """A real second process holding the workdir lock, as a live run does."""
  code = ('import sys, time\n'
          'from barlow_jax.runtime import distributed\n'
          'with distributed.workdir_lock(sys.argv[1]):\n'
          '  print("locked", flush=True)\n'
          '  time.sleep(300)\n')
  holder = cli_runs.start([sys.executable, '-c', code, str(workdir)], cli_runs.env())
  assert holder.stdout.readline().strip() == 'locked', holder.stderr.read()
  return holder


@pytest.fixture(scope='module')
def diverging_run(tmp_path_factory):
  """A run made to diverge at step 2, started once, early.

  Requested by both tests so that it runs alongside the short bad-input runs
  (two cores), and checked by the NaN test.

  Yields:
    (the subprocess, its workdir, its config); stderr goes to ../stderr.txt.
  """
  config = tiny_config()
  config.num_steps = 3
  config.log_every = 1
  config.checkpoint.every_steps = 1
  # A one-step warmup from lr 0: step 1 leaves the weights finite and is
  # saved, step 2 runs at lr 1e30 and the parameter norm overflows to inf.
  config.optimizer.warmup_epochs = 1.5 / (2048 // config.batch_size)  # train[:2048]
  config.optimizer.lr = 1e30
  base = tmp_path_factory.mktemp('diverging')
  with open(base / 'stderr.txt', 'w') as stderr:  # A file: nobody reads a pipe meanwhile.
    proc = subprocess.Popen(cli_runs.main_cmd(base / 'run', config), cwd=REPO,
                            env=cli_runs.env(), stdout=subprocess.DEVNULL, stderr=stderr,
                            start_new_session=True)
  yield proc, base / 'run', config
  cli_runs.kill_group(proc)
  proc.wait()


@needs_cifar10
def test_each_bad_input_exits_2_naming_the_problem_with_workdir_intact(tmp_path, diverging_run):
  del diverging_run  # Only started here, to overlap with these runs.
  config = tiny_config()
  wider = tiny_config()
  wider.model.width = 8  # Another architecture than the checkpoint's.
  empty_data_dir = tmp_path / 'no_data'
  empty_data_dir.mkdir()
  no_data = tiny_config()
  no_data.data_dir = str(empty_data_dir)
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory')

  good = pretraining_workdir(tmp_path / 'good', config)
  corrupt = pretraining_workdir(tmp_path / 'corrupt', config)
  _corrupt_arrays(corrupt)
  busy = tmp_path / 'busy'
  busy.mkdir()
  holder = _locked_by_another_process(busy)

  # (name, workdir, command, what stderr must say)
  cases = [
      ('unknown config key', tmp_path / 'w1', cli_runs.main_cmd(tmp_path / 'w1', config,
                                                                 '--config.lamda=0.1'),
       ["unknown config key 'lamda'", 'Did you mean "lambd"']),
      ('unknown model', tmp_path / 'w2', cli_runs.main_cmd(
          tmp_path / 'w2', config, '--config.model.encoder=resnet7'),
       ["config.model.encoder='resnet7' is not one of"]),
      ('invalid value', tmp_path / 'w3', cli_runs.main_cmd(
          tmp_path / 'w3', config, '--config.fraction=1.5'),
       ['config.fraction=1.5 must be in (0, 1]']),
      ('dataset missing', tmp_path / 'w4', cli_runs.main_cmd(tmp_path / 'w4', no_data),
       ["Dataset 'cifar10' is not prepared", str(empty_data_dir)]),
      ('corrupt checkpoint', corrupt, cli_runs.main_cmd(corrupt, config),
       ['CheckpointError', f'{corrupt}/checkpoints/2', 'corrupt', 'aside to resume']),
      ('incompatible checkpoint', good, cli_runs.main_cmd(good, wider),
       ['CheckpointError', 'another architecture', "params['backbone']"]),
      ('unwritable workdir', a_file / 'run', cli_runs.main_cmd(a_file / 'run', config),
       ['WorkdirError', f"workdir '{a_file / 'run'}' is not writable"]),
      ('workdir in use', busy, cli_runs.main_cmd(busy, config),
       ['WorkdirError', 'is in use by another run', f'pid {holder.pid}']),
  ]
  before = {name: _snapshot(w) if w.is_dir() else None for name, w, _, _ in cases}
  try:
    # Two at a time: each is mostly Python start-up, one core each.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      results = list(pool.map(lambda c: cli_runs.run(c[2], cli_runs.env(), timeout=180), cases))
  finally:
    cli_runs.kill_group(holder)
    holder.wait()

  failures = []  # All cases are checked, then every failure is reported.
  for (name, workdir, _, messages), result in zip(cases, results):
    problems = [f'exit status {result.returncode}'] if result.returncode != 2 else []
    problems += [f'no {m!r} in stderr' for m in messages if m not in result.stderr]
    # No exception of ours escaped (Orbax/tensorstore threads may print their own
    # teardown noise after a failed restore; that is theirs, not an escaped error).
    problems += [s for s in (f'File "{REPO}/barlow_jax', 'Compiled the train step')
                 if s in result.stderr]
    if before[name] is not None and _snapshot(workdir) != before[name]:
      problems.append('workdir changed')
    if before[name] is None and workdir.exists() and os.listdir(workdir) not in ([], ['.lock']):
      problems.append(f'new workdir holds {os.listdir(workdir)}')
    if problems:
      failures.append(f'{name}: {problems}\n{result.stderr[-2000:]}')
  assert not failures, '\n\n'.join(failures)


@needs_cifar10
def test_non_finite_loss_exits_3_naming_the_steps_and_keeps_the_last_good_checkpoint(
    diverging_run):
  proc, workdir, config = diverging_run
  try:
    proc.wait(timeout=300)
  finally:
    cli_runs.kill_group(proc)
  stderr = (workdir.parent / 'stderr.txt').read_text()

  assert proc.returncode == 3, stderr[-3000:]
  assert 'Training diverged: Non-finite metrics between steps 2 and 2' in stderr
  assert 'The last good checkpoint (step 1) is kept' in stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1']
  kept = cli_runs.load_state(workdir, config)
  assert int(kept.step) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept.params))
