r"""Host images/s per CPU core of ImageNet's input: JPEG decode, crop and resize.

  python -m benchmarks.host_jpeg [--num_images=256] [--seconds=10]

Synthesises JPEGs with ImageNet's size distribution (nothing is downloaded):
train images average ~400 x 350; half are 500 x 375 or 375 x 500, the rest
spread over 250-600 px long sides and aspects 3:4-16:9, encoded at quality 90 with
4:2:0 chroma, textured so the files have ~ImageNet's bytes per pixel. Each path
runs in a tf.data pipeline limited to one thread and is timed in CPU seconds
of the process, so the figure is per core, even on a shared machine:

- train: two views per image, each box sampled from the header and only it
  decoded (decode_and_crop_jpeg), bicubic resize to 224 (data/host_crop.py);
- eval: full decode, Resize(256), CenterCrop(224);
- before: the pipeline before issue 10 (full decode, shorter side to 256,
  centre 256 x 256), for the ratio.

Cores needed for an accelerator = its images/s / (train images/s per core).
"""

import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from barlow_jax.data import augment
from barlow_jax.data import host_crop

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_images', 256, 'Distinct synthetic JPEGs (cycled).')
flags.DEFINE_float('seconds', 10.0, 'Wall time per path.')


def imagenet_like_sizes(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """(height, width): 35% 375 x 500, 15% 500 x 375, the rest a spread of sides and aspects
  (70% landscape)."""
  sizes = []
  for _ in range(n):
    u = rng.uniform()
    if u < 0.35:
      sizes.append((375, 500))
    elif u < 0.5:
      sizes.append((500, 375))
    else:
      long = int(rng.uniform(250, 600))
      short = int(long / rng.uniform(4 / 3, 16 / 9)) if rng.uniform() < 0.5 else int(long * 0.75)
      sizes.append((short, long) if rng.uniform() < 0.7 else (long, short))
  return sizes


def synthetic_jpeg(height: int, width: int, rng: np.random.Generator) -> bytes:
  """A textured photo-like image (smooth shapes plus fine detail) as a quality-90 JPEG."""
  coarse = rng.uniform(0, 255, (height // 32 + 2, width // 32 + 2, 3))
  image = tf.image.resize(coarse, [height, width], method='bicubic')
  image += rng.normal(0, 30, (height, width, 3))  # Fine texture: ~ImageNet's file sizes.
  return tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90).numpy()


def _before(jpeg):
  image = tf.io.decode_jpeg(jpeg, channels=3)
  image = tf.image.resize(image, [256, 256], preserve_aspect_ratio=True, method='bicubic',
                          antialias=True)
  return tf.image.resize_with_crop_or_pad(image, 256, 256)


def images_per_cpu_second(jpegs: list[bytes], fn, seconds: float) -> float:
  """Images per CPU-second of ``fn(index, jpeg)`` in a one-thread tf.data pipeline.

  CPU time of the process (all its threads), not wall time: on a shared
  machine the figure stays that of one busy core.
  """
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate().map(fn)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  it = iter(ds.with_options(options).prefetch(1))
  for _ in range(16):  # Warm-up.
    next(it)
  count, t0, cpu0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    next(it)
    count += 1
  return count / (time.process_time() - cpu0)


def main(_):
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  rng = np.random.default_rng(0)
  sizes = imagenet_like_sizes(FLAGS.num_images, rng)
  jpegs = [synthetic_jpeg(h, w, rng) for h, w in sizes]
  h, w = np.mean(sizes, axis=0)
  kilobytes = np.mean([len(j) for j in jpegs]) / 1e3
  print(f'{len(jpegs)} JPEGs, mean {h:.0f} high x {w:.0f} wide, mean {kilobytes:.0f} kB '
        f'({8 * sum(map(len, jpegs)) / sum(a * b for a, b in sizes):.2f} bits/px)')
  crops = host_crop.HostCrops(224, (augment.ViewAugment(), augment.ViewAugment()))
  paths = {
      'train (2 crops: decode_and_crop + bicubic 224)':
          lambda i, j: host_crop.train_views(j, host_crop.example_seed(0, 0, i, 0), crops),
      'eval (decode, Resize 256, CenterCrop 224)':
          lambda i, j: host_crop.eval_centre_crop(j, 256, 224),
      'before issue 10 (decode, resize + centre 256)': lambda i, j: _before(j),
  }
  for name, fn in paths.items():
    rate = images_per_cpu_second(jpegs, fn, FLAGS.seconds)
    print(f'{name:48s} {rate:8.1f} images per CPU-second')


if __name__ == '__main__':
  app.run(main)
