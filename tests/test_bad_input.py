"""Bad input exits with status 2 and a message naming the problem, before compiling, workdir intact.

The cases whose console or process matters run as command lines in
subprocesses (flag parsing, a damaged checkpoint or dataset whose libraries
print their own noise, a second process holding the lock, a missing compiler);
the rest in this process through main.run, which maps errors to exit statuses
the same way: invalid values, a missing dataset, an unwritable workdir, a
resumed config that differs from the recorded one, another architecture or
optimiser, splits, lengths, evaluation stages pointed at the wrong workdir or
checkpoint.

Also the NaN stop: a diverging run exits with status 3 naming the step range,
keeping its last good checkpoint.
"""

import concurrent.futures
import itertools
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cli_runs
from barlow_jax import config_files
from barlow_jax import errors
from barlow_jax import main
from barlow_jax.data import datasets
from barlow_jax.data import integrity
from barlow_jax.data import pipeline
from conftest import (DATA_DIR, REPO, cifar10_split_sizes, needs_cifar10, pretraining_workdir, tiny_config,
                      tiny_supervised_config)
from conftest import snapshot as _snapshot


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
  corrupt = pretraining_workdir(tmp_path / 'corrupt', config)
  _corrupt_arrays(corrupt)
  busy = tmp_path / 'busy'
  busy.mkdir()
  holder = _locked_by_another_process(busy)
  damaged_data = tiny_config()
  damaged_data.data_dir = str(_damaged_copy(tmp_path / 'damaged', lambda b: b[:len(b) // 8]))

  # (name, workdir, command, what stderr must say)
  cases = [
      ('unknown config key', tmp_path / 'w1', cli_runs.main_cmd(tmp_path / 'w1', config,
                                                                 '--config.lamda=0.1'),
       ["unknown config key 'lamda'", 'Did you mean "lambd"']),
      ('corrupt checkpoint', corrupt, cli_runs.main_cmd(corrupt, config),
       ['CheckpointError: Checkpoint step 2', f'{corrupt}/checkpoints/2', 'damaged file: '
        f'{corrupt}/checkpoints/2/', f'mv {corrupt}/checkpoints/2 ', 'Nothing was changed']),
      ('damaged dataset', tmp_path / 'w5', cli_runs.main_cmd(tmp_path / 'w5', damaged_data),
       ['DatasetCorruptError', _train_file(damaged_data.data_dir), 'truncated', 'Delete ']),
      ('workdir in use', busy, cli_runs.main_cmd(busy, config),
       ['WorkdirError', 'is in use by another run', f'pid {holder.pid}']),
      # oneDNN asked for where it cannot be built (here: no compiler; elsewhere: no wheel).
      ('oneDNN unavailable', tmp_path / 'w5', cli_runs.main_cmd(
          tmp_path / 'w5', config, '--config.model.conv=onednn'),
       ["config.model.conv='onednn' cannot be used", "Use 'auto' or 'xla'"]),
  ]
  # Per case: the environment's changes.
  envs = {'oneDNN unavailable': {'CXX': '/nonexistent/g++'}}
  before = {name: _snapshot(w) if w.is_dir() else None for name, w, _, _ in cases}
  try:
    # Two at a time: each is mostly Python start-up, one core each.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      results = list(pool.map(
          lambda c: cli_runs.run(c[2], cli_runs.env(**envs.get(c[0], {})), timeout=180), cases))
  finally:
    cli_runs.kill_group(holder)
    holder.wait()

  failures = []  # All cases are checked, then every failure is reported.
  for (name, workdir, _, messages), result in zip(cases, results):
    problems = [f'exit status {result.returncode}'] if result.returncode != 2 else []
    problems += [f'no {m!r} in stderr' for m in messages if m not in result.stderr]
    # No exception of ours escaped (Orbax/tensorstore threads may print their own
    # teardown noise after a failed restore; that is theirs, not an escaped error).
    problems += [s for s in ('Traceback', 'Compiled the train step') if s in result.stderr]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    problems += [f'{lines.count(m)} times: {m}' for m in set(lines) if lines.count(m) > 1]
    problems += [f'{len(lines)} lines'] if len(lines) > 20 else []
    if before[name] is not None and _snapshot(workdir) != before[name]:
      problems.append('workdir changed')
    if before[name] is None and workdir.exists():
      problems.append(f'new workdir left behind, holding {os.listdir(workdir)}')
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


def _linear_config(pretrained_workdir, **overrides):
  config = config_files.load('cifar_linear')
  config.pretrained_workdir = str(pretrained_workdir)
  config.data_dir, config.download = DATA_DIR, False
  for key, value in overrides.items():
    config[key] = value
  return config


def _finetune_config(pretrained_workdir):
  config = config_files.load('cifar_finetune')
  config.pretrained_workdir = str(pretrained_workdir)
  config.data_dir, config.download = DATA_DIR, False
  return config


def _changed(**overrides):
  """tiny_config with dotted keys overridden."""
  config = tiny_config()
  for key, value in overrides.items():
    *parents, last = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@needs_cifar10
def test_each_bad_input_in_process_exits_2_with_a_short_message_and_the_workdir_intact(
    tmp_path, capsys):
  """Mistakes caught before anything compiles, run in this process (no start-up to pay)."""
  good = pretraining_workdir(tmp_path / 'good', tiny_config())
  no_checkpoints = tmp_path / 'no_checkpoints'
  no_checkpoints.mkdir()
  (no_checkpoints / 'config.json').write_text(tiny_config().to_json_best_effort())
  supervised_run = tmp_path / 'supervised_run'
  supervised_run.mkdir()
  (supervised_run / 'config.json').write_text(tiny_supervised_config().to_json_best_effort())
  bad_eval_split = tiny_supervised_config()
  bad_eval_split.eval.test_split = 'tset'
  empty_data_dir = tmp_path / 'no_data'
  empty_data_dir.mkdir()
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory')
  new = lambda name: tmp_path / name  # A workdir that does not exist yet.
  sizes = cifar10_split_sizes()  # Real: 50000 and 10000.

  # (name, config, workdir, --allow_config_change, what stderr must say)
  cases = [
      ('unknown model', _changed(**{'model.encoder': 'resnet7'}), new('w_model'), False,
       ["config.model.encoder='resnet7' is not one of"]),
      ('invalid value', _changed(fraction=1.5), new('w_fraction'), False,
       ['config.fraction=1.5 must be in (0, 1]']),
      ('dataset missing', _changed(data_dir=str(empty_data_dir)), new('w_data'), False,
       ["Dataset 'cifar10' is not prepared", str(empty_data_dir)]),
      ('unwritable workdir', tiny_config(), a_file / 'run', False,
       ['WorkdirError', f"workdir '{a_file / 'run'}' is not writable"]),
      # Allowed to differ from the recorded config, the checkpoint still has to fit the model.
      ('resume with another architecture, change allowed', _changed(**{'model.width': 8}), good,
       True, ['CheckpointError', 'another architecture', "params['backbone']"]),
      ('resume with another batch, lambd and lr', _changed(
          batch_size=32, lambd=0.01, **{'optimizer.lr': 0.5, 'log_every': 1}), good, False,
       ['ConfigChangedError', f'{good} holds a run (latest checkpoint: step 2)',
        '3 key(s) differ', 'batch_size: 16 -> 32', 'lambd: 0.0051 -> 0.01',
        'optimizer.lr: 0.3 -> 0.5', '--allow_config_change']),
      ('resume for longer', _changed(num_steps=8), good, False,
       ['ConfigChangedError', 'num_steps: 4 -> 8', 'learning-rate schedule']),
      ('resume with another optimizer, change allowed', _changed(**{'optimizer.name': 'adamw'}),
       good, True, ['CheckpointError', 'another optimiser', 'in the checkpoint only',
                    "in the config's optimiser only"]),
      ('unknown split', _changed(train_split='trian'), new('w_split'), False,
       ["config.train_split='trian' is not a split of cifar10", f"'train' ({sizes['train']})",
        f"'test' ({sizes['test']})"]),
      ('split smaller than the batch', _changed(train_split='train[:8]'), new('w_small'), False,
       ["config.train_split='train[:8]' holds 8 training examples, fewer than one batch of "
        'config.batch_size=16']),
      ('unknown evaluation split', bad_eval_split, new('w_eval'), False,
       ["config.eval.test_split='tset' is not a split of cifar10"]),
      ('num_steps 0', _changed(num_steps=0), new('w_steps'), False,
       ['config.num_steps=0 must be positive']),
      ('num_epochs 0', _changed(num_steps=None, num_epochs=0.0), new('w_epochs'), False,
       ['config.num_epochs=0.0 must be positive']),
      ('probe of a workdir without checkpoints', _linear_config(no_checkpoints), new('w_probe1'),
       False, ['CheckpointError', f'{no_checkpoints} has no checkpoint']),
      ('probe of a checkpoint that does not exist', _linear_config(good, checkpoint_step=7),
       new('w_probe2'), False, [f'{good} has no checkpoint 7', 'its checkpoints: [2]']),
      ('probe of a supervised workdir', _linear_config(supervised_run), new('w_probe3'), False,
       ['WorkdirError', f"config.pretrained_workdir='{supervised_run}' is the workdir of a "
        "'supervised' run (its config.json has mode='supervised'), not of a pretraining run"]),
      ('fine-tuning of a supervised workdir', _finetune_config(supervised_run), new('w_ft'),
       False, ["is the workdir of a 'supervised' run"]),
  ]
  failures = []
  for name, config, workdir, allow, messages in cases:
    before = _snapshot(workdir) if workdir.is_dir() else None
    with pytest.raises(SystemExit) as exit_info:
      main.run(config, str(workdir), allow_config_change=allow)
    stderr = capsys.readouterr().err
    problems = [f'exit status {exit_info.value.code}'] if exit_info.value.code != 2 else []
    problems += [f'no {m!r} in stderr' for m in messages if m not in stderr]
    if len(stderr) > 2000:
      problems.append(f'{len(stderr)} characters of message')
    if before is not None and _snapshot(workdir) != before:
      problems.append('workdir changed')
    if before is None and workdir.exists():
      problems.append(f'new workdir left behind, holding {os.listdir(workdir)}')
    if stderr.count(stderr.strip().splitlines()[-1]) != 1:
      problems.append('message printed twice')
    if problems:
      failures.append(f'{name}: {problems}\n{stderr[-2000:]}')
  assert not failures, '\n\n'.join(failures)
  assert not (good / 'config_changes.json').exists()
  assert json.loads((good / 'config.json').read_text())['batch_size'] == 16


# ---------------------------------------------------------------------------
# Damaged prepared data: exit 2 naming the dataset, the file and what to do,
# within seconds (a short train file once made the stream spin forever).


def _record_ends(path) -> list[int]:
  """Byte offsets at which the TFRecord records of ``path`` end (its framing, read directly)."""
  ends, offset, data = [], 0, pathlib.Path(path).read_bytes()
  while offset < len(data):
    offset += 16 + int.from_bytes(data[offset:offset + 8], 'little')
    ends.append(offset)
  return ends


def _damaged_copy(root: pathlib.Path, damage) -> pathlib.Path:
  """A copy of DATA_DIR's cifar10 under ``root`` whose train file ``damage(bytes)`` rewrote.

  The metadata is copied, the test file linked: a few MB written per copy.
  """
  source = next((pathlib.Path(DATA_DIR) / 'cifar10').iterdir())
  copy = root / 'cifar10' / source.name
  copy.mkdir(parents=True)
  for f in source.iterdir():
    if '-train.' in f.name:
      (copy / f.name).write_bytes(damage(f.read_bytes()))
    elif '-test.' in f.name:
      (copy / f.name).symlink_to(f)
    else:
      (copy / f.name).write_bytes(f.read_bytes())
  return root


def _train_file(data_dir) -> str:
  return str(next(pathlib.Path(data_dir).glob('cifar10/*/cifar10-train.tfrecord-*')))


def _read_in_thread(fn, timeout: float = 60):
  """(result or exception, seconds) of ``fn()``; fails the test if it is still running after
  ``timeout`` (a spinning reader would otherwise hang the suite)."""
  out = []
  start = time.time()

  def target():
    try:
      out.append(fn())
    except Exception as e:  # pylint: disable=broad-except
      out.append(e)

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  assert out, f'still reading after {timeout} s'
  return out[0], time.time() - start


@needs_cifar10
def test_damaged_train_files_are_refused_before_reading_naming_the_file(tmp_path):
  """get_builder (every stage's way to the data) checks sizes and metadata before anything runs."""
  train = _train_file(DATA_DIR)
  ends = _record_ends(train)
  cut_mid_record = ends[len(ends) // 3] + 100
  cut_at_record = ends[len(ends) // 2]
  cases = [  # (name, damage of the train file or None, file to garble, what the message says)
      ('truncated inside a record', lambda b: b[:cut_mid_record], None,
       [f'holds {cut_mid_record} bytes', 'truncated']),
      ('truncated between records', lambda b: b[:cut_at_record], None,
       [f'holds {cut_at_record} bytes', 'truncated']),
      ('last 10 bytes missing', lambda b: b[:-10], None, ['10 fewer than', 'truncated']),
      ('train file missing', None, None, ['1 of its 1 files missing']),
      ('garbage dataset_info.json', lambda b: b, 'dataset_info.json',
       ['metadata cannot be read', 'dataset_info.json']),
  ]
  failures = []
  for i, (name, damage, garble, messages) in enumerate(cases):
    data_dir = _damaged_copy(tmp_path / f'd{i}', damage or (lambda b: b))
    version_dir = next((data_dir / 'cifar10').iterdir())
    if damage is None:
      os.remove(_train_file(data_dir))
    if garble:
      (version_dir / garble).write_text('{"name": "cifar10", garbage')
    try:
      datasets.get_builder('cifar10', str(data_dir), download=False)
      failures.append(f'{name}: accepted')
      continue
    except errors.DatasetCorruptError as e:
      message = str(e)
    problems = [m for m in messages + ["Dataset 'cifar10'", str(version_dir), 'prepare']
                if m not in message]
    if name != 'garbage dataset_info.json':
      problems += [] if str(version_dir / os.path.basename(train)) in message else ['no file']
    if problems:
      failures.append(f'{name}: no {problems} in\n{message}')
  assert not failures, '\n\n'.join(failures)

  # Missing metadata: not prepared (exit 2 too), naming the data dir.
  data_dir = _damaged_copy(tmp_path / 'no_info', lambda b: b)
  os.remove(next(data_dir.glob('cifar10/*/dataset_info.json')))
  with pytest.raises(errors.DatasetNotFoundError, match=f"not prepared in data_dir=.*{data_dir}"):
    datasets.get_builder('cifar10', str(data_dir), download=False)


@needs_cifar10
def test_the_train_stream_of_a_damaged_file_stops_within_seconds_naming_it(tmp_path):
  """pipeline.train_dataset read directly (no size check before it): splits before, across and
  after a truncation, and bytes overwritten in place (same size), each end in seconds."""
  train = _train_file(DATA_DIR)
  ends = _record_ends(train)
  n = len(ends)
  k = n // 8  # Damage an eighth into the file: small copies (a few MB) where they are truncated.
  truncated = _damaged_copy(tmp_path / 'truncated', lambda b: b[:ends[k] + 100])
  at_record = _damaged_copy(tmp_path / 'at_record', lambda b: b[:ends[k]])
  garbled_at = ends[k] + 40

  def overwrite(b):  # The same size: only the records' checksums can tell.
    return b[:garbled_at] + b'\x07' * 2000 + b[garbled_at + 2000:]

  overwritten = _damaged_copy(tmp_path / 'overwritten', overwrite)
  spec = datasets.dataset_spec('cifar10')
  # (name, data dir, split, expected: None (it reads) or what the message says). A truncated
  # file is named with its size (integrity.check_files), whichever read failed.
  cases = [
      ('split before the truncation', truncated, f'train[{k // 2}:{k // 2 + 64}]', None),
      ('split across the truncation', truncated, f'train[{k - 32}:{k + 32}]', 'truncated.'),
      ('split after the truncation', truncated, f'train[{k + 200}:{k + 264}]', 'truncated.'),
      ('split after a cut between records', at_record, f'train[{k + 200}:{k + 264}]',
       'truncated.'),
      ('split across overwritten bytes', overwritten, f'train[{k - 32}:{k + 32}]',
       'corrupted record at'),
      ('split after overwritten bytes', overwritten, f'train[{k + 200}:{k + 264}]', None),
  ]
  failures, times = [], []
  for name, data_dir, split, expected in cases:
    builder = tfds.builder('cifar10', data_dir=str(data_dir))
    size = builder.info.splits[split].num_examples
    data = pipeline.TrainData(builder, split, None, size, size, spec)

    def read_two_epochs(data=data, builder=builder, split=split):
      stream = pipeline.train_dataset(data, 16, seed=0).as_numpy_iterator()
      return [b['label'] for b in itertools.islice(
          integrity.checked(stream, builder, split), 8)]  # 128 records: two epochs.

    result, seconds = _read_in_thread(read_two_epochs)
    times.append(f'{name}: {seconds:.1f} s')
    if expected is None:
      if isinstance(result, Exception):
        failures.append(f'{name}: {type(result).__name__}: {result}')
      continue
    if not isinstance(result, errors.DatasetCorruptError):
      failures.append(f'{name}: {type(result).__name__}: {result}'[:2000])
      continue
    problems = [m for m in (expected, _train_file(data_dir), 'Delete', "Dataset 'cifar10'")
                if m not in str(result)]
    if problems:
      failures.append(f'{name}: no {problems} in {result}')
  print('\n' + '\n'.join(times))
  assert not failures, '\n\n'.join(failures)
