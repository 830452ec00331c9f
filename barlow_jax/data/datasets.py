"""The dataset a stage reads: the four tuned TFDS specs, any other TFDS dataset, image folders.

A stage resolves ``config.dataset`` once (``resolve``) into a ``Dataset``: the
prepared TFDS builder and the ``DatasetSpec`` the pipeline and the models need
(classes, image side, channel statistics, the test split). Everything below
the stages receives that object, or the fields of it it needs.

``config.dataset`` is one of:

* a tuned name of ``DATASETS`` (cifar10, cifar100, stl10, imagenet2012, and
  ImageNet's 1% and 10% label subsets): the statistics and sizes of the papers;
* any other TFDS name, ``name[/config][:version]``: the spec comes from the
  builder's info (classes from the 'label' ClassLabel, the image feature's
  shape), the channel statistics from at most ``STATS_IMAGES`` training images;
* ``folder:/path/to/root``: a folder of image files, prepared once into a TFDS
  dataset (data/folders.py), then read as any TFDS dataset.
"""

import dataclasses
import difflib
import json
import os
from typing import Optional

from absl import logging
from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from barlow_jax.data import download as download_lib
from barlow_jax.data import folders
from barlow_jax.data import integrity
from barlow_jax.errors import ConfigError, DatasetNotFoundError

# Channel statistics of an untuned dataset come from at most this many training images.
STATS_IMAGES = 10_000
# Variable-size images: evaluation resizes the shorter side to crop * 256 / 224, as ImageNet's.
_EVAL_RESIZE_RATIO = 256 / 224


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
# The semi-supervised protocol (Barlow Twins Table 2, the official evaluate.py --train-percent):
# SimCLR's class-balanced lists of 1% and 10% of ImageNet's training images. TFDS's
# imagenet2012_subset builds them from the ImageNet tars; its 'validation' split is all of
# imagenet2012's validation images, the protocol's test set.
for _percent in ('1pct', '10pct'):
  DATASETS[f'imagenet2012_subset/{_percent}'] = dataclasses.replace(
      DATASETS['imagenet2012'], tfds_name=f'imagenet2012_subset/{_percent}')


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A resolved ``config.dataset``: what a stage passes down instead of the name."""
  name: str  # config.dataset as given ('cifar10', 'food101:2.0.0', 'folder:/data/x').
  spec: DatasetSpec
  builder: tfds.core.DatasetBuilder

  @property
  def class_names(self) -> list[str]:
    """The label feature's names (folder names for folders)."""
    return list(self.builder.info.features['label'].names)

  def stats(self) -> dict:
    """What a stage records in config.json (``data_stats``): the probe, fine-tuning and the
    notebook read the same mean and std, and build the model without the data."""
    return {'mean': list(self.spec.mean), 'std': list(self.spec.std),
            'num_classes': self.spec.num_classes}


def dataset_spec(name: str) -> DatasetSpec:
  """The tuned spec of ``name``; ConfigError naming the key if it has none."""
  if name not in DATASETS:
    raise ConfigError(f'config.dataset={name!r} is not one of {sorted(DATASETS)}.')
  return DATASETS[name]


