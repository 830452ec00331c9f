r"""Start-to-first-batch time of the training stream: resumed at the end of an epoch vs fresh.

  python -m benchmarks.resume_cost                     # 200k records, built once in --data_dir

Builds (once) a synthetic TFDS dataset of --records 32x32 images in --shards
TFRecord files with TFDS's own writer, then times train_dataset(start_step=0)
and train_dataset(start_step=last step of the epoch) up to their first batch,
with the defaults a large dataset runs with (shuffle buffer 50k, no cache).
Prints one JSON line: both times and their ratio (goal: <= 2).
"""

import json
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from barlow_jax.data import datasets
from barlow_jax.data import pipeline

flags.DEFINE_integer('records', 200_000, 'Training records of the synthetic dataset.')
flags.DEFINE_integer('shards', 64, 'TFRecord files it is written to.')
flags.DEFINE_integer('batch', 256, 'Local batch size.')
flags.DEFINE_string('data_dir', '/tmp/barlow_jax_resume_cost', 'Where the dataset is built once.')
FLAGS = flags.FLAGS


class ResumeCostSynthetic(tfds.core.GeneratorBasedBuilder):
  """32x32 images whose pixels are their index; cheap to write."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(32, 32, 3)),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(FLAGS.records)}

  def _generate_examples(self, n):
    for i in range(n):
      image = np.full((32, 32, 3), [i % 256, (i // 256) % 256, i // 65536], np.uint8)
      yield i, {'image': image, 'label': i % 10}


def _first_batch_seconds(data, start_step: int) -> float:
  t0 = time.perf_counter()
  next(pipeline.train_dataset(data, FLAGS.batch, seed=0, start_step=start_step,
                              cache=False).as_numpy_iterator())
  return time.perf_counter() - t0


def main(_):
  builder = ResumeCostSynthetic(data_dir=FLAGS.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      num_shards=FLAGS.shards, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  spec = datasets.DatasetSpec('resume_cost_synthetic', 10, 32, (0.5,) * 3, (0.25,) * 3)
  n = builder.info.splits['train'].num_examples
  data = pipeline.TrainData(builder, 'train', None, n, n, spec)
  last_step = n // FLAGS.batch - 1
  _first_batch_seconds(data, 0)  # Warm the page cache and TF's one-time set-up.
  fresh = _first_batch_seconds(data, 0)
  resumed = _first_batch_seconds(data, last_step)
  print(json.dumps({'records': n, 'resume_step': last_step, 'fresh_s': round(fresh, 3),
                    'resumed_s': round(resumed, 3), 'ratio': round(resumed / fresh, 2)}))


if __name__ == '__main__':
  app.run(main)
