"""oneDNN's convolutions (config.model.conv='onednn') compute what XLA's compute.

The reference is lax.conv_general_dilated and its own autodiff, on random
inputs; gradients are taken against a random output gradient, so every output
position weighs them differently. (A loss like sum(sin(conv)) would amplify
the float32 rounding of outputs of magnitude ~100 at 512 channels into the
gradient: a test of the loss, not of the kernels.) The tests of the oneDNN
path are skipped only where its wheels are not installed (no [onednn] extra,
or a platform without them); with the wheels installed a failed build fails
them.
"""

import functools
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from barlow_jax.kernels import onednn
from barlow_jax.models import conv
from barlow_jax.models import encoders
from barlow_jax.models import factory
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.stages import pretrain
from conftest import conv_backends, needs_cifar10, pretraining_workdir, tiny_config

NHWC = ('NHWC', 'HWIO', 'NHWC')
_REASON = conv.onednn_unavailable_reason()
needs_onednn = pytest.mark.skipif('onednn' not in conv_backends(),
                                  reason=f'oneDNN wheels not installed: {_REASON}')
CUSTOM_CALL = 'barlow_onednn_conv_'


def _random(shape, seed, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _grads(conv_fn, x, w, out_grad, strides, padding):
  """(d/dx, d/dw) of sum(conv(x, w) * out_grad)."""
  _, vjp = jax.vjp(lambda x, w: conv_fn(x, w, strides, padding, dimension_numbers=NHWC), x, w)
  return vjp(out_grad)


_onednn_conv = functools.partial(conv.conv_general_dilated, backend='onednn')


def _one_device_jit(fn):
  """``jit(fn)`` on one device of the 8 (inputs and outputs whole).

  oneDNN runs inside shard_map or where JAX has one device: plain jit over the
  tests' 8 devices keeps XLA's convolution (models/conv._partitioned_by_hand).
  """
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P()))


def _assert_close(got, want, rtol):
  """Equal to ``rtol`` of the reference's largest magnitude (sums of up to 4608 products)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(1.0, np.abs(want).max()))


@needs_onednn
@pytest.mark.parametrize('batch,side,cin,cout,kernel,strides,padding', [
    (4, 9, 3, 8, 3, (1, 1), 'SAME'),               # CIFAR stem: 3 input channels.
    (4, 8, 8, 16, 3, (2, 2), ((1, 1), (1, 1))),    # A ResNet stage's first conv, as flax pads it.
    (4, 8, 16, 32, 1, (2, 2), 'VALID'),            # The projection of a residual.
    (4, 8, 4, 8, 1, (2, 2), ((0, 1), (1, 0))),     # Fewer channels than oneDNN's block, padded.
    (2, 15, 3, 8, 7, (2, 2), ((3, 3), (3, 3))),    # ImageNet stem, odd side.
    (2, 9, 5, 6, 3, (2, 1), [(0, 2), (1, 0)]),     # Unequal strides, asymmetric lists.
    (2, 8, 64, 64, 1, (1, 1), 'SAME'),             # Bottleneck 1x1.
    (2, 4, 256, 512, 3, (2, 2), ((1, 1), (1, 1))),  # Wide channels, small images.
    (2, 2, 512, 512, 3, (1, 1), ((1, 1), (1, 1))),
])
def test_forward_and_gradients_equal_xla(batch, side, cin, cout, kernel, strides, padding):
  x, w = _random((batch, side, side, cin), 0), _random((kernel, kernel, cin, cout), 1)
  forward = _one_device_jit(
      lambda x, w: _onednn_conv(x, w, strides, padding, dimension_numbers=NHWC))
  assert CUSTOM_CALL + 'forward' in forward.lower(x, w).as_text()  # oneDNN really ran.
  _assert_close(forward(x, w), lax.conv_general_dilated(x, w, strides, padding,
                                                        dimension_numbers=NHWC), 1e-5)
  out_grad = _random(forward(x, w).shape, 2)
  got = _one_device_jit(functools.partial(_grads, _onednn_conv, strides=strides, padding=padding))(
      x, w, out_grad)
  want = _grads(lax.conv_general_dilated, x, w, out_grad, strides, padding)
  for g, r in zip(got, want):
    _assert_close(g, r, 1e-5)


# Run in a subprocess with one device and 2 OpenMP threads per call, where
# oneDNN 3.2's own strided 1x1 path spins for ever (kernels/onednn._subsampled).
_SHORTCUT_GRADIENTS = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from barlow_jax.kernels import onednn
onednn.load()
rng = np.random.default_rng(0)
# ResNet CIFAR width 4's first projection shortcut: ReLU'd activations, 4 -> 8 channels, stride 2.
x = jnp.asarray(np.maximum(rng.standard_normal((16, 32, 32, 4)), 0), jnp.float32)
w = jnp.asarray(rng.standard_normal((1, 1, 4, 8)), jnp.float32)
dy = jnp.asarray(rng.standard_normal((16, 16, 16, 8)), jnp.float32)
def grads(conv):
  return jax.jit(lambda x, w: jax.vjp(conv, x, w)[1](dy))
ours = grads(lambda x, w: onednn.conv2d(x, w, (2, 2), ((0, 0), (0, 0))))
want = grads(lambda x, w: lax.conv_general_dilated(x, w, (2, 2), 'VALID',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)
for scale in range(1, 21):  # Whether it hangs depends on the values: several.
  dx, dw = ours(x * scale, w)
  # d/dx does not depend on x, d/dw is linear in it.
  for name, got, ref in (('dx', dx, want[0]), ('dw', dw, want[1] * scale)):
    err = float(jnp.max(jnp.abs(got - ref)))
    assert err <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(ref)))), (scale, name, err)
print('ok')
"""


