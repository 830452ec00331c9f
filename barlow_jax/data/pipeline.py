"""TFDS input: per-process split, balanced label fractions, resumable batches, padded eval batches.

The host reads, decodes and batches uint8 images; the views are made on the
device (data/augment.py), except for datasets of variable-size JPEGs
(ImageNet), whose random-resized crops the host cuts from the whole image, one
per view (data/host_crop.py), leaving the photometric ops to the device. The
training stream is a pure function of ``(seed, step)``, so a resumed run sees
the same data in the same order as an uninterrupted one (host crops included:
their randomness is stateless, seeded by ``(seed, step, example)``), and a
resume reads no record that steps ``0..s-1`` consumed (see train_dataset:
windows of the shard, read by file offset).
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
from barlow_jax.data import integrity
from barlow_jax.errors import ConfigError

# The train stream is Dataset.range(first_epoch, _MAX_EPOCHS); effectively endless.
_MAX_EPOCHS = 1 << 40


def _in_file_order(builder, split: str, add_tfds_id: bool = False) -> tf.data.Dataset:
  """The split's examples (images left encoded) in file order, one file at a time.

  TFDS otherwise interleaves 16 files; positions in this order are what the
  train windows (_shard_windows) and eval_batches' 'index' count.
  """
  return builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(add_tfds_id=add_tfds_id,
                                                        interleave_cycle_length=1))


def _scan_labels(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(tfds_id, label) of every example of the split in file order, images left undecoded."""
  ds = _in_file_order(builder, split, add_tfds_id=True)
  ds = ds.map(lambda ex: (ex['tfds_id'], ex['label'])).batch(65536)
  ids, labels = zip(*integrity.checked(ds.as_numpy_iterator(), builder, split))
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
  kept: Optional[np.ndarray]  # Positions in the shard kept by the balanced fraction; None: all.
  num_local: int  # Examples in this process's shard.
  num_global: int  # Examples over all processes.
  spec: datasets.DatasetSpec
  global_split: str = ''  # The split over all processes (config.train_split), for messages.
  fraction: float = 1.0  # The balanced fraction kept (config.fraction), for messages.


def load_train_data(dataset: datasets.Dataset, split: str, fraction: float = 1.0,
                    fraction_seed: int = 0) -> TrainData:
  """This process's share of ``split`` of a resolved dataset, and its balanced fraction.

  Args:
    dataset: from datasets.resolve.
    split: TFDS split expression (config.train_split).
    fraction: class-balanced fraction kept (config.fraction), in (0, 1].
    fraction_seed: which balanced subset (config.fraction_seed).
  """
  builder, spec = dataset.builder, dataset.spec
  datasets.split_size(builder, split, 'train_split')
  file_format = builder.info.file_format
  if file_format is not None and file_format.value != 'tfrecord':
    # The stream opens TFRecord files at offsets (train_dataset); ArrayRecord is not read.
    raise ConfigError(f'{dataset.name} in {builder.data_dir} is stored as '
                      f'{file_format.value}; barlow_jax reads TFRecord (prepare it with '
                      f"file_format='tfrecord').")
  local_split = tfds.split_for_jax_process(split)
  if fraction >= 1.0:
    return TrainData(builder, local_split, None, builder.info.splits[local_split].num_examples,
                     builder.info.splits[split].num_examples, spec, split, fraction)
  ids, labels = _scan_labels(builder, split)
  if (labels < 0).all():
    raise ConfigError(f'config.fraction={fraction} needs labels, but split '
                     f'{split!r} is unlabelled.')
  keep = ids[balanced_subset(labels, fraction, spec.num_classes, fraction_seed)]
  # One process reads the whole split: no second pass over it (~7 s for CIFAR-10 train).
  local_ids = ids if jax.process_count() == 1 else _scan_labels(builder, local_split)[0]
  kept = np.flatnonzero(np.isin(local_ids, keep))
  logging.info('Balanced fraction %.3f: %d of %d examples (%d on this process).',
               fraction, len(keep), len(ids), len(kept))
  return TrainData(builder, local_split, kept, len(kept), len(keep), spec, split, fraction)