def resolve(name: str, *, data_dir: Optional[str], download: bool, crop_size: int,
            stats: Optional[dict] = None, bad_images: str = 'skip') -> Dataset:
  """``config.dataset`` resolved into its builder and spec: call once per stage.

  Args:
    name: a tuned name, any TFDS name ``name[/config][:version]``, or
      ``folder:/path/to/root``.
    data_dir: TFDS data dir (None: TFDS_DATA_DIR or ~/tensorflow_datasets);
      folders are prepared under it.
    download: fetch a missing TFDS dataset (tuned or not).
    crop_size: the network's input side; the evaluation side of variable-size
      images (ImageNet's 224 is its tuned crop).
    stats: {'mean', 'std'} recorded by the pretraining run (config.data_stats),
      or the encoder's (for_encoder): used instead of the tuned or computed
      ones, so that the probe standardises as pretraining did.
    bad_images: folders only: 'skip' undecodable files (counted in the log) or
      'fatal'.

  Raises:
    ConfigError: unknown name (with close matches), a dataset without an
      'image' and a 'label' feature, bad folder contents (data/folders.py).
    DatasetNotFoundError: not prepared and ``download`` is False.
  """
  if name in DATASETS:
    spec = DATASETS[name]
    if not spec.fixed_size:  # Evaluated at the network's input side, as untuned ones.
      spec = dataclasses.replace(spec, image_size=crop_size, eval_resize=_eval_resize(crop_size))
    if stats:
      spec = dataclasses.replace(spec, mean=tuple(stats['mean']), std=tuple(stats['std']))
    return Dataset(name, spec, get_builder(spec.tfds_name, data_dir, download))
  if name.startswith(folders.PREFIX):
    prepared = folders.prepare(name[len(folders.PREFIX):], data_dir, bad_images)
    builder = prepared.builder
    stats_file = prepared.stats_file
  else:
    builder = get_builder(name, data_dir, download)
    stats_file = None
  spec = _spec_from_info(builder, name, crop_size)
  stats = stats or _cached_stats(builder, spec, stats_file)
  spec = dataclasses.replace(spec, mean=tuple(stats['mean']), std=tuple(stats['std']))
  logging.info('Dataset %s: %s', name, spec)
  return Dataset(name, spec, builder)


def from_config(config) -> Dataset:
  """resolve() of a stage's config (dataset, data_dir, download, augment.crop_size, and the
  data_stats and bad_images it may hold)."""
  return resolve(config.dataset, data_dir=config.data_dir, download=config.download,
                 crop_size=config.augment.crop_size, stats=config.get('data_stats'),
                 bad_images=config.get('bad_images') or 'skip')


def encoder_stats(config) -> dict:
  """{'mean', 'std'} a (recorded) pretraining config standardised its images with: the tuned
  dataset's, or the data_stats its run recorded."""
  if config.get('data_stats'):
    return {'mean': list(config.data_stats.mean), 'std': list(config.data_stats.std)}
  if config.dataset in DATASETS:
    spec = DATASETS[config.dataset]
    return {'mean': list(spec.mean), 'std': list(spec.std)}
  raise ConfigError(f'config.dataset={config.dataset!r}: the config records no data_stats '
                    '(written by the stage that resolved it).')


def for_encoder(name: Optional[str], encoder_config) -> Dataset:
  """``name`` (None: the encoder's own dataset) resolved for the encoder a pretraining config
  describes (probe, fine-tuning, transfer).

  Where the data is, and how bad folder images are treated, come from
  ``encoder_config`` (with the evaluation stage's data_dir and download
  already applied). The images are standardised with the encoder's statistics,
  whatever the dataset: the network sees its inputs on the scale it was
  trained on, as the official evaluation standardises every dataset with
  ImageNet's. Variable-size images are cut at the encoder's crop size.

  Args:
    name: the dataset to evaluate on (an evaluation config's config.dataset), or None for
      the pretraining run's.
    encoder_config: the pretraining run's recorded config (models/pretrained.read_config).

  Raises:
    As resolve.
  """
  return resolve(name or encoder_config.dataset, data_dir=encoder_config.data_dir, download=encoder_config.download,
                 crop_size=encoder_config.augment.crop_size, stats=encoder_stats(encoder_config),
                 bad_images=encoder_config.get('bad_images') or 'skip')


def num_classes(config) -> int:
  """The class count of a (recorded) config's dataset: tuned, or from its data_stats.

  For building a recorded run's model without its data (checkpoint restore,
  convert, the notebook); a stage takes it from its resolved Dataset.
  """
  if config.dataset in DATASETS:
    return DATASETS[config.dataset].num_classes
  stats = config.get('data_stats')
  if not stats:
    raise ConfigError(f'config.dataset={config.dataset!r}: the config records no data_stats '
                      '(written by the stage that resolved it).')
  return int(stats['num_classes'])