@needs_onednn
def test_strided_1x1_gradients_with_two_threads_finish_and_are_right():
  # Before kernels/onednn._subsampled, oneDNN's backward-weights pass spun at
  # 100% CPU for ever here (or returned wrong kernel gradients): the hang of
  # the diverging and kill -9 CLI runs (docs/onednn.md).
  environ = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1',
                 **{onednn.THREADS_ENV: '2'})
  try:
    result = subprocess.run([sys.executable, '-c', _SHORTCUT_GRADIENTS], env=environ,
                            capture_output=True, text=True, timeout=90)
  except subprocess.TimeoutExpired:
    pytest.fail('the gradients of a strided 1x1 convolution did not finish in 90 s')
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]


@needs_onednn
def test_gradients_inside_shard_map_on_eight_devices_equal_one_device():
  # The trainer's pattern: a device-varying copy of the kernel, its gradient psum'd once;
  # and a replicated kernel, whose gradient oneDNN's conv psums itself (conv2d's pcast).
  mesh = mesh_lib.make_mesh()
  assert mesh.size == 8
  x, w = _random((16, 8, 8, 4), 2), _random((3, 3, 4, 6), 3)
  loss = lambda x, w: jnp.sum(jnp.sin(_onednn_conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)))

  def per_device(x, w):
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, lax.pcast(w, mesh_lib.DATA_AXIS, to='varying'))
    gw_replicated = jax.grad(loss, argnums=1)(x, w)
    return gx, lax.psum(gw, mesh_lib.DATA_AXIS), gw_replicated

  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(mesh_lib.DATA_AXIS), P()),
                                  out_specs=(P(mesh_lib.DATA_AXIS), P(), P()), check_vma=True))
  assert CUSTOM_CALL + 'backward_weights' in sharded.lower(x, w).as_text()
  gx, gw, gw_replicated = sharded(x, w)
  want = jax.grad(lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=NHWC))), argnums=(0, 1))(x, w)
  _assert_close(gx, want[0], 1e-5)
  _assert_close(gw, want[1], 1e-5)
  _assert_close(gw_replicated, want[1], 1e-5)


@needs_onednn
def test_plain_jit_over_several_devices_keeps_xla_convolutions():
  # XLA would run the custom call on the whole (all-gathered) batch on every device.
  x, w = _random((8, 6, 6, 3), 11), _random((3, 3, 3, 4), 12)
  x = jax.device_put(x, mesh_lib.batch_sharded(mesh_lib.make_mesh()))
  fn = jax.jit(lambda x, w: _onednn_conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC))
  assert CUSTOM_CALL not in fn.lower(x, w).as_text()
  _assert_close(fn(x, w), lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                   dimension_numbers=NHWC), 1e-5)


