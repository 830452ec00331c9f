"""Balanced fractions and the resumable training stream, on the real CIFAR-10."""

import collections

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from barlow_jax import config_validation
from barlow_jax import errors
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from conftest import DATA_DIR, needs_cifar10, tiny_config


def test_balanced_subset_exact_counts_and_seeded():
  labels = np.repeat(np.arange(10), [600, 550, 700, 500, 520, 800, 510, 505, 530, 900])
  idx = pipeline.balanced_subset(labels, 0.1, 10, seed=3)
  per_class = int(0.1 * len(labels) / 10)
  assert np.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
  assert len(np.unique(idx)) == len(idx)
  np.testing.assert_array_equal(idx, pipeline.balanced_subset(labels, 0.1, 10, seed=3))
  assert not np.array_equal(idx, pipeline.balanced_subset(labels, 0.1, 10, seed=4))


def test_balanced_subset_rejects_impossible_fractions():
  labels = np.repeat(np.arange(2), [90, 10])
  with pytest.raises(ValueError, match='fraction=0.5 asks for 25 examples per class'):
    pipeline.balanced_subset(labels, 0.5, 2, seed=0)
  with pytest.raises(ValueError, match='fraction=0 asks for 0 examples per class'):
    pipeline.balanced_subset(labels, 0, 2, seed=0)
  # The range of config.fraction is checked once, before any data is read.
  config = tiny_config()
  config.fraction = 0.0
  with pytest.raises(errors.ConfigError, match=r'config\.fraction=0\.0 must be in \(0, 1\]'):
    config_validation.validate_pretrain(config)


@needs_cifar10
def test_cifar10_fraction_stream_is_balanced_and_resumable():
  config = tiny_config()
  config.train_split = 'train[:10000]'  # A short label scan.
  config.fraction = 0.1  # 100 images per class.
  data = pipeline.load_train_data(datasets.from_config(config), config.train_split, config.fraction,
                                  config.fraction_seed)
  assert data.num_global == data.num_local == 1000

  def take(start, n):
    ds = pipeline.train_dataset(data, local_batch=100, seed=7, start_step=start)
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]

  epoch = take(0, 12)  # 10 batches = one epoch, then two into the next one.
  labels = np.concatenate([b['label'] for b in epoch[:10]])
  assert collections.Counter(labels.tolist()) == {c: 100 for c in range(10)}
  images = np.concatenate([b['image'] for b in epoch[:10]])
  assert len({im.tobytes() for im in images}) == 1000  # Each example once per epoch.
  assert not np.array_equal(epoch[0]['image'], epoch[10]['image'])  # Reshuffled.
  for start in (3, 10, 11):  # Mid-epoch, at and past the epoch boundary.
    resumed = take(start, 12 - start)
    for a, b in zip(resumed, epoch[start:]):
      np.testing.assert_array_equal(a['image'], b['image'])


@needs_cifar10
def test_missing_dataset_names_the_data_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    datasets.get_builder('cifar10', str(tmp_path), download=False)


@needs_cifar10
def test_eval_batches_pad_and_mask_every_example_once():
  builder = datasets.get_builder('cifar10', DATA_DIR, download=False)
  spec = datasets.dataset_spec('cifar10')
  batches = list(pipeline.eval_batches(builder, spec, 'test[:1003]', local_batch=100))
  assert len(batches) == 11 and all(len(b['label']) == 100 for b in batches)
  assert sum(int(b['mask'].sum()) for b in batches) == 1003
  assert not batches[-1]['mask'][3:].any()


@needs_cifar10
def test_eval_batches_index_examples_by_their_position_in_the_split(monkeypatch):
  builder = datasets.get_builder('cifar10', DATA_DIR, download=False)
  spec = datasets.dataset_spec('cifar10')

  def read(process_index, process_count):
    monkeypatch.setattr(jax, 'process_index', lambda: process_index)
    monkeypatch.setattr(jax, 'process_count', lambda: process_count)
    batches = list(pipeline.eval_batches(builder, spec, 'test[:1003]', local_batch=100))
    mask = np.concatenate([b['mask'] for b in batches])
    return (np.concatenate([b['index'] for b in batches])[mask],
            np.concatenate([b['label'] for b in batches])[mask])

  index, labels = read(0, 1)
  np.testing.assert_array_equal(index, np.arange(1003))
  # Process 1 of 2 reads the second contiguous half (tfds.even_splits: 502 + 501).
  second, second_labels = read(1, 2)
  np.testing.assert_array_equal(second, np.arange(502, 1003))
  np.testing.assert_array_equal(second_labels, labels[502:])


