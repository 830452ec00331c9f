r"""barlow_jax's own train step (trainer.make_train_step), as a worker of compare_torch.py.

The step the pretraining stage runs: on-device augmentation of two views of
uint8 images, two forward/backward passes, the Barlow Twins loss (and the
online probe), one gradient all-reduce, the optimiser update; on a mesh of
``--devices`` CPU devices.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from barlow_jax import optim
from barlow_jax.data import datasets
from barlow_jax.models import conv
from barlow_jax.models import factory
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.stages import pretrain
from barlow_jax import trainer
from benchmarks import bench_worker

config_flags.DEFINE_config_file('config', 'configs/cifar_bt_cpu.py', 'Config file.',
                                lock_config=True)
flags.DEFINE_integer('devices', 1, 'CPU devices of the mesh (they share the cores).')
flags.DEFINE_integer('kernel_grad_chunk', conv.KERNEL_GRAD_CHUNK,
                     "Batch chunk of the convolutions' kernel gradient; 0: XLA's own.")
FLAGS = flags.FLAGS


def make_run_steps(config):
  mesh = mesh_lib.make_mesh()
  model = factory.create_model(config, axis_name=mesh_lib.DATA_AXIS)
  tx, schedule = optim.create_optimizer(config, 100, 1000)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, config.augment.crop_size)
  step = trainer.make_train_step(config, pretrain.make_loss_fn(model, config.lambd), tx, mesh,
                                 schedule, num_views=2)
  n, size = config.batch_size, datasets.dataset_spec(config.dataset).image_size
  rng = np.random.default_rng(0)
  batch = jax.device_put(
      {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
       'label': rng.integers(0, 10, n).astype(np.int32)}, mesh_lib.batch_sharded(mesh))
  holder = {'state': state}

  def run_steps(steps: int) -> None:
    for _ in range(steps):
      holder['state'], metrics = step(holder['state'], batch)
    jax.block_until_ready(metrics)

  return run_steps


def main(_):
  jax.config.update('jax_num_cpu_devices', FLAGS.devices)
  conv.KERNEL_GRAD_CHUNK = FLAGS.kernel_grad_chunk
  bench_worker.serve(make_run_steps(FLAGS.config))


if __name__ == '__main__':
  app.run(main)