def record_stats(config, dataset: Dataset) -> None:
  """Puts the computed channel statistics into ``config`` (data_stats), for config.json.

  Tuned datasets standardised with their own statistics have them in DATASETS;
  nothing is added (their runs' config.json are unchanged). The probe and the
  notebook read them back (from_config).
  """
  tuned = DATASETS.get(dataset.name)
  if tuned and (tuned.mean, tuned.std) == (dataset.spec.mean, dataset.spec.std):
    return
  with config.unlocked():
    config.data_stats = dataset.stats()


def get_builder(tfds_name: str, data_dir: Optional[str],
                download: bool) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; downloads only when allowed and missing.

  Raises:
    ConfigError: no TFDS dataset of that name (close matches named).
    DatasetNotFoundError: not prepared in ``data_dir`` and ``download`` is False.
    DatasetDownloadError: (a DatasetNotFoundError) not prepared, and the download
      host is unreachable or the download failed (data/download.py).
    DatasetCorruptError: its metadata is unreadable, or a file is missing or
      truncated (data/integrity.py).
  """
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(_unknown_name_message(tfds_name)) from None
  except Exception as e:  # pylint: disable=broad-except  # A garbled dataset_info.json: json, protobuf.
    raise integrity.unreadable_metadata(tfds_name, data_dir, e) from None
  if not builder.is_prepared():
    if not download:
      raise DatasetNotFoundError(
          f'Dataset {tfds_name!r} is not prepared in data_dir={builder.data_dir_root!r} '
          '(config.data_dir, or TFDS_DATA_DIR); set config.download=True to fetch it.')
    download_lib.prepare(builder, tfds_name)
  integrity.check_files(builder)  # A truncated or missing file: exit 2 before anything runs.
  return builder


def _subject(name: str, what: str) -> str:
  """How an error message names the dataset value: ``what``, else config.dataset=NAME."""
  return what or f'config.dataset={name!r}'


def _unknown_name_message(name: str, what: str = '') -> str:
  """``what``: how the message names the value (default: config.dataset=NAME)."""
  what = _subject(name, what)
  base = name.split(':')[0].split('/')[0]
  known = sorted(set(DATASETS) | set(tfds.list_builders()))
  close = difflib.get_close_matches(base, known, n=5)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  return (f'{what}: no such dataset. Use one of {sorted(DATASETS)}, any TFDS '
          f"name ('name', 'name/config', 'name:version'), or 'folder:/path/to/images'.{hint}")


def check_name(name: str, data_dir: Optional[str], what: str = '') -> None:
  """ConfigError unless ``name`` can be a dataset: a tuned name, an existing folder, or a TFDS
  dataset with an RGB 'image' and a 'label' ClassLabel (read from its code: no data needed).

  ``what`` names the value in the message (default: config.dataset=NAME).
  """
  what = _subject(name, what)
  if name in DATASETS:
    return
  if name.startswith(folders.PREFIX):
    root = os.path.expanduser(name[len(folders.PREFIX):])
    if not os.path.isdir(root):
      raise ConfigError(f'{what}: {root} is not a directory.')
    return
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(_unknown_name_message(name, what)) from None
  _image_and_label(builder, name, what)


def _image_and_label(builder, name: str, what: str = ''):
  """The 'image' and 'label' features; ConfigError unless an RGB Image and a ClassLabel."""
  what = _subject(name, what)
  features = builder.info.features
  image = features['image'] if 'image' in features else None
  label = None
  if 'label' in features and isinstance(features['label'], tfds.features.ClassLabel):
    label = features['label']
  if not isinstance(image, tfds.features.Image) or label is None:
    raise ConfigError(f'{what} has features {sorted(features.keys())}; '
                      "barlow_jax reads an 'image' Image and a 'label' ClassLabel feature.")
  height, width, channels = image.shape
  if channels != 3:
    raise ConfigError(f'{what} has {channels}-channel images; barlow_jax reads '
                      'RGB (prepare it as a folder: folder:/path converts every image to RGB).')
  return image, label


def _spec_from_info(builder, name: str, crop_size: int) -> DatasetSpec:
  """The spec of an untuned dataset from its builder's info (statistics left to fill in)."""
  image, label = _image_and_label(builder, name)
  height, width, _ = image.shape
  splits = builder.info.splits
  test_split = next((s for s in ('test', 'validation') if s in splits), next(iter(splits)))
  if height is not None and height == width:
    return DatasetSpec(builder.name, label.num_classes, height, (0.5,) * 3, (0.25,) * 3, test_split)
  if image.encoding_format not in (None, 'jpeg'):
    raise ConfigError(f'config.dataset={name!r} stores variable-size {image.encoding_format} '
                      'images; the host crops read JPEG (prepare it as a folder: '
                      'folder:/path re-encodes it).')
  return DatasetSpec(builder.name, label.num_classes, crop_size, (0.5,) * 3, (0.25,) * 3,
                     test_split, fixed_size=False, eval_resize=_eval_resize(crop_size))


