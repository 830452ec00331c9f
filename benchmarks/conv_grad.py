r"""Forward, input-gradient and weight-gradient time of the 3x3 convolutions of a CIFAR ResNet.

  python -m benchmarks.conv_grad [--batch=256] [--width=8] [--tensorflow]

One line per stage shape (channels, spatial size) of a CIFAR ResNet-18 at
``--width``: the time of the convolution, of its gradient with respect to
the input (dx) and with respect to the kernel (dw: XLA's; dw chunks: summed
over chunks of models/conv.KERNEL_GRAD_CHUNK examples, what the encoders use
on CPU), each its own jitted program. On accelerators the three are of the same order; on XLA:CPU the
kernel gradient is what makes the backward pass several times the forward
(docs/performance.md). With --tensorflow, the same three through
TensorFlow's CPU kernels (oneDNN, as torch's), for the side-by-side.
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
flags.DEFINE_bool('tensorflow', False,
                  "Also time TensorFlow's CPU kernels of the same three (oneDNN, what torch "
                  'uses too; TensorFlow is installed with tensorflow-datasets).')
FLAGS = flags.FLAGS


def _ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def _tf_ms(x, w, repeats: int) -> list:
  """TensorFlow's forward, input-gradient and kernel-gradient times of the same convolution."""
  import tensorflow as tf  # Only for this comparison.
  x, w = tf.constant(np.asarray(x)), tf.constant(np.asarray(w))
  g = tf.ones_like(x)  # SAME, stride 1, as many output as input channels: the output's shape.
  ops = (lambda: tf.raw_ops.Conv2D(input=x, filter=w, strides=[1] * 4, padding='SAME'),
         lambda: tf.raw_ops.Conv2DBackpropInput(input_sizes=x.shape, filter=w, out_backprop=g,
                                                strides=[1] * 4, padding='SAME'),
         lambda: tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=w.shape, out_backprop=g,
                                                 strides=[1] * 4, padding='SAME'))
  # Eager TensorFlow ops on the CPU return when their result is computed.
  return [_ms(op, repeats=repeats) for op in ops]


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
          f'dw chunks {times[3]:7.2f}' + ('' if not FLAGS.tensorflow else
          '   tensorflow: forward {:7.2f}  dx {:7.2f}  dw {:7.2f}'.format(
              *_tf_ms(x, w, FLAGS.repeats))))


if __name__ == '__main__':
  app.run(main)
