"""The datasets barlow_jax knows, and the TFDS builder that reads one.

A ``DatasetSpec`` holds what the pipeline and the models need to know about a
TFDS dataset (classes, image side, channel statistics, the test split);
``get_builder`` returns the prepared builder, downloading it only when the
config allows and the data is missing.
"""

import dataclasses
from typing import Optional

import tensorflow_datasets as tfds

from barlow_jax.data import download as download_lib
from barlow_jax.data import integrity
from barlow_jax.errors import ConfigError, DatasetNotFoundError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a TFDS dataset."""
  tfds_name: str
  num_classes: int
  image_size: int  # Side of the square image handed to the device.
  mean: tuple[float, float, float]  # Per-channel, in [0, 1] units.
  std: tuple[float, float, float]
  test_split: str = 'test'
  # False: variable-size JPEGs. Training crops are cut on the host from the
  # whole image (data/host_crop.py); evaluation images are resized (shorter
  # side) to eval_resize and centre-cropped to image_size.
  fixed_size: bool = True
  eval_resize: int = 0


DATASETS = {
    'cifar10': DatasetSpec('cifar10', 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': DatasetSpec('cifar100', 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'stl10': DatasetSpec('stl10', 10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    # As the official code: training crops from the whole image (on the host),
    # evaluation on Resize(256) + CenterCrop(224).
    'imagenet2012': DatasetSpec('imagenet2012', 1000, 224, (0.485, 0.456, 0.406),
                                (0.229, 0.224, 0.225), test_split='validation', fixed_size=False,
                                eval_resize=256),
}


def dataset_spec(name: str) -> DatasetSpec:
  """The spec of ``config.dataset``; ConfigError naming the key if unknown."""
  if name not in DATASETS:
    raise ConfigError(f'config.dataset={name!r} is not one of {sorted(DATASETS)}.')
  return DATASETS[name]


def get_builder(name: str, data_dir: Optional[str], download: bool) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; downloads only when allowed and missing.

  Raises:
    DatasetNotFoundError: not prepared in ``data_dir`` and ``download`` is False.
    DatasetDownloadError: (a DatasetNotFoundError) not prepared, and the download
      host is unreachable or the download failed (data/download.py).
    DatasetCorruptError: its metadata is unreadable, or a file is missing or
      truncated (data/integrity.py).
  """
  spec = dataset_spec(name)
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  # A garbled dataset_info.json: json, protobuf.
    raise integrity.unreadable_metadata(spec.tfds_name, data_dir, e) from None
  if not builder.is_prepared():
    if not download:
      raise DatasetNotFoundError(
          f'Dataset {spec.tfds_name!r} is not prepared in data_dir={builder.data_dir_root!r} '
          '(config.data_dir, or TFDS_DATA_DIR); set config.download=True to fetch it.')
    download_lib.prepare(builder, spec.tfds_name)
  integrity.check_files(builder)  # A truncated or missing file: exit 2 before anything runs.
  return builder


def split_size(builder: tfds.core.DatasetBuilder, split: str, key: str) -> int:
  """Examples in ``split`` from the dataset's metadata (nothing is read).

  Args:
    builder: the prepared builder.
    split: a TFDS split expression ('train', 'train[:10%]', 'train+unlabelled').
    key: the config key holding it, for the message ('train_split').

  Raises:
    ConfigError: naming ``key`` and listing the splits: no such split, a slice
      out of range, or an empty split.
  """
  try:
    size = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise ConfigError(f'config.{key}={split!r} is not a split of {builder.name} (its splits: '
                      f'{_split_sizes(builder)}): {e}') from None
  if size == 0:
    raise ConfigError(f'config.{key}={split!r} of {builder.name} is empty (its splits: '
                      f'{_split_sizes(builder)}).')
  return size


def _split_sizes(builder) -> str:
  return ', '.join(f'{name!r} ({info.num_examples})' for name, info in builder.info.splits.items())
