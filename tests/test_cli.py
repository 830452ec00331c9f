"""The command line on the real CIFAR-10: a short quick-start run, its linear probe, bad input.

Every command runs in a directory other than the repository's, with configs
given by path or by name: an installed barlow_jax must not need the checkout
as its current directory.
"""

import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

import wandb_records
from conftest import DATA_DIR, REPO, TEST_XLA_FLAGS, assert_png_not_blank, needs_cifar10

# What the libraries log at INFO on every run, kept off the console by default (console.py).
LIBRARY_NOISE = ('orbax', 'INFO:absl', 'Unable to initialize backend', 'xla_bridge.py',
                 'logging_writer.py', 'dataset_info.py', 'checkpoint_manager.py')
# An absl-formatted Python log line: severity, date, time, thread, then file:line].
LOG_LINE = re.compile(r'^([IWEF])\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] ', re.M)
# An INFO line of TensorFlow's or XLA's C++ logging (file.cc:line] or file.h:line]).
NATIVE_INFO_LINE = re.compile(r'^I\d{4} [\d:.]+ +\d+ \S+\.(cc|h):\d+\] ', re.M)


def _env() -> dict:
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS)  # One CPU device, as a user's laptop.
  env.pop('PYTHONPATH', None)  # barlow_jax as installed, not from the checkout.
  return env