@needs_onednn
def test_bfloat16_operands_give_bfloat16_results_close_to_float32():
  x, w = _random((4, 8, 8, 8), 4, jnp.bfloat16), _random((3, 3, 8, 8), 5, jnp.bfloat16)
  got = _one_device_jit(lambda x, w: _onednn_conv(x, w, (1, 1), 'SAME',
                                                  dimension_numbers=NHWC))(x, w)
  assert got.dtype == jnp.bfloat16
  want = lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), 'SAME',
                                  dimension_numbers=NHWC)
  _assert_close(got, want, 1e-2)  # The float32 result rounded to bfloat16 (8 bits).


@needs_onednn
def test_convolutions_onednn_does_not_run_stay_on_xla_and_are_right():
  x, w = _random((2, 9, 9, 4), 6), _random((3, 3, 2, 4), 7)
  fn = _one_device_jit(lambda x, w: _onednn_conv(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2),
                                         dimension_numbers=NHWC, feature_group_count=2))
  assert CUSTOM_CALL not in fn.lower(x, w).as_text()
  _assert_close(fn(x, w), lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=NHWC,
      feature_group_count=2), 1e-6)


@pytest.fixture
def small_bottleneck_resnet():
  """ResNet-50's blocks (1x1, 3x3, 1x1 x4), one per stage of two: compiles in seconds."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(encoders.ENCODERS, 'bottleneck_small', functools.partial(
        encoders.ResNet, stage_sizes=(1, 1), block_cls=encoders.BottleneckBlock))
    yield 'bottleneck_small'


@needs_onednn
@pytest.mark.parametrize('encoder,stem,convs', [
    ('resnet18', 'cifar', 20), ('resnet50', 'imagenet', 53), ('vgg16', 'cifar', 13)])
def test_every_convolution_of_every_encoder_runs_on_onednn(encoder, stem, convs):
  config = tiny_config()
  config.model.encoder, config.model.stem, config.model.width = encoder, stem, 2
  config.model.conv = 'onednn'
  model = factory.create_model(config, 10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
  hlo = _one_device_jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()
  assert hlo.count(f'@{CUSTOM_CALL}forward') == convs
  assert 'convolution' not in hlo


@needs_onednn
def test_bottleneck_resnet_with_imagenet_stem_gives_the_same_features_with_either_backend(
    small_bottleneck_resnet):
  # ResNet-18 with the CIFAR stem runs in the train-step tests; here the 7x7/2
  # stem with max-pool and the bottleneck blocks' 1x1 convolutions.
  config = tiny_config()
  config.model.encoder, config.model.stem = small_bottleneck_resnet, 'imagenet'
  config.model.width = 2
  x = _random((2, 32, 32, 3), 8)
  variables = jax.jit(functools.partial(factory.create_model(config, 10).init, train=False))(
      jax.random.PRNGKey(0), x)
  outputs = {}
  for backend in ('xla', 'onednn'):
    config.model.conv = backend
    model = factory.create_model(config, 10)
    apply = _one_device_jit(lambda v, x: model.apply(v, x, train=False)['features']).lower(
        variables, x)
    assert (CUSTOM_CALL in apply.as_text()) == (backend == 'onednn')
    outputs[backend] = apply.compile()(variables, x)
  _assert_close(outputs['onednn'], outputs['xla'], 1e-5)


@needs_onednn
@needs_cifar10
def test_checkpoint_resumes_with_the_other_backend_to_the_same_loss(tmp_path, small_resnet):
  """A run checkpointed under 'xla' goes on under 'onednn' (model.conv is a free key).

  Both continuations start from the same checkpoint: the same parameters give
  the same losses and end at the same parameters.
  """
  config = tiny_config()
  config.model.encoder, config.model.conv = small_resnet, 'xla'
  config.num_steps = 3
  first = pretraining_workdir(tmp_path / 'xla', config)  # A checkpoint at step 2.
  shutil.copytree(first, tmp_path / 'onednn')
  ends = {}
  for backend in ('xla', 'onednn'):
    config.model.conv = backend
    ends[backend] = jax.device_get(pretrain.run(config, str(tmp_path / backend)))
    assert int(ends[backend].step) == 3
  # Also against configs recorded before the key existed.
  assert workdir_lib.config_differences({'model': {'conv': 'xla', 'width': 4}},
                                        {'model': {'width': 4}}) == []
  jax.tree.map(lambda a, b: _assert_close(a, b, 1e-5), ends['onednn'].params,
               ends['xla'].params)
  jax.tree.map(lambda a, b: _assert_close(a, b, 1e-5), ends['onednn'].batch_stats,
               ends['xla'].batch_stats)


def test_auto_falls_back_to_xla_with_one_log_line_when_onednn_cannot_load(monkeypatch, caplog):
  monkeypatch.setenv(onednn.CXX_ENV, '/nonexistent/g++')
  onednn.load.cache_clear()
  conv.resolve_backend.cache_clear()
  try:
    with caplog.at_level('INFO'):
      assert conv.resolve_backend('auto') == 'xla'
      assert conv.resolve_backend('auto') == 'xla'  # Answered once, logged once.
    lines = [r.getMessage() for r in caplog.records if 'CPU convolutions' in r.getMessage()]
    # Without the wheels (another platform) the reason is theirs, else the compiler.
    reason = 'wheel is not installed' if _REASON else "no C++ compiler: '/nonexistent/g++'"
    assert len(lines) == 1 and reason in lines[0], lines
    with pytest.raises(onednn.Unavailable, match=reason.replace('+', r'\+')):
      conv.resolve_backend('onednn')
    x, w = _random((2, 5, 5, 3), 9), _random((3, 3, 3, 4), 10)
    fn = _one_device_jit(functools.partial(conv.conv_general_dilated, window_strides=(1, 1),
                                   padding='SAME', dimension_numbers=NHWC, backend='auto'))
    assert CUSTOM_CALL not in fn.lower(x, w).as_text()
    _assert_close(fn(x, w), lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                     dimension_numbers=NHWC), 1e-6)
  finally:  # The rest of the session loads oneDNN again.
    monkeypatch.undo()
    onednn.load.cache_clear()
    conv.resolve_backend.cache_clear()


@pytest.mark.parametrize('value, want', [(None, 'default'), ('3', 3), (' 1 ', 1), ('0', None),
                                         ('two', None), ('-2', None), ('1.5', None)])
def test_threads_per_call_default_to_cores_per_device_and_reject_a_bad_setting(
    monkeypatch, value, want):
  # The default measured best (docs/onednn.md, "Threads"): both cores with one
  # device, one thread per call with 8 (the tests' fake devices).
  if value is None:
    monkeypatch.delenv(onednn.THREADS_ENV, raising=False)
    cores, devices = len(os.sched_getaffinity(0)), jax.local_device_count('cpu')
    assert onednn.threads_per_call() == max(1, cores // devices)
  elif want is None:
    monkeypatch.setenv(onednn.THREADS_ENV, value)
    with pytest.raises(onednn.Unavailable, match=f"{onednn.THREADS_ENV}='{value}' is not"):
      onednn.threads_per_call()
  else:
    monkeypatch.setenv(onednn.THREADS_ENV, value)
    assert onednn.threads_per_call() == want


@needs_onednn
def test_a_broken_cached_build_is_built_again(tmp_path, monkeypatch):
  good = pathlib.Path(onednn.load()._name)  # The library this session uses.
  monkeypatch.setenv(onednn.CACHE_ENV, str(tmp_path))
  target = onednn.build_inputs()[3]
  assert target.parent == tmp_path and target.name == good.name
  target.write_bytes(good.read_bytes()[:4096])  # What a killed copy could leave.
  built = []

  def build(cxx, include, lib, target):  # Instead of compiling: the good library.
    built.append(target)
    shutil.copy(good, target)

  monkeypatch.setattr(onednn, '_build', build)
  onednn.load.cache_clear()
  try:
    onednn.load()
    assert built == [target]
    assert target.read_bytes() == good.read_bytes()
  finally:
    monkeypatch.undo()
    onednn.load.cache_clear()
    onednn.load()
