"""STL-10 (seed 001 §4.4) end to end, on a tiny STL-10 prepared by TFDS's own builder.

STL-10 is not on the development machine and tests never download. Instead
TFDS's ``stl10`` builder prepares a dataset from fake files in the layout of
``stl10_binary.tar.gz`` (uint8 images stored channel-first, labels 1..10, an
unlabelled split without labels): the prepared dataset has the real split
names, features and 96x96 shape, only fewer and random images. The run then
goes through the same TFDS reading path as on the real data.
"""

from conftest import config_module
import json
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from barlow_jax.stages import supervised

_SIZES = {'train': 40, 'test': 30, 'unlabeled': 48}


def _write_fake_stl10_binary(root) -> None:
  """Files of stl10_binary/, as the stl10 builder reads them, with random pixels."""
  folder = root / 'stl10_binary'
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for split, n in _SIZES.items():
    (folder / f'{split}_X.bin').write_bytes(
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tobytes())
    if split != 'unlabeled':
      labels = np.arange(n) % 10 + 1  # 1-based, every class present.
      (folder / f'{split}_y.bin').write_bytes(labels.astype(np.uint8).tobytes())
  (folder / 'class_names.txt').write_text('\n'.join(f'class_{i}' for i in range(10)) + '\n')


@pytest.fixture(scope='module')
def stl10_data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('stl10_download')
  _write_fake_stl10_binary(root)
  data_dir = tmp_path_factory.mktemp('tfds')
  # The builder's only network access; everything after it is TFDS's own code.
  with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         return_value=str(root)):
    tfds.builder('stl10', data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)

stl10_supervised_bt = config_module('stl10_supervised_bt')


def _tiny_stl10_config(data_dir: str, gamma: float, encoder: str):
  config = stl10_supervised_bt.get_config()
  config.data_dir = data_dir
  config.download = False
  config.model.encoder = encoder
  config.model.width = 4
  config.model.feature_dim = 32
  config.model.embedding = '32-16'
  config.gamma = gamma
  config.unlabelled_split = 'unlabelled[:24]'
  config.batch_size = 16
  config.num_steps = 2
  config.log_every = 1
  config.checkpoint.every_steps = 2
  config.eval.batch_size = 16
  config.plots.num_examples = 16
  config.plots.tsne = False
  return config


def test_stl10_bt_term_adds_unlabelled_images_and_accuracy_counts_labelled_ones(
    stl10_data_dir, tmp_path, small_resnet):
  config = _tiny_stl10_config(stl10_data_dir, 0.01, small_resnet)
  results = supervised.run(config, str(tmp_path))

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved == json.loads(json.dumps(results))
  # §4.4: the BT term adds unlabelled images (label -1, outside both CEs).
  assert saved['train_split'] == 'train+unlabelled[:24]' and saved['num_train'] == 40 + 24
  # Accuracies are over the labelled images only, each counted once (30 = 16 + 14 padded).
  assert saved['train']['num_examples'] == 40
  assert saved['test']['num_examples'] == saved['aug_test']['num_examples'] == 30
  assert saved['class_names'] == [f'class_{i}' for i in range(10)]
  assert np.isfinite([saved['train_accuracy'], saved['test_accuracy']]).all()


def test_stl10_cross_entropy_baseline_uses_the_labelled_images_alone(stl10_data_dir):
  config = _tiny_stl10_config(stl10_data_dir, 0.0, 'resnet18')
  assert supervised.train_split(config) == 'train'
