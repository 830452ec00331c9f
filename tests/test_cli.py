"""The command line on the real CIFAR-10: a short quick-start run, its linear probe, bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import DATA_DIR, REPO, assert_png_not_blank, needs_cifar10


def _run(workdir, *overrides):
  env = dict(os.environ, XLA_FLAGS='')  # One CPU device, as a user's laptop.
  cmd = [sys.executable, '-m', 'barlow_jax.main', '--config=configs/cifar_bt_cpu.py',
         f'--workdir={workdir}', f'--config.data_dir={DATA_DIR}', '--config.download=False',
         *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def quick_start_run(tmp_path_factory):
  """The quick-start command, 3 steps: (workdir, CompletedProcess)."""
  workdir = tmp_path_factory.mktemp('bt_cpu')
  result = _run(workdir, '--config.num_steps=3', '--config.log_every=1',
                '--config.batch_size=64',  # Smaller batch: the CLI path, in less time.
                '--config.train_split=train[:1024]',  # A small shuffle buffer to fill.
                # The config's kNN monitor runs at the last step; on small splits here.
                '--config.knn_monitor.train_split=train[:64]',
                '--config.knn_monitor.test_split=test[:64]')
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
def test_linear_probe_runs_from_the_cli_on_the_quick_start_checkpoint(quick_start_run, tmp_path):
  pretrained, _ = quick_start_run
  env = dict(os.environ, XLA_FLAGS='')
  cmd = [sys.executable, '-m', 'barlow_jax.main', '--config=configs/cifar_linear.py',
         f'--workdir={tmp_path}', f'--config.pretrained_workdir={pretrained}',
         '--config.train_split=train[:300]', '--config.test_split=test[:100]',
         '--config.batch_size=64', '--config.probe.epochs=5', '--config.probe.batch_size=64',
         '--config.knn.k=(5,)']
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['encoder'] == 'pretrained, step 3' and saved['num_train'] == 300
  for key in ('linear', 'linear_aug_test', 'knn_k5'):
    assert saved[key]['num_examples'] == 100  # Every test example once (64 + 36 padded).
    assert 0.0 <= saved[key]['top1'] <= saved[key]['top5'] <= 1.0
    assert len(saved[key]['per_class_accuracy']) == 10
  table = (tmp_path / 'results.md').read_text()
  assert '| linear |' in table and '| knn_k5 |' in table
  assert_png_not_blank(tmp_path / 'confusion_matrix.png')


def test_invalid_value_exits_2_naming_the_key(tmp_path):
  result = _run(tmp_path, '--config.lambd=-0.5')
  assert result.returncode == 2
  assert 'config.lambd=-0.5' in result.stderr


def test_unknown_key_is_rejected(tmp_path):
  result = _run(tmp_path, '--config.lamda=0.1')
  assert result.returncode != 0
  assert 'lamda' in result.stderr
