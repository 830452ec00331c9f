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

from barlow_jax.models import conv
from benchmarks import bench_worker
from benchmarks import pretraining_step

config_flags.DEFINE_config_file('config', 'configs/cifar_bt_cpu.py', 'Config file.',
                                lock_config=True)
flags.DEFINE_integer('devices', 1, 'CPU devices of the mesh (they share the cores).')
flags.DEFINE_integer('kernel_grad_chunk', conv.KERNEL_GRAD_CHUNK,
                     "Batch chunk of the convolutions' kernel gradient; 0: XLA's own.")
FLAGS = flags.FLAGS


def make_run_steps(config):
  live_step = pretraining_step.LiveStep(config)

  def run_steps(steps: int) -> None:
    for _ in range(steps):
      metrics = live_step()
    jax.block_until_ready(metrics)

  return run_steps


def main(_):
  jax.config.update('jax_num_cpu_devices', FLAGS.devices)
  conv.KERNEL_GRAD_CHUNK = FLAGS.kernel_grad_chunk
  bench_worker.serve(make_run_steps(FLAGS.config))


if __name__ == '__main__':
  app.run(main)
