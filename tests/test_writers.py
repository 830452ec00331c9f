"""Scalars and images: TensorBoard always, Weights & Biases beside it when asked (runtime/writers.py).

W&B runs offline here (WANDB_MODE=offline): nothing leaves the machine, and
its files under the workdir are read back with wandb's own record classes.
"""

import glob
import os
import sys

import numpy as np
from PIL import Image
import pytest

import cli_runs
import wandb_records
from barlow_jax import config_files
from barlow_jax import errors
from barlow_jax.runtime import writers
from conftest import tiny_config


def _wandb_config():
  config = tiny_config()
  config.logging.wandb = True
  return config


def _tensorboard_tags(workdir) -> set:
  import tensorflow as tf  # Only for reading event files.
  return {value.tag for path in glob.glob(os.path.join(workdir, 'events.out.tfevents*'))
          for event in tf.compat.v1.train.summary_iterator(path) for value in event.summary.value}


def test_wandb_gets_tensorboards_scalars_and_images_and_a_resume_continues_its_run(
    tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  workdir = str(tmp_path / 'run')
  images = np.random.default_rng(0).random((2, 8, 6, 3))  # Floats in [0, 1], as TensorBoard's.
  for step in (1, 3):  # A run, then the same command again: a resume.
    writer = writers.create(workdir, _wandb_config())
    writer.write_scalars(step, {'train/bt_loss': 1.5 / step})
    writer.write_images(step, {'augment/two_views': images})
    writer.flush()
    writer.close()

  runs = wandb_records.offline_runs(workdir)
  assert [(r['run_id'], r['name']) for r in runs] == [(writers.run_id(workdir), workdir)] * 2
  history = [h for r in runs for h in r['history']]
  assert {(h['_step'], h['train/bt_loss']) for h in history if 'train/bt_loss' in h} == {
      (1, 1.5), (3, 0.5)}
  assert [h['augment/two_views/count'] for h in history if 'augment/two_views/count' in h] == [2, 2]
  sent = sorted(np.asarray(Image.open(os.path.join(runs[0]['dir'], f))).tobytes()
                for f in runs[0]['files'] if 'two_views_1_' in f and f.endswith('.png'))
  assert sent == sorted(np.round(x * 255).astype(np.uint8).tobytes() for x in images)
  # The same tags in TensorBoard's events beside it.
  assert {'train/bt_loss', 'augment/two_views'} <= _tensorboard_tags(workdir)


def test_without_the_flag_there_is_no_wandb_run(tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  writer = writers.create(str(tmp_path), tiny_config())
  writer.write_scalars(1, {'train/bt_loss': 1.0})
  writer.close()
  assert not (tmp_path / 'wandb').exists() and _tensorboard_tags(str(tmp_path)) == {
      'train/bt_loss'}


def test_a_missing_package_is_a_config_error_only_when_asked_for(monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb now raises ImportError.
  writers.check(tiny_config())  # Not asked for: the package is optional.
  with pytest.raises(errors.ConfigError, match=r"pip install 'barlow_jax\[wandb\]'"):
    writers.check(_wandb_config())
  sweep = config_files.load('supervised_bt_sweep')  # A sweep asks through its runs' config.
  sweep.run.logging.wandb = True
  with pytest.raises(errors.ConfigError, match='wandb'):
    writers.check(sweep)


def test_no_login_exits_2_before_the_run_starts(tmp_path):
  """Online W&B without an API key: exit 2 naming the fixes, nothing written to the workdir."""
  home = tmp_path / 'home'
  home.mkdir()
  environ = cli_runs.env(HOME=str(home), NETRC=str(home / 'netrc'),
                         WANDB_CONFIG_DIR=str(home / 'wandb'))
  for key in ('WANDB_API_KEY', 'WANDB_MODE'):
    environ.pop(key, None)
  workdir = tmp_path / 'run'
  result = cli_runs.run(cli_runs.main_cmd(workdir, _wandb_config()), environ, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'W&B has no API key: run `wandb login`' in result.stderr
  assert 'WANDB_MODE=offline' in result.stderr and 'Traceback' not in result.stderr
  assert not workdir.exists()