def check_batch_fits(data: TrainData, batch_size: int) -> None:
  """ConfigError unless the training set holds a batch (on every process), before anything is written.

  Args:
    data: from load_train_data.
    batch_size: the global batch (config.batch_size).
  """
  local_batch = batch_size // jax.process_count()
  if data.num_local < local_batch:
    fraction = f' (config.fraction={data.fraction})' if data.fraction < 1.0 else ''
    per_process = (f', {data.num_local} on this process of {jax.process_count()}'
                   if jax.process_count() > 1 else '')
    raise ConfigError(f'config.train_split={data.global_split!r}{fraction} holds '
                      f'{data.num_global} training examples{per_process}, fewer than one batch '
                      f'of config.batch_size={batch_size}.')


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
  """The whole split's raw (undecoded) records, in order (eval: no subset)."""
  ds = _in_file_order(data.builder, data.split)
  return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


@dataclasses.dataclass(frozen=True)
class _Windows:
  """Window ``k`` of the shard = kept records ``[k*size, (k+1)*size)``, as file reads.

  Row ``r`` reads ``takes[r]`` records of ``files[r]`` after skipping
  ``skips[r]``; they are the shard's records from position ``starts[r]`` on.
  Window ``k`` is rows ``[first_row[k], first_row[k+1])``.
  """
  size: int
  count: int
  files: np.ndarray
  skips: np.ndarray
  takes: np.ndarray
  starts: np.ndarray
  first_row: np.ndarray


def _shard_windows(data: TrainData, size: int) -> _Windows:
  """Cuts the shard into windows of ``size`` kept records, each read from its files only."""
  kept = data.kept if data.kept is not None else np.arange(data.num_local)
  count = -(-len(kept) // size)
  bounds = [(kept[k * size], kept[min((k + 1) * size, len(kept)) - 1] + 1) for k in range(count)]
  rows, first_row = [], [0]
  instructions = data.builder.info.splits[data.split].file_instructions
  for lo, hi in bounds:
    position = 0
    for ins in instructions:  # The shard in order: a slice of each file.
      a, b = max(lo, position), min(hi, position + ins.take)
      if a < b:
        rows.append((ins.filename, ins.skip + a - position, b - a, a))
      position += ins.take
    first_row.append(len(rows))
  files, skips, takes, starts = zip(*rows)
  return _Windows(size, count, np.array(files), np.array(skips, np.int64),
                  np.array(takes, np.int64), np.array(starts, np.int64), np.array(first_row))


def _window_records(data: TrainData, windows: _Windows, k) -> tf.data.Dataset:
  """The raw records of window ``k`` (int or scalar tensor), in shard order."""
  table = {name: tf.constant(getattr(windows, name)) for name in ('files', 'skips', 'takes',
                                                                  'starts')}
  first_row = tf.constant(windows.first_row, tf.int64)

  def read(r):
    records = tf.data.TFRecordDataset(table['files'][r]).skip(table['skips'][r])
    positions = tf.data.Dataset.range(table['starts'][r], table['starts'][r] + table['takes'][r])
    return tf.data.Dataset.zip(positions, records.take(table['takes'][r]))

  ds = tf.data.Dataset.range(first_row[k], first_row[k + 1]).flat_map(read)
  if data.kept is not None:
    kept = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(data.kept, tf.int64), tf.ones(len(data.kept), tf.int32)), 0)
    ds = ds.filter(lambda position, _: kept.lookup(position) > 0)
  features = data.builder.info.features
  skip_image = {'image': tfds.decode.SkipDecoding()}

  def parse(_, serialized):
    ex = features.deserialize_example(serialized, decoders=skip_image)
    return {'image': ex['image'], 'label': ex['label']}

  return ds.map(parse)


