r"""Images/s of the Barlow Twins train step, and of its parts, on the local devices.

  python -m benchmarks.step_speed --config=configs/cifar_bt_cpu.py
  python -m benchmarks.step_speed --config=configs/cifar_bt_cpu.py \
      --config.model.width=64 --config.model.projector=2048-2048-2048   # docs/performance.md's ResNet-18 reference

Prints one line per measurement: the full step (augment + 2 forward/backward +
loss + update), augmentation alone, and the encoder forward pass alone. Random
uint8 images, so the input pipeline is not measured (see --input for that).
"""

import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from barlow_jax.data import datasets
from barlow_jax.data import augment
from barlow_jax.data import pipeline
from barlow_jax.models import factory
from barlow_jax import compiled_cost
from benchmarks import pretraining_step

config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_integer('steps', 5, 'Timed steps after one warm-up step.')
flags.DEFINE_bool('input', False, 'Also time the TFDS input pipeline on config.data_dir.')
FLAGS = flags.FLAGS


def _time(fn, steps):
  jax.block_until_ready(fn())  # Compile and warm up.
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def main(_):
  config = FLAGS.config
  n = config.batch_size
  full_step = pretraining_step.LiveStep(config)
  batch, crops = full_step.batch, full_step.crops

  view = augment.view_from_config(config.augment.view1)
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  aug = jax.jit(lambda k, x: augment.augment_batch(k, *augment.device_view(x, 0, view),
                                                    config.augment.crop_size))
  x = aug(keys, batch['image'])
  single = factory.create_model(config, datasets.num_classes(config))
  fwd = jax.jit(lambda v, x: single.apply(v, x, train=False)['embeddings'])

  def forward():  # Reads the live state: the train step donates the old one.
    s = full_step.state
    return fwd({'params': s.params, 'batch_stats': s.batch_stats}, x)

  # What the compiled step moves between devices per step (0 on one device).
  moved = compiled_cost.collectives(full_step.compiled_text())
  num_params = sum(x.size for x in jax.tree.leaves(full_step.state.params))
  print('communication per step: ' + ', '.join(
      f"{k} {v['ops']} ops {v['bytes'] / 2**20:.2f} MiB" for k, v in moved.items() if v['ops'])
        + f"; all-reduced floats / parameters = {moved['all-reduce']['elements'] / num_params:.3f}")

  desc = (f"{config.model.encoder} width {config.model.width}, projector {config.model.projector}, "
          f"batch {n}, {jax.device_count()} {jax.devices()[0].platform} device(s)")
  for name, fn in (('train step', full_step), ('augment (1 view)', lambda: aug(keys, batch['image'])),
                          ('encoder+projector forward (1 view)', forward)):
    seconds = _time(fn, FLAGS.steps)
    print(f'{name:38s} {seconds * 1e3:9.1f} ms   {n / seconds:8.1f} img/s   [{desc}]')

  if FLAGS.input:
    data = pipeline.load_train_data(datasets.from_config(config), config.train_split,
                                    config.fraction, config.fraction_seed)
    it = pipeline.train_dataset(data, n, 0, crops=crops).as_numpy_iterator()
    seconds = _time(lambda: next(it)['image'], 20)
    print(f"{'input pipeline (host)':38s} {seconds * 1e3:9.1f} ms   {n / seconds:8.1f} img/s")


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
