"""models/conv.py: the chunked kernel gradient equals XLA's convolution gradients.

The reference is lax.conv_general_dilated and its own autodiff; inputs are
random, the loss nonlinear (sin), so every output position weighs the
gradient differently.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from barlow_jax.models import conv
from barlow_jax.runtime import mesh as mesh_lib

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _loss(conv_fn, x, w, strides, padding, **kwargs):
  return jnp.sum(jnp.sin(conv_fn(x, w, strides, padding, dimension_numbers=NHWC, **kwargs)))


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.mark.parametrize('batch,cin,cout,kernel,strides,padding,chunk', [
    (10, 3, 5, 3, (1, 1), 'SAME', 4),            # 10 = 4 + 4 + 2: a short last chunk.
    (8, 4, 6, 3, (2, 2), ((1, 1), (1, 1)), 3),  # explicit padding, as flax passes it.
    (7, 6, 2, 1, (2, 1), 'VALID', 2),           # 1x1 projection, unequal strides.
    (6, 2, 8, 3, (1, 1), [(0, 2), (1, 0)], 6),  # lists, asymmetric padding, one chunk.
])
def test_forward_and_gradients_equal_xla(batch, cin, cout, kernel, strides, padding, chunk):
  x, w = _random((batch, 9, 9, cin), 0), _random((kernel, kernel, cin, cout), 1)
  ours = functools.partial(conv.conv_general_dilated, kernel_grad_chunk=chunk)
  got = jax.jit(lambda x, w: ours(x, w, strides, padding, dimension_numbers=NHWC))(x, w)
  want = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(functools.partial(_loss, ours, strides=strides, padding=padding),
                           argnums=(0, 1)))(x, w)
  want_grads = jax.grad(functools.partial(_loss, lax.conv_general_dilated, strides=strides,
                                          padding=padding), argnums=(0, 1))(x, w)
  for g, r in zip(grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_gradients_inside_shard_map_on_eight_devices_equal_one_device():
  # The trainer's pattern: a device-varying copy of the kernel, its gradient psum'd once.
  mesh = mesh_lib.make_mesh()
  assert mesh.size == 8
  x, w = _random((32, 8, 8, 4), 2), _random((3, 3, 4, 4), 3)
  ours = functools.partial(conv.conv_general_dilated, kernel_grad_chunk=3)  # 4 per device: 3 + 1.

  def per_device(x, w):
    local_w = jax.lax.pcast(w, mesh_lib.DATA_AXIS, to='varying')
    gx, gw = jax.grad(functools.partial(_loss, ours, strides=(1, 1), padding='SAME'),
                      argnums=(0, 1))(x, local_w)
    return gx, jax.lax.psum(gw, mesh_lib.DATA_AXIS)

  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(mesh_lib.DATA_AXIS), P()),
                                  out_specs=(P(mesh_lib.DATA_AXIS), P()), check_vma=True))
  gx, gw = sharded(x, w)
  want = jax.grad(functools.partial(_loss, lax.conv_general_dilated, strides=(1, 1),
                                    padding='SAME'), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, want[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gw, want[1], rtol=1e-4, atol=1e-4)


def _jaxpr(**kwargs) -> str:
  fn = functools.partial(conv.conv_general_dilated, window_strides=(1, 1), padding='SAME',
                         dimension_numbers=NHWC, **kwargs)
  return str(jax.make_jaxpr(fn)(jnp.zeros((4, 5, 5, 2)), jnp.zeros((3, 3, 2, 2))))


def test_chunks_only_on_cpu_by_default():
  assert jax.default_backend() == 'cpu'
  assert 'custom_vjp' in _jaxpr()
  assert 'custom_vjp' not in _jaxpr(kernel_grad_chunk=0)
