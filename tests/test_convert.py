"""The official weights in Flax: a torchvision ResNet-50 converted, read back as the probe reads it.

The reference is torchvision itself: a randomly initialised ``resnet50()``
(BatchNorm statistics and affine parameters randomised too, so a swapped or
misplaced BN array shows), converted by barlow_jax.convert, loaded with
models/pretrained.load (what the linear and fine-tuning stages call)
and run on the same images: the pooled 2048-d features must agree.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

# The suite has loaded TensorFlow and jaxlib before this module; torchvision
# then imports torch._dynamo, which imports triton (the CUDA build's GPU
# kernel compiler), whose native library segfaults beside them (seen with
# torch 2.14.1, TF 2.21). Nothing here needs GPU kernels: make triton absent,
# which torch handles as "no triton".
sys.modules.setdefault('triton', None)
import torch  # noqa: E402
import torchvision  # noqa: E402

from barlow_jax import convert
from barlow_jax import errors
from barlow_jax.models import pretrained
from barlow_jax.runtime import mesh as mesh_lib
from cli_runs import REPO, env

torch.set_default_dtype(torch.float32)
IMAGE_SIZE = 64  # Small: ResNet-50's strides still all apply (64 -> 2x2 before pooling).


def _randomise_batch_norm(model: torch.nn.Module, images: torch.Tensor) -> None:
  """Running statistics of ``images``, then perturbed; random affine parameters.

  Statistics of the data and damped residual branches (the last BN of a
  block scales by 0.1-0.3, as in trained ResNets) keep the features O(1):
  float32 rounding then stays well below the 1e-4 tolerance (the mapping
  itself agrees to 1e-12 in float64).
  """
  norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, m in norms.items():
      m.momentum = None  # A cumulative average: one batch sets the statistics.
      low, high = (0.1, 0.3) if name.endswith('bn3') else (0.5, 1.5)
      m.weight.copy_(torch.empty_like(m.weight).uniform_(low, high, generator=gen))
      m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    model.train()
    model(images)
    for m in norms.values():
      m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4, generator=gen))
  model.eval()


@pytest.fixture(scope='module')
def torch_resnet50():
  """(the model with fc = Identity in eval mode, NHWC float32 images)."""
  torch.manual_seed(0)
  model = torchvision.models.resnet50()
  images = np.random.default_rng(0).normal(size=(4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  _randomise_batch_norm(model, torch.from_numpy(images.transpose(0, 3, 1, 2)))
  model.fc = torch.nn.Identity()
  return model, images


def _save_hub_file(model, path) -> str:
  """The torch.hub resnet50.pth layout: the backbone's state_dict (fc is Identity, no keys)."""
  torch.save(model.state_dict(), path)
  return str(path)


def test_converted_features_match_torchvision(tmp_path, torch_resnet50):
  model, images = torch_resnet50
  workdir = str(tmp_path / 'fb_r50')
  convert.convert(_save_hub_file(model, tmp_path / 'resnet50.pth'), workdir, dataset='stl10')

  encoder = pretrained.load(workdir, mesh_lib.make_mesh(jax.devices()[:1]))
  assert (encoder.config.model.encoder, encoder.config.model.stem) == ('resnet50', 'imagenet')
  assert encoder.config.converted.projector.startswith('absent')
  assert encoder.config.augment.crop_size == 96  # STL-10's own size.
  features = jax.jit(lambda v, x: encoder.model.apply(v, x, train=False)['features'])(
      encoder.variables, images)
  with torch.no_grad():
    reference = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  assert features.shape == reference.shape == (4, 2048)
  assert reference.std() > 0.1  # Not a degenerate network whose features agree trivially.
  np.testing.assert_allclose(np.asarray(features), reference, rtol=0, atol=1e-4)
  # The placeholder projector and the probe are zeros, never mistaken for trained weights.
  for part in ('head', 'probe'):
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(encoder.variables['params'][part]))