@needs_cifar10
def test_resume_reads_only_its_window_and_matches_the_straight_stream(monkeypatch):
  config = tiny_config()
  config.train_split = 'train[:1000]'
  # Windows of 300: 300, 300, 300, 100 records.
  data = pipeline.load_train_data(datasets.from_config(config), config.train_split, config.fraction,
                                  config.fraction_seed)

  def take(start, n):
    ds = pipeline.train_dataset(data, local_batch=100, seed=5, start_step=start, shuffle_buffer=300)
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]

  straight = take(0, 13)
  assert len({im.tobytes() for b in straight[:10] for im in b['image']}) == 1000
  for start in (5, 9, 10, 12):  # Mid-window (twice), epoch boundary, next epoch.
    for a, b in zip(take(start, 13 - start), straight[start:]):
      np.testing.assert_array_equal(a['image'], b['image'])

  # Records the source hands out (no read-ahead below the shuffle): a resume at
  # record 850 of the epoch reads its one window, not the 850 records before it.
  real_window_records, reads = pipeline._window_records, []

  def counted(*args):
    return real_window_records(*args).map(
        lambda ex: (tf.py_function(lambda: reads.append(1) or 0, [], tf.int32), ex)[1])

  monkeypatch.setattr(pipeline, '_window_records', counted)
  stream = pipeline._record_stream(data, seed=5, start=850, shuffle_buffer=300, cache=False)
  next(stream.as_numpy_iterator())
  assert len(reads) in (100, 300)  # Window 850 // 300 = 2 of the epoch's order.


class _NumberedImages(tfds.core.GeneratorBasedBuilder):
  """600 8x8 images whose pixels spell their number, written by TFDS into 6 files."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)), 'label': tfds.features.ClassLabel(
            num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(600):
      yield i, {'image': np.full((8, 8, 3), [i % 256, i // 256, 0], np.uint8), 'label': i % 10}


def _numbers(images: np.ndarray) -> np.ndarray:
  pixels = images[:, 0, 0].astype(np.int64)
  return pixels[:, 0] + 256 * pixels[:, 1]


@pytest.fixture(scope='module')
def numbered_images(tmp_path_factory):
  builder = _NumberedImages(data_dir=str(tmp_path_factory.mktemp('numbered')))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      num_shards=6, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  assert len(builder.info.splits['train'].file_instructions) == 6
  return builder, datasets.DatasetSpec('numbered_images', 10, 8, (0.5,) * 3, (0.25,) * 3)


def test_multi_file_windows_with_a_fraction_resume_exactly(numbered_images):
  """Windows spanning file boundaries, a balanced fraction, resumes anywhere."""
  builder, spec = numbered_images
  # Reference for 'position in the split': TFDS's own slicing, one example at a time.
  by_position = [_numbers(next(builder.as_dataset(split=f'train[{k}:{k + 1}]').batch(1)
                               .as_numpy_iterator())['image'])[0] for k in range(0, 600, 37)]
  _, scan_labels = pipeline._scan_labels(builder, 'train')
  kept = np.sort(pipeline.balanced_subset(scan_labels, 0.5, 10, seed=1))  # 300 positions.
  data = pipeline.TrainData(builder, 'train', kept, len(kept), len(kept), spec)

  def take(start, n):
    ds = pipeline.train_dataset(data, local_batch=20, seed=3, start_step=start,
                                shuffle_buffer=70, cache=False)  # Windows 70 x 4 + 20.
    return [_numbers(b['image']) for _, b in zip(range(n), ds.as_numpy_iterator())]

  straight = take(0, 18)  # 15 steps per epoch, then 3 into the next one.
  # The epoch is exactly the kept examples, each once (numbers = positions' contents).
  eval_numbers = np.concatenate([_numbers(b['image'])[b['mask']] for b in pipeline.eval_batches(
      builder, spec, 'train', local_batch=64)])
  np.testing.assert_array_equal(eval_numbers[::37], by_position)  # eval 'index' = position.
  assert sorted(np.concatenate(straight[:15]).tolist()) == sorted(eval_numbers[kept].tolist())
  assert not np.array_equal(straight[0], straight[15])  # The next epoch is reshuffled.
  for start in (2, 4, 7, 14, 15, 16):  # Inside and across windows, at and past the epoch end.
    for a, b in zip(take(start, 18 - start), straight[start:]):
      np.testing.assert_array_equal(a, b)


def test_array_record_data_is_refused_naming_the_format(numbered_images, tmp_path, monkeypatch):
  _, spec = numbered_images
  builder = _NumberedImages(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  with pytest.raises(errors.ConfigError, match=r'stored as array_record; barlow_jax reads '
                     r'TFRecord'):
    pipeline.load_train_data(datasets.Dataset('numbered_images', spec, builder), 'train')
