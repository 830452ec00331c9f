"""TFDS input: per-process split, balanced label fractions, resumable batches, padded eval batches.

The host reads, decodes and batches uint8 images; the views are made on the
device (data/augment.py), except for datasets of variable-size JPEGs
(ImageNet), whose random-resized crops the host cuts from the whole image, one
per view (data/host_crop.py), leaving the photometric ops to the device. The
training stream is a pure function of ``(seed, step)``: epoch ``e`` is the
process's shard shuffled with seed ``seed + e``, and a run resumed at step
``s`` skips exactly the records that steps ``0..s-1`` consumed, so a resumed
run sees the same data in the same order as an uninterrupted one (host crops
included: their randomness is stateless, seeded by ``(seed, step, example)``).
"""

import dataclasses
from typing import Iterator, Optional

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.errors import ConfigError

# The train stream is Dataset.range(first_epoch, _MAX_EPOCHS); effectively endless.
_MAX_EPOCHS = 1 << 40


def _scan_labels(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(tfds_id, label) of every example of the split, images left undecoded."""
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  ds = ds.map(lambda ex: (ex['tfds_id'], ex['label'])).batch(65536)
  ids, labels = zip(*ds.as_numpy_iterator())
  return np.concatenate(ids), np.concatenate(labels).astype(np.int64)


def balanced_subset(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
  """Indices of a class-balanced subset: the same count for every class.

  Each class contributes ``floor(fraction * len(labels) / num_classes)``
  examples, drawn without replacement by ``seed``; e.g. 10% of CIFAR-10 train
  is 500 per class (Ghosh, Ghosh & Das (2022) take 10% of all 60k images, 600 per class).

  Returns:
    Sorted indices into ``labels``.
  """
  per_class = int(fraction * len(labels) / num_classes)
  counts = np.bincount(labels[labels >= 0], minlength=num_classes)
  if per_class < 1 or per_class > counts.min():
    raise ConfigError(f'config.fraction={fraction} asks for {per_class} examples per class; '
                     f'the split has between {counts.min()} and {counts.max()} per class.')
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for c in range(num_classes)]
  return np.sort(np.concatenate(chosen))


@dataclasses.dataclass(frozen=True)
class TrainData:
  """This process's shard of the training set."""
  builder: tfds.core.DatasetBuilder
  split: str  # This process's TFDS split expression.
  subset_ids: Optional[np.ndarray]  # tfds_ids kept by the balanced fraction; None: all.
  num_local: int  # Examples in this process's shard.
  num_global: int  # Examples over all processes.
  spec: datasets.DatasetSpec


def load_train_data(config) -> TrainData:
  """Resolves the dataset, the per-process split and the balanced fraction."""
  spec = datasets.dataset_spec(config.dataset)
  builder = datasets.get_builder(config.dataset, config.data_dir, config.download)
  datasets.split_size(builder, config.train_split, 'train_split')
  local_split = tfds.split_for_jax_process(config.train_split)
  if config.fraction >= 1.0:
    return TrainData(builder, local_split, None, builder.info.splits[local_split].num_examples,
                     builder.info.splits[config.train_split].num_examples, spec)
  ids, labels = _scan_labels(builder, config.train_split)
  if (labels < 0).all():
    raise ConfigError(f'config.fraction={config.fraction} needs labels, but split '
                     f'{config.train_split!r} is unlabelled.')
  keep = ids[balanced_subset(labels, config.fraction, spec.num_classes, config.fraction_seed)]
  # One process reads the whole split: no second pass over it (~7 s for CIFAR-10 train).
  local_ids = ids if jax.process_count() == 1 else _scan_labels(builder, local_split)[0]
  num_local = int(np.isin(local_ids, keep).sum())
  logging.info('Balanced fraction %.3f: %d of %d examples (%d on this process).',
               config.fraction, len(keep), len(ids), num_local)
  return TrainData(builder, local_split, keep, num_local, len(keep), spec)


def check_batch_fits(data: TrainData, config) -> None:
  """ConfigError unless the training set holds a batch (on every process), before anything is written.

  Args:
    data: from load_train_data(config).
    config: train_split, fraction, batch_size.
  """
  local_batch = config.batch_size // jax.process_count()
  if data.num_local < local_batch:
    fraction = f' (config.fraction={config.fraction})' if config.fraction < 1.0 else ''
    per_process = (f', {data.num_local} on this process of {jax.process_count()}'
                   if jax.process_count() > 1 else '')
    raise ConfigError(f'config.train_split={config.train_split!r}{fraction} holds '
                      f'{data.num_global} training examples{per_process}, fewer than one batch '
                      f'of config.batch_size={config.batch_size}.')


def _decode_fn(data: TrainData):
  """Record -> {'image': uint8 [S, S, 3], 'label'}: as stored, or (variable-size JPEGs)
  the official evaluation's resize and centre crop."""
  image_feature = data.builder.info.features['image']
  spec = data.spec

  def decode(ex):
    if spec.fixed_size:
      image = image_feature.decode_example(ex['image'])
    else:
      image = host_crop.eval_centre_crop(ex['image'], spec.eval_resize, spec.image_size)
    return {'image': image, 'label': tf.cast(ex['label'], tf.int32)}

  return decode


def _host_crop_fn(crops: host_crop.HostCrops, local_batch: int, seed: int):
  """(record number in the stream, record) -> {'image': uint8 [V, S, S, 3], 'label'}:
  one crop per view, seeded by (seed, process, step, example in the batch)."""
  process = jax.process_index()

  def crop(number, ex):
    key = host_crop.example_seed(seed, process, number // local_batch, number % local_batch)
    return {'image': host_crop.train_views(ex['image'], key, crops),
            'label': tf.cast(ex['label'], tf.int32)}

  return crop


def train_image_shape(spec: datasets.DatasetSpec, crops: host_crop.HostCrops) -> tuple[int, ...]:
  """Shape of one example's 'image' in train_dataset: [H, W, 3], or [V, S, S, 3] cut on the host."""
  if spec.fixed_size:
    return (spec.image_size, spec.image_size, 3)
  return (len(crops.views), crops.size, crops.size, 3)


def _records(data: TrainData) -> tf.data.Dataset:
  """The shard's raw (undecoded) records, filtered to the balanced subset."""
  ds = data.builder.as_dataset(
      split=data.split, shuffle_files=False,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=data.subset_ids is not None))
  if data.subset_ids is not None:
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(data.subset_ids),
                                            tf.ones(len(data.subset_ids), tf.int32)), 0)
    ds = ds.filter(lambda ex: table.lookup(ex['tfds_id']) > 0)
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def train_dataset(data: TrainData, local_batch: int, seed: int, start_step: int = 0,
                  shuffle_buffer: int = 50_000, cache: bool = True,
                  crops: Optional[host_crop.HostCrops] = None) -> tf.data.Dataset:
  """Endless batches of {'image': uint8, 'label': int32 [b]} from ``start_step``.

  Batch ``s`` holds records ``[s*b, (s+1)*b)`` of the concatenation of
  per-epoch shuffles, so it depends only on (seed, s): resuming is exact.
  'image' is [b, H, W, 3] as stored (the device crops), or, for variable-size
  JPEGs, [b, V, S, S, 3]: ``crops`` (required then) gives the V views' crop
  parameters and the side S (train_image_shape).
  """
  if not data.spec.fixed_size and crops is None:
    raise ValueError(f'{data.spec.tfds_name} is cropped on the host: train_dataset needs crops.')
  if data.num_local < local_batch:
    raise ConfigError(f'This process has {data.num_local} training examples, fewer than its '
                     f'batch of {local_batch} (config.batch_size / process count).')
  records = _records(data)
  if cache:  # Encoded bytes: 150 MB for CIFAR; turn off for ImageNet-sized data.
    records = records.cache()
  first_epoch, offset = divmod(start_step * local_batch, data.num_local)
  buffer = min(shuffle_buffer, data.num_local)

  def epoch(e):
    skip = tf.where(e == first_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64))
    return records.shuffle(buffer, seed=seed + e, reshuffle_each_iteration=False).skip(skip)

  ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch)
  if data.spec.fixed_size:
    ds = ds.map(_decode_fn(data), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    ds = ds.enumerate(start_step * local_batch).map(
        _host_crop_fn(crops, local_batch, seed), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
  return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_batches(builder, spec: datasets.DatasetSpec, split: str, local_batch: int,
                 num_batches: Optional[int] = None) -> Iterator[dict]:
  """One pass over this process's share of ``split``, every example exactly once.

  The last batch is zero-padded to ``local_batch`` and every batch carries a
  boolean 'mask' marking real examples, so metrics can sum over the mask and
  divide once (nothing is dropped, whatever the batch size). With
  ``num_batches``, fully masked batches are appended up to that count, so that
  every process runs the same number of (collective) steps. 'index' is each
  example's position in ``split`` over all processes (each process reads a
  contiguous part): gathered batches interleave the processes, and sorting by
  it restores the split's order whatever the process count.
  """
  data = TrainData(builder, tfds.split_for_jax_process(split), None, 0, 0, spec)
  shares = tfds.even_splits(split, jax.process_count())
  offset = sum(builder.info.splits[s].num_examples for s in shares[:jax.process_index()])
  ds = _records(data).map(_decode_fn(data), num_parallel_calls=tf.data.AUTOTUNE)
  count, seen = 0, offset
  for batch in ds.batch(local_batch).prefetch(2).as_numpy_iterator():
    batch['index'] = np.arange(seen, seen + len(batch['label']), dtype=np.int32)
    seen += len(batch['label'])
    yield _pad_batch(batch, local_batch)
    count += 1
  empty = {'image': np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8),
           'label': np.zeros((0,), np.int32), 'index': np.zeros((0,), np.int32)}
  for _ in range(count, num_batches or 0):
    yield _pad_batch(empty, local_batch)


def _pad_batch(batch: dict, size: int) -> dict:
  n = len(batch['label'])
  out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
         for k, v in batch.items()}
  out['mask'] = np.arange(size) < n
  return out


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Per-process numpy batch -> one global jax.Array per key, sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def prefetch_to_mesh(iterator, sharding, size: int = 2) -> Iterator[dict]:
  """Keeps ``size`` batches in flight to the devices (device_put is asynchronous)."""
  queue = []
  for batch in iterator:
    queue.append(to_global(batch, sharding))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