def _run(workdir, *overrides, config=str(REPO / 'configs' / 'cifar_bt_cpu.py'), env=None):
  """The CLI with cwd=workdir's parent (not the repository) and the config given by path."""
  cmd = [sys.executable, '-m', 'barlow_jax.main', f'--config={config}',
         f'--workdir={workdir}', f'--config.data_dir={DATA_DIR}', '--config.download=False',
         *overrides]
  return subprocess.run(cmd, cwd=pathlib.Path(workdir).parent, env=env or _env(),
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def quick_start_run(tmp_path_factory):
  """The quick-start command, 3 steps, logging to W&B offline too: (workdir, CompletedProcess)."""
  workdir = tmp_path_factory.mktemp('bt_cpu')
  result = _run(workdir, '--config.num_steps=3', '--config.log_every=1',
                '--config.batch_size=64',  # Smaller batch: the CLI path, in less time.
                '--config.train_split=train[:1024]',  # A small shuffle buffer to fill.
                # The config's kNN monitor runs at the last step; on small splits here.
                '--config.knn_monitor.train_split=train[:64]',
                '--config.knn_monitor.test_split=test[:64]',
                '--config.logging.wandb=True', env=dict(_env(), WANDB_MODE='offline'))
  return workdir, result


@needs_cifar10
def test_quick_start_config_runs_and_checkpoints(quick_start_run):
  workdir, result = quick_start_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 3: kNN (k=20) top-1" in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['num_steps'] == 3 and saved['model']['encoder'] == 'resnet18'
  assert 'img/s' in result.stderr and 'Compiled the train step' in result.stderr
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert_png_not_blank(workdir / 'cross_correlation.png')


@needs_cifar10
def test_quick_start_console_shows_this_projects_lines_only(quick_start_run):
  """Start-up, progress, monitor, save and end lines; no library INFO walls (console.py)."""
  _, result = quick_start_run
  console = result.stdout + result.stderr
  for noise in LIBRARY_NOISE:
    assert noise not in console, f'{noise!r} on the console:\n{console[-3000:]}'
  ours = {p.name for p in (REPO / 'barlow_jax').rglob('*.py')}
  info_files = {f for level, f in LOG_LINE.findall(console) if level == 'I'}
  assert info_files and info_files <= ours, info_files - ours
  assert re.search(r'step 3/3  bt_loss \S+  on_diag \S+  off_diag \S+  .*learning_rate \S+  '
                   r'[\d.]+ img/s  ETA 00:00:\d\d', console), console[-3000:]
  for line in ('JAX process 0/1', '1024 examples, 16 steps/epoch, 3 steps',
               'Saving checkpoint step 3 in', 'Done: pretrain into'):
    assert line in console, line


def test_verbosity_flag_brings_the_library_lines_back(tmp_path):
  """absl's own --verbosity: JAX's backend probe and the C++ INFO lines come back.

  Both runs exit 2 on the config after TensorFlow and JAX loaded, with no
  TF_CPP_MIN_LOG_LEVEL in their environment (conftest sets one for the rest):
  the CLI's own default is what is tested.
  """
  env = {k: v for k, v in _env().items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  quiet = _run(tmp_path, '--config.lambd=-0.5', env=env)
  verbose = _run(tmp_path, '--config.lambd=-0.5', '--verbosity=1', env=env)
  assert quiet.returncode == verbose.returncode == 2
  assert 'config.lambd=-0.5' in quiet.stderr  # The invalid value, named.
  assert 'xla_bridge.py' not in quiet.stderr and 'JAX process 0/1' in quiet.stderr
  assert "xla_bridge.py" in verbose.stderr and "Initializing backend 'cpu'" in verbose.stderr
  # TensorFlow's and XLA's C++ INFO lines (oneDNN and CPU-feature notices, device counts).
  assert not NATIVE_INFO_LINE.search(quiet.stderr + quiet.stdout), quiet.stderr[-3000:]
  assert NATIVE_INFO_LINE.search(verbose.stderr), verbose.stderr[-3000:]


def _images(workdir) -> dict:
  """{(tag, step): (height, width, channels)} of the images in the TensorBoard event files."""
  import tensorflow as tf  # Only for reading event files.
  out = {}
  for path in glob.glob(str(workdir / 'events.out.tfevents*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'images':
          encoded = tf.make_ndarray(value.tensor)  # [width, height, png, png, ...]
          out[value.tag, event.step] = tuple(tf.io.decode_png(encoded[2]).shape)
  return out


@needs_cifar10
def test_quick_start_writes_the_two_views_and_c_to_tensorboard(quick_start_run):
  workdir, _ = quick_start_run
  images = _images(workdir)
  # 8 training crops (the quick start's 24 px) side by side, 2 px apart; both views one above
  # the other.
  assert images[('augment/two_views', 1)] == (2 * 24 + 2, 8 * 26 - 2, 3)
  # C of the 1024-d projector at the checkpoint (the last step): its first 128 dims, 2 px each.
  assert images[('pretrain/cross_correlation', 3)] == (256, 256, 3)
  assert len(images) == 2, images


def _scalars(workdir) -> set:
  """{(tag, step)} of the scalars in the TensorBoard event files."""
  import tensorflow as tf  # Only for reading event files.
  return {(value.tag, event.step) for path in glob.glob(str(workdir / 'events.out.tfevents*'))
          for event in tf.compat.v1.train.summary_iterator(path) for value in event.summary.value
          if value.metadata.plugin_data.plugin_name == 'scalars'}


@needs_cifar10
def test_quick_start_sends_tensorboards_scalars_and_images_to_wandb(quick_start_run):
  """--config.logging.wandb=True: one W&B run named after the workdir, the same summaries."""
  workdir, _ = quick_start_run
  run, = wandb_records.offline_runs(workdir)
  assert run['name'] == str(workdir)
  logged = {(k, h['_step']) for h in run['history'] for k in h if not k.startswith('_')}
  scalars = _scalars(workdir)
  assert ('train/bt_loss', 3) in scalars and ('monitor/knn_top1', 3) in scalars
  assert scalars <= logged, scalars - logged
  # Images as W&B records them: <tag>/count, and a PNG per image under the run's files.
  for tag, step in _images(workdir):
    assert (f'{tag}/count', step) in logged
    assert any(f.startswith(f'files/media/images/{tag}_{step}_') for f in run['files']), tag


@needs_cifar10
def test_linear_probe_runs_from_the_cli_on_the_quick_start_checkpoint(quick_start_run, tmp_path):
  pretrained, _ = quick_start_run
  # The config by name, the pretraining workdir relative to the current directory.
  cmd = [sys.executable, '-m', 'barlow_jax.main', '--config=cifar_linear',
         '--workdir=probe', f'--config.pretrained_workdir={os.path.relpath(pretrained, tmp_path)}',
         '--config.train_split=train[:300]', '--config.test_split=test[:100]',
         '--config.batch_size=64', '--config.probe.epochs=5', '--config.probe.batch_size=64',
         '--config.knn.k=(5,)']
  result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  tmp_path = tmp_path / 'probe'

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['encoder'] == 'pretrained, step 3' and saved['num_train'] == 300
  for key in ('linear', 'linear_aug_test', 'knn_k5'):
    assert saved[key]['num_examples'] == 100  # Every test example once (64 + 36 padded).
    assert 0.0 <= saved[key]['top1'] <= saved[key]['top5'] <= 1.0
    assert len(saved[key]['per_class_accuracy']) == 10
  table = (tmp_path / 'results.md').read_text()
  assert '| linear |' in table and '| knn_k5 |' in table
  assert_png_not_blank(tmp_path / 'confusion_matrix.png')
  # The pretraining workdir was only read: nothing new in it.
  assert sorted(os.listdir(pretrained / 'checkpoints')) == ['3']


def test_installed_wheel_finds_its_configs_by_name_from_any_directory(tmp_path):
  """``pip install .`` (not editable) installs configs/ as barlow_jax.configs.

  The wheel is built and unpacked here (what pip install does, without
  touching this environment); a config that derives from another by its own
  path loads; the CLI, given a misspelt name, exits 2 listing the installed
  configs. (test_linear_probe_runs_from_the_cli_on_the_quick_start_checkpoint
  runs a config given by name.)
  """
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path / 'dist'), str(REPO)], check=True, timeout=300,
                 capture_output=True)
  wheel, = (tmp_path / 'dist').glob('barlow_jax-*.whl')
  with zipfile.ZipFile(wheel) as f:
    f.extractall(tmp_path / 'site')
  env = dict(_env(), PYTHONPATH=str(tmp_path / 'site'))
  where = subprocess.run(
      [sys.executable, '-c', 'import barlow_jax.config_files as c; print(c.configs_dir()); '
       'print(c.load("cifar_bt_cpu").model.width)'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert where.returncode == 0, where.stderr[-2000:]
  assert where.stdout.split() == [str(tmp_path / 'site' / 'barlow_jax' / 'configs'), '8']
  misspelt = subprocess.run(
      [sys.executable, '-m', 'barlow_jax.main', '--config=cifar_bt_cpuu', '--workdir=run'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert misspelt.returncode == 2, misspelt.stderr[-2000:]
  assert "no config named 'cifar_bt_cpuu'" in misspelt.stderr, misspelt.stderr[-2000:]
  assert 'cifar_bt_cpu,' in misspelt.stderr
