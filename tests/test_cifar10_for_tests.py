"""The CIFAR-10 the data tests read: the real one, or a tiny fake one TFDS's builder prepares.

On a fresh clone (no real CIFAR-10 dir) every data test still runs: conftest's
cifar10_data_dir fixture prepares a fake CIFAR-10 with TFDS's own ``cifar10``
builder, and an error there fails the tests that need it, never skips them.
"""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import conftest


def _records(path) -> tuple:
  """(labels, HWC images) of a CIFAR-10 binary file, parsed as its documented layout."""
  rows = np.frombuffer(pathlib.Path(path).read_bytes(), np.uint8).reshape(-1, 1 + 3 * 32 * 32)
  return rows[:, 0], rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_cifar10_data_dir_holds_what_tfds_prepared_from_the_binary_files(
    cifar10_data_dir, tmp_path):
  sizes = conftest.cifar10_split_sizes()
  if not conftest.FAKE_CIFAR10:
    assert sizes == {'train': 50000, 'test': 10000}
    return
  conftest.write_fake_cifar10_binary(tmp_path)  # The same bytes the fixture prepared from.
  folder = tmp_path / 'cifar-10-batches-bin'
  labels, images = _records(folder / 'test_batch.bin')
  read = tfds.as_numpy(tfds.load('cifar10', split='test', data_dir=cifar10_data_dir,
                                 download=False, shuffle_files=False, batch_size=-1))
  order = np.argsort(read['id'])  # test_00000, ...: the position in the binary file.
  np.testing.assert_array_equal(read['label'][order], labels)
  np.testing.assert_array_equal(read['image'][order], images)
  train_labels = np.concatenate([_records(folder / f'data_batch_{i}.bin')[0] for i in range(1, 6)])
  assert sizes == {'train': len(train_labels), 'test': len(labels)}
  # Balanced, as conftest's fraction tests need: train[:10000] at 0.1 is 100 per class.
  assert np.bincount(train_labels[:10000], minlength=10).min() >= 100


def test_preparing_from_a_damaged_archive_raises(tmp_path):
  download = tmp_path / 'download'
  conftest.write_fake_cifar10_binary(download)
  batch = download / 'cifar-10-batches-bin' / 'data_batch_1.bin'
  batch.write_bytes(batch.read_bytes()[:5000])  # Not a whole number of 3073-byte records.
  with pytest.raises(Exception):  # noqa: B017 (whatever TFDS raises; the point: not a skip)
    conftest.prepare_fake_cifar10(tmp_path / 'tfds', download)
