"""benchmarks/step_profile.py: XLA's profile of a real jitted step, filed by what each op does."""

import collections
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from barlow_jax.models import conv as conv_lib
from conftest import REPO, conv_backends


def _load(name):
  # benchmarks/ is not an installed package: load the script by its path.
  spec = importlib.util.spec_from_file_location(f'benchmarks_{name}',
                                                REPO / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


step_profile = _load('step_profile')


def test_a_conv_net_step_is_filed_by_role_and_the_groups_add_up():
  dn = ('NHWC', 'HWIO', 'NHWC')

  def loss(params, x):
    h = jax.nn.relu(conv_lib.conv_general_dilated(x, params['w'], (1, 1), ((1, 1), (1, 1)),
                                                  dimension_numbers=dn, kernel_grad_chunk=4))
    return jnp.sum((h.reshape(h.shape[0], -1) @ params['v']) ** 2)

  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(3, 3, 8, 8)), jnp.float32) * 0.1,
            'v': jnp.asarray(rng.normal(size=(16 * 16 * 8, 32)), jnp.float32) * 0.01}
  x = jnp.asarray(rng.normal(size=(16, 16, 16, 8)), jnp.float32)
  step = jax.jit(jax.grad(loss))
  hlo_text = step.lower(params, x).compile().as_text()
  jax.block_until_ready(step(params, x))

  groups = step_profile.op_groups(hlo_text)
  entry = hlo_text[hlo_text.index('ENTRY'):]
  convs = collections.Counter(groups[name] for name in
                              re.findall(r'%([\w.\-]+) = \S+ convolution\(', entry))
  # One forward convolution; the kernel gradient of 16 examples in chunks of 4 (no input
  # gradient: x is not differentiated).
  assert convs == {'convolution, forward': 1, 'convolution, backward': 4}
  assert all(groups[name] == 'matmuls' for name in re.findall(r'%([\w.\-]+) = \S+ dot\(', entry))
  result = step_profile.profile(lambda: step(params, x), hlo_text, steps=3)
  ms = result['groups_ms']
  assert ms['convolution, forward'] > 0 and ms['convolution, backward'] > 0
  assert ms['matmuls'] > 0 and ms['collectives'] == 0
  # The kernel gradient's chunks read transposed activations (XLA:CPU's backprop filter).
  assert ms['layout transposes'] > 0
  assert abs(sum(ms.values()) - result['op_ms_per_step']) < 1e-6
  assert abs(sum(result['share'].values()) - 1) < 1e-9
  assert result['wall_ms_per_step'] > 0


def test_a_combined_all_reduce_on_eight_devices_is_filed_and_timed_as_a_collective():
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.NamedSharding(mesh, jax.P('data'))
  # psum of two arrays: XLA combines them into one all-reduce whose result is a tuple of shapes.
  step = jax.jit(jax.shard_map(lambda a, b: jax.lax.psum((a * 2, b * 3), 'data'), mesh=mesh,
                               in_specs=(jax.P('data'), jax.P('data')),
                               out_specs=(jax.P(), jax.P())))
  a = jax.device_put(jnp.ones((8, 4)), sharding)
  b = jax.device_put(jnp.ones((8, 6)), sharding)
  hlo_text = step.lower(a, b).compile().as_text()
  names = re.findall(r'%([\w.\-]+) = \([^)]*\) all-reduce\(', hlo_text)
  assert names, 'expected one tuple-shaped all-reduce in the program'
  groups = step_profile.op_groups(hlo_text)
  assert all(groups[name] == 'collectives' for name in names)
  jax.block_until_ready(step(a, b))
  result = step_profile.profile(lambda: step(a, b), hlo_text, steps=3)
  assert result['groups_ms']['collectives'] > 0


@pytest.mark.skipif('onednn' not in conv_backends(), reason='no oneDNN wheels installed')
def test_onednn_convolutions_are_filed_as_convolutions():
  dn = ('NHWC', 'HWIO', 'NHWC')

  def loss(w, x):
    y = conv_lib.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn, backend='onednn')
    return jnp.sum(jnp.sin(y))

  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 8)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(8, 16, 16, 8)), jnp.float32)
  # On one device (oneDNN runs in shard_map or where JAX has a single device).
  mesh = jax.sharding.Mesh(jax.devices()[:1], ('d',))
  step = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh, in_specs=P(),
                               out_specs=P()))
  hlo_text = step.lower(w, x).compile().as_text()
  groups = step_profile.op_groups(hlo_text)
  entry = hlo_text[hlo_text.index('ENTRY'):]
  calls = collections.Counter(
      (target, groups[name]) for name, target in re.findall(
          r'%([\w.\-]+) = \S+ custom-call\(.*custom_call_target="barlow_onednn_conv_(\w+)"', entry))
  assert calls == {('forward', 'convolution, forward'): 1,
                   ('backward_data', 'convolution, backward'): 1,
                   ('backward_weights', 'convolution, backward'): 1}, calls
  jax.block_until_ready(step(w, x))
  ms = step_profile.profile(lambda: step(w, x), hlo_text, steps=2)['groups_ms']
  assert ms['convolution, forward'] > 0 and ms['convolution, backward'] > 0