def test_the_official_projector_is_converted(tmp_path, torch_resnet50):
  """The full training checkpoint ({'model': {'module.backbone.*', 'module.projector.*', ...}})."""
  model, _ = torch_resnet50
  projector = torch.nn.Sequential(
      torch.nn.Linear(2048, 64, bias=False), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
      torch.nn.Linear(64, 32, bias=False))
  with torch.no_grad():
    projector[1].running_mean.normal_()
    projector[1].running_var.uniform_(0.5, 2.0)
    projector[1].weight.uniform_(0.5, 1.5)
    projector[1].bias.normal_()
  projector.eval()
  state = {f'module.backbone.{k}': v for k, v in model.state_dict().items()}
  state |= {f'module.projector.{k}': v for k, v in projector.state_dict().items()}
  state |= {f'module.bn.{k}': v for k, v in torch.nn.BatchNorm1d(32, affine=False).state_dict().items()}
  path = tmp_path / 'checkpoint.pth'
  torch.save({'epoch': 1000, 'model': state}, path)
  config = convert.convert(str(path), str(tmp_path / 'full'), dataset='cifar10')
  assert (config.model.projector, config.converted.projector) == ('64-32', 'converted')

  encoder = pretrained.load(str(tmp_path / 'full'), mesh_lib.make_mesh(jax.devices()[:1]))
  features = np.random.default_rng(1).normal(size=(8, 2048)).astype(np.float32)
  ours = encoder.model.apply(encoder.variables, features,
                             method=lambda m, x: m.head(x, train=False))
  with torch.no_grad():
    reference = projector(torch.from_numpy(features)).numpy()
  np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-5, atol=1e-5)
  # The same backbone as the hub layout gives (checked against torchvision above).
  stem = encoder.variables['params']['backbone']['stem_conv']['kernel']
  np.testing.assert_array_equal(stem, model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_names_map_onto_torchvision():
  assert convert.torch_name(('backbone', 'stem_bn', 'var')) == 'bn1.running_var'
  assert convert.torch_name(('backbone', 'BottleneckBlock_3', 'Conv_1', 'kernel')) == \
      'layer2.0.conv2.weight'
  assert convert.torch_name(('backbone', 'BottleneckBlock_15', 'proj_bn', 'scale')) == \
      'layer4.2.downsample.1.weight'
  assert convert.torch_name(('head', 'BatchNorm_1', 'mean')) == 'projector.4.running_mean'


def test_bad_inputs_name_the_problem(tmp_path, torch_resnet50):
  model, _ = torch_resnet50
  state = model.state_dict()
  state['layer3.1.conv2.weight'] = state['layer3.1.conv2.weight'][:, :128]
  state['layer9.extra'] = torch.zeros(3)
  del state['layer4.2.bn3.running_var']
  torch.save(state, tmp_path / 'bad.pth')
  with pytest.raises(errors.CheckpointError) as e:
    convert.convert(str(tmp_path / 'bad.pth'), str(tmp_path / 'a'))
  for name in ('missing layer4.2.bn3.running_var', 'unexpected layer9.extra',
               'layer3.1.conv2.weight: (256, 128, 3, 3), expected (256, 256, 3, 3)'):
    assert name in str(e.value)
  assert not os.path.exists(tmp_path / 'a')
  with pytest.raises(errors.CheckpointError, match='no such file'):
    convert.convert(str(tmp_path / 'absent.pth'), str(tmp_path / 'a'))
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  with pytest.raises(errors.WorkdirError, match='not an empty directory'):
    convert.convert(str(tmp_path / 'bad.pth'), str(tmp_path / 'full'))

  # The command line: exit status 2 and the same message, nothing written.
  out = subprocess.run([sys.executable, '-m', 'barlow_jax.convert',
                        f'--torch_checkpoint={tmp_path / "bad.pth"}', f'--workdir={tmp_path / "b"}'],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == errors.EXIT_BAD_INPUT, out.stderr[-2000:]
  assert 'unexpected layer9.extra' in out.stderr
  assert not os.path.exists(tmp_path / 'b')
