"""The command line on the real CIFAR-10: a short quick-start run, and bad input."""

import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt

from conftest import DATA_DIR, REPO, needs_cifar10


def _run(workdir, *overrides):
  env = dict(os.environ, XLA_FLAGS='')  # One CPU device, as a user's laptop.
  cmd = [sys.executable, '-m', 'barlow_jax.main', '--config=configs/cifar_bt_cpu.py',
         f'--workdir={workdir}', f'--config.data_dir={DATA_DIR}', '--config.download=False',
         *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@needs_cifar10
def test_quick_start_config_runs_and_checkpoints(tmp_path):
  result = _run(tmp_path, '--config.num_steps=3', '--config.log_every=1',
                '--config.batch_size=64',  # Smaller batch: the CLI path, in less time.
                '--config.train_split=train[:1024]',  # A small shuffle buffer to fill.
                # The config's kNN monitor runs at the last step; on small splits here.
                '--config.knn_monitor.train_split=train[:64]',
                '--config.knn_monitor.test_split=test[:64]')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 3: kNN (k=20) top-1" in result.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['num_steps'] == 3 and saved['model']['encoder'] == 'resnet18'
  assert 'img/s' in result.stderr and 'Compiled the train step' in result.stderr
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
  picture = plt.imread(tmp_path / 'cross_correlation.png')
  assert picture.shape[0] > 100 and picture[..., :3].std() > 0.05  # A real, non-blank image.


def test_invalid_value_exits_2_naming_the_key(tmp_path):
  result = _run(tmp_path, '--config.lambd=-0.5')
  assert result.returncode == 2
  assert 'config.lambd=-0.5' in result.stderr


def test_unknown_key_is_rejected(tmp_path):
  result = _run(tmp_path, '--config.lamda=0.1')
  assert result.returncode != 0
  assert 'lamda' in result.stderr
