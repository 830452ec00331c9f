r"""Forward, input-gradient and weight-gradient time of the 3x3 convolutions of a CIFAR ResNet.

  python -m benchmarks.conv_grad [--batch=256] [--width=8]

One line per stage shape (channels, spatial size) of a CIFAR ResNet-18 at
``--width``: the time of the convolution, of its gradient with respect to
the input (dx) and with respect to the kernel (dw: XLA's; dw chunks: summed
over chunks of models/conv.KERNEL_GRAD_CHUNK examples, what the encoders use
on CPU), each its own jitted program. On accelerators the three are of the same order; on XLA:CPU the
kernel gradient is what makes the backward pass several times the forward
(README, "Tests and benchmarks").
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from barlow_jax.models import conv as conv_lib

flags.DEFINE_integer('batch', 256, 'Images per call.')
flags.DEFINE_integer('width', 8, 'Channels of the first stage (64 is the standard ResNet).')
flags.DEFINE_integer('repeats', 10, 'Timed calls after one warm-up call.')
FLAGS = flags.FLAGS


def _ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def main(_):
  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  forward = jax.jit(conv)
  dx = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=0))
  dw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=1))
  spec = conv_lib.ConvSpec((1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  dw_chunks = jax.jit(lambda x, w: conv_lib.kernel_grad(
      spec, conv_lib.KERNEL_GRAD_CHUNK, x, w, jnp.ones_like(conv(x, w))))
  rng = np.random.default_rng(0)
  print(f'{jax.devices()[0].platform}, batch {FLAGS.batch}, times in ms')
  for stage in range(4):
    channels, size = FLAGS.width * 2**stage, 32 // 2**stage
    x = jnp.asarray(rng.random((FLAGS.batch, size, size, channels), np.float32))
    w = jnp.asarray(rng.random((3, 3, channels, channels), np.float32))
    times = [_ms(f, x, w, repeats=FLAGS.repeats) for f in (forward, dx, dw, dw_chunks)]
    print(f'{channels:4d} channels {size:2d}x{size:<2d}  forward {times[0]:7.2f}  '
          f'dx {times[1]:7.2f}  dw {times[2]:7.2f}  (dw / forward {times[2] / times[0]:.1f})  '
          f'dw chunks {times[3]:7.2f}')


if __name__ == '__main__':
  app.run(main)