def _eval_resize(crop_size: int) -> int:
  return int(round(crop_size * _EVAL_RESIZE_RATIO))


def _train_split(builder) -> str:
  splits = builder.info.splits
  return 'train' if 'train' in splits else next(iter(splits))


def _cached_stats(builder, spec: DatasetSpec, stats_file: Optional[str]) -> dict:
  """channel_stats of the training split, read from ``stats_file`` if written before."""
  if stats_file and os.path.exists(stats_file):
    return json.loads(epath.Path(stats_file).read_text())
  stats = channel_stats(builder, _train_split(builder), STATS_IMAGES)
  if stats_file:
    tmp = f'{stats_file}.tmp{os.getpid()}'
    epath.Path(tmp).write_text(json.dumps(stats))
    os.replace(tmp, stats_file)  # Atomic: several processes may write it.
  return stats


def channel_stats(builder, split: str, max_images: int) -> dict:
  """Per-channel mean and std (in [0, 1] units) over every pixel of the first images of ``split``.

  Returns:
    {'mean': [3 floats], 'std': [3 floats], 'num_images': int}.
  """
  ds = builder.as_dataset(split=split, shuffle_files=False).take(max_images)

  def sums(ex):
    x = tf.reshape(tf.cast(ex['image'], tf.float64) / 255.0, [-1, 3])
    return tf.reduce_sum(x, 0), tf.reduce_sum(tf.square(x), 0), tf.cast(tf.shape(x)[0], tf.float64)

  total, total_sq, count, images = np.zeros(3), np.zeros(3), 0.0, 0
  for s, sq, n in ds.map(sums, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
    total, total_sq, count, images = total + s, total_sq + sq, count + n, images + 1
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  logging.info('Channel statistics of %s %s from %d images: mean %s, std %s.', builder.name,
               split, images, mean, std)
  return {'mean': [round(float(v), 4) for v in mean], 'std': [round(float(v), 4) for v in std],
          'num_images': images}


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
    raise ConfigError(f'config.{key}={split!r} is not a split of {_where(builder)} (its splits: '
                      f'{_split_sizes(builder)}): {e}') from None
  if size == 0:
    raise ConfigError(f'config.{key}={split!r} of {_where(builder)} is empty (its splits: '
                      f'{_split_sizes(builder)}).')
  return size


def _where(builder) -> str:
  """The builder's name, or the folder a prepared folder copy came from."""
  root = folders.source_root(builder)
  return f'the folder {root}' if root else builder.name


def _split_sizes(builder) -> str:
  return ', '.join(f'{name!r} ({info.num_examples})' for name, info in builder.info.splits.items())