def _window_order(seed: int, epoch, count: int) -> tf.Tensor:
  """The order epoch ``epoch`` (int64 scalar tensor) visits the windows in."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(count, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))


def _record_stream(data: TrainData, seed: int, start: int, shuffle_buffer: int,
                   cache: bool) -> tf.data.Dataset:
  """The endless stream of raw records from its record ``start`` on (see train_dataset)."""
  windows = _shard_windows(data, min(shuffle_buffer, data.num_local))
  # Encoded bytes: 150 MB for CIFAR; kept only when the shard is one window (not ImageNet).
  cached = _window_records(data, windows, 0).cache() if cache and windows.count == 1 else None
  first_epoch, offset = divmod(start, data.num_local)
  # The last window is short and may come anywhere in the epoch's order.
  sizes = np.minimum(windows.size, data.num_local - np.arange(windows.count) * windows.size)
  ends = np.cumsum(sizes[_window_order(seed, tf.constant(first_epoch, tf.int64),
                                       windows.count).numpy()])
  first_window = int(np.searchsorted(ends, offset, side='right'))
  first_skip = offset - (int(ends[first_window - 1]) if first_window else 0)

  def window(e, position, k):
    records = cached if cached is not None else _window_records(data, windows, k)
    size = tf.minimum(tf.constant(windows.size, tf.int64), data.num_local - k * windows.size)
    # A window that ends short fails (integrity.checked names the files) instead
    # of being read as it is: a damaged file raises once and leaves the cache
    # short (or empty: then the endless stream spun over empty epochs, forever).
    records = records.apply(tf.data.experimental.assert_cardinality(size))
    records = records.shuffle(size, seed=seed + e * windows.count + position,
                              reshuffle_each_iteration=False)
    resumed = tf.logical_and(e == first_epoch, position == first_window)
    return records.skip(tf.where(resumed, tf.constant(first_skip, tf.int64), 0))

  def epoch(e):
    order = _window_order(seed, e, windows.count)
    start = tf.where(e == first_epoch, tf.constant(first_window, tf.int64), 0)
    positions = tf.data.Dataset.range(start, windows.count)
    return positions.flat_map(lambda position: window(e, position, order[position]))

  return tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch)


def train_dataset(data: TrainData, local_batch: int, seed: int, start_step: int = 0,
                  shuffle_buffer: int = 50_000, cache: bool = True,
                  crops: Optional[host_crop.HostCrops] = None) -> tf.data.Dataset:
  """Endless batches of {'image': uint8, 'label': int32 [b]} from ``start_step``.

  Batch ``s`` holds records ``[s*b, (s+1)*b)`` of the concatenation of
  per-epoch orders, so it depends only on (seed, s): resuming is exact. Epoch
  ``e`` cuts the shard into windows of ``shuffle_buffer`` records, visits them
  in an order drawn from (seed, e) and shuffles each one whole. Why windows:
  a resume at position ``p`` of the epoch opens window ``p // shuffle_buffer``
  at its files' offsets (TFDS shard lengths), so it reads one window, as a
  fresh start fills one shuffle buffer, and not the ``p`` records before it
  (skipping them was minutes of I/O on ImageNet; benchmarks/resume_cost.py).
  Random access (Grain on ArrayRecord) would need the data re-written; tf.data
  iterator checkpoints hold the whole shuffle buffer.
  'image' is [b, H, W, 3] as stored (the device crops), or, for variable-size
  JPEGs, [b, V, S, S, 3]: ``crops`` (required then) gives the V views' crop
  parameters and the side S (train_image_shape).
  """
  if not data.spec.fixed_size and crops is None:
    raise ValueError(f'{data.spec.tfds_name} is cropped on the host: train_dataset needs crops.')
  if data.num_local < local_batch:
    raise ConfigError(f'This process has {data.num_local} training examples, fewer than its '
                     f'batch of {local_batch} (config.batch_size / process count).')
  ds = _record_stream(data, seed, start_step * local_batch, shuffle_buffer, cache)
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
  for batch in integrity.checked(ds.batch(local_batch).prefetch(2).as_numpy_iterator(), builder,
                                 split):
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


def global_batches(data: TrainData, batch_size: int, seed: int, start_step: int, cache: bool,
                   crops, sharding) -> Iterator[dict]:
  """The training batches of steps ``start_step``, ... as global arrays with ``sharding``.

  Each process reads its share (``batch_size // process_count`` examples a
  step, train_dataset); a damaged file ends the run naming it (integrity.checked).
  """
  stream = train_dataset(data, batch_size // jax.process_count(), seed, start_step, cache=cache,
                         crops=crops)
  return prefetch_to_mesh(integrity.checked(stream.as_numpy_iterator(), data.builder, data.split),
                          sharding)
