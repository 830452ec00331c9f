"""End to end on the real CIFAR-10: a supervised CE + BT run, and fine-tuning from the CLI."""

import json
import os
import subprocess
import sys

from barlow_jax import supervised
from conftest import (DATA_DIR, REPO, assert_png_not_blank, needs_cifar10, pretraining_workdir,
                      tiny_config, tiny_supervised_config)


@needs_cifar10
def test_supervised_run_writes_results_and_plots(tmp_path, small_resnet):
  config = tiny_supervised_config()  # 8 devices, 4 steps, gamma 0.01.
  config.model.encoder = small_resnet
  results = supervised.run(config, str(tmp_path))

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['num_steps'] == 4 and saved['gamma'] == 0.01
  # Every example counted exactly once (72 = 2 batches of 32 + 8 padded).
  assert saved['train']['num_examples'] == 64
  assert saved['test']['num_examples'] == saved['aug_test']['num_examples'] == 72
  for key in ('train_accuracy', 'test_accuracy', 'aug_test_accuracy'):
    assert 0.0 <= saved[key] <= 1.0 and saved[key] == results[key]
  assert -1.0 <= saved['mean_diag_c'] <= 1.0
  assert '| augmented test |' in (tmp_path / 'results.md').read_text()
  for name in ('embeddings_pca', 'embeddings_tsne', 'cross_correlation', 'confusion_matrix'):
    assert_png_not_blank(tmp_path / f'{name}.png')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


@needs_cifar10
def test_finetune_from_a_pretraining_checkpoint_runs_from_the_cli(tmp_path):
  pretraining_workdir(tmp_path / 'bt', tiny_config(), step=2)

  workdir = tmp_path / 'ft'
  env = dict(os.environ, XLA_FLAGS='')  # One CPU device, as a user's laptop.
  cmd = [sys.executable, '-m', 'barlow_jax.main', '--config=configs/cifar_finetune.py',
         f'--workdir={workdir}', f'--config.pretrained_workdir={tmp_path / "bt"}',
         '--config.label_fraction=0.1', f'--config.data_dir={DATA_DIR}',
         '--config.download=False', '--config.num_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval.train_split=train[:40]',
         '--config.eval.test_split=test[:40]', '--config.eval.batch_size=16']
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  saved = json.loads((workdir / 'results.json').read_text())
  assert saved['pretrained_step'] == 2 and saved['label_fraction'] == 0.1
  assert saved['num_train'] == 5000  # 10% of CIFAR-10 train, 500 per class.
  assert saved['model']['encoder'] == 'resnet18' and saved['model']['width'] == 4
  assert saved['test']['num_examples'] == 40
  for key in ('top1', 'top5', 'micro', 'macro'):
    assert 0.0 <= saved['test'][key] <= 1.0
  assert '| test |' in (workdir / 'results.md').read_text()
  assert 'ce1' in result.stderr and 'Compiled the train step' in result.stderr
