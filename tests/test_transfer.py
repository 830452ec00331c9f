"""The transfer table: one encoder probed on CIFAR-10 and on a folder, row by row against the
single-dataset probe (configs/cifar_linear.py with --config.dataset) of each; bad names."""

import json
import os
import pathlib
import re

import numpy as np
from PIL import Image
import pytest

from barlow_jax import config_files
from barlow_jax import main
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.stages import linear
from barlow_jax.stages import transfer
from conftest import DATA_DIR, needs_cifar10, pretraining_workdir, snapshot, tiny_config

# Shared by every dataset of the table: small enough for seconds, present in both.
TRAIN_SPLIT, TEST_SPLIT = 'train[:40]', 'test[:16]'


def write_folder(root) -> None:
  """Two classes of 24 + 8 small images of the class's colour (PNG and JPEG, mixed sizes)."""
  rng = np.random.default_rng(0)
  for split, count in (('train', 24), ('test', 8)):
    for label, name in enumerate(('red', 'blue')):
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        pixels = rng.integers(0, 90, (30 + i % 5, 34, 3))
        pixels[..., 2 * label] += 160
        Image.fromarray(pixels.astype(np.uint8)).save(
            os.path.join(root, split, name, f'{i}.{"png" if i % 2 else "jpg"}'))


@pytest.fixture(scope='module')
def encoder_workdir(tmp_path_factory, small_resnet):
  pretraining = tiny_config()
  pretraining.model.encoder = small_resnet
  return pretraining_workdir(tmp_path_factory.mktemp('bt'), pretraining, step=2)


def _probe_settings(config, encoder_workdir, data_dir) -> None:
  config.pretrained_workdir, config.data_dir = str(encoder_workdir), str(data_dir)
  config.train_split, config.test_split = TRAIN_SPLIT, TEST_SPLIT
  config.batch_size, config.probe.batch_size, config.probe.epochs, config.knn.k = 8, 8, 3, (5,)


@needs_cifar10
def test_each_row_is_the_single_dataset_probe(encoder_workdir, tmp_path):
  # CIFAR-10 read where it is; the folder prepared under the same data_dir (a tmp one).
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  (data_dir / 'cifar10').symlink_to(pathlib.Path(DATA_DIR) / 'cifar10')
  write_folder(tmp_path / 'images')
  names = ['cifar10', f'folder:{tmp_path / "images"}']
  config = config_files.load('transfer')
  _probe_settings(config, encoder_workdir, data_dir)
  config.datasets = ','.join(names)
  results = transfer.run(config, str(tmp_path / 'transfer'))

  assert json.loads((tmp_path / 'transfer' / 'results.json').read_text()) == results
  assert list(results['datasets']) == names
  table = (tmp_path / 'transfer' / 'results.md').read_text()
  for i, name in enumerate(names):
    single = config_files.load('cifar_linear')
    _probe_settings(single, encoder_workdir, data_dir)
    single.dataset = name
    reference = linear.run(single, str(tmp_path / f'probe{i}'))
    row = results['datasets'][name]
    assert reference['dataset'] == name and row['num_train'] == reference['num_train'] == 40
    for key in ('linear', 'knn_k5'):
      assert row[key] == {k: reference[key][k] for k in row[key]}, (name, key)
    assert row['linear']['num_examples'] == 16
    assert (f"| {name} | {row['num_classes']} | 40 | 16 | {100 * row['linear']['top1']:.2f} | "
            f"{100 * row['knn_k5']['top1']:.2f} |") in table
  assert results['datasets'][names[1]]['class_names'] == ['blue', 'red']


@pytest.mark.parametrize('datasets, message', [
    ('cifar10,cifar01', r"'cifar01' of config.datasets: no such dataset.*Did you mean.*cifar10"),
    ('cifar10,folder:/nowhere/x', r"'folder:/nowhere/x' of config.datasets: /nowhere/x is not a "
                                  r'directory'),
    ('cifar10, cifar10', r"config.datasets names \['cifar10'\] more than once"),
    ('', r'config.datasets=.* must name the datasets to probe'),
])
def test_a_bad_dataset_among_several_exits_2_before_any_work(encoder_workdir, tmp_path, capsys,
                                                            monkeypatch, datasets, message):
  monkeypatch.setattr(linear, 'load_encoder', lambda *_: pytest.fail('the encoder was loaded'))
  config = config_files.load('transfer')
  _probe_settings(config, encoder_workdir, tmp_path / 'tfds')
  config.datasets = datasets
  with pytest.raises(SystemExit) as exit_:
    main.run(config, str(tmp_path / 'run'))
  assert exit_.value.code == 2
  assert re.search(message, capsys.readouterr().err)
  assert not snapshot(tmp_path / 'run')  # Nothing written (the lock file aside).


def test_a_probe_recorded_before_config_dataset_existed_resumes_under_todays_config():
  """The new placeholder, left unset, is no difference from a config.json that lacks it
  (the augmented probe resumes only under the config it recorded)."""
  today = config_files.load('cifar_linear')
  recorded = today.to_dict()
  del recorded['dataset']
  assert workdir_lib.config_differences(recorded, today) == []
  today.dataset = 'cifar100'
  assert workdir_lib.config_differences(recorded, today) == [
      ('dataset', workdir_lib.ABSENT, 'cifar100')]


@pytest.mark.parametrize('name', ['cifar_linear', 'cifar_finetune'])
def test_a_bad_single_dataset_for_the_probe_or_fine_tuning_exits_2(encoder_workdir, tmp_path,
                                                                   capsys, name):
  config = config_files.load(name)
  config.pretrained_workdir, config.dataset = str(encoder_workdir), 'cifar01'
  with pytest.raises(SystemExit) as exit_:
    main.run(config, str(tmp_path / 'run'))
  assert exit_.value.code == 2
  assert re.search(r"config.dataset='cifar01': no such dataset.*Did you mean.*cifar10",
                   capsys.readouterr().err)
  assert not snapshot(tmp_path / 'run')
