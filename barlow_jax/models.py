"""Encoders (ResNet-18/34/50, VGG-16-BN), the projector, and the Barlow Twins model.

All modules are Flax Linen: pure ``init``/``apply`` on ``{'params', 'batch_stats'}``.
BatchNorm takes ``axis_name`` so that, inside ``shard_map``, its batch
statistics span every device of the data axis (the official code's SyncBN).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from barlow_jax import input_pipeline

ModuleDef = Any

# PyTorch's BatchNorm momentum 0.1 is Flax's 0.9 (Flax keeps 0.9 of the old value).
BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def _batch_norm(train: bool, axis_name: Optional[str], dtype: Any, **kwargs) -> ModuleDef:
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
      epsilon=BN_EPS, dtype=dtype, axis_name=axis_name if train else None, **kwargs)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-init of the last BN scale makes every block start as identity.
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """ResNet-50 block: 1x1 reduce, 3x3, 1x1 expand (x4)."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet trunk returning globally average-pooled features.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: BasicBlock or BottleneckBlock.
    width: channels of the first stage (64 in the paper; smaller for CPU runs).
    stem: 'cifar' (3x3 stride-1 conv, no max-pool) or 'imagenet' (7x7/2 + max-pool).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width: int = 64
  stem: str = 'imagenet'
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))
    norm = _batch_norm(train, self.axis_name, self.dtype)
    if self.stem == 'cifar':
      x = conv(self.width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    else:
      x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2**i, conv=conv, norm=norm, strides=strides)(x)
    return jnp.mean(x, axis=(1, 2))


class VGG16(nn.Module):
  """VGG-16 with BatchNorm (configuration D), global-average-pooled features."""
  width: int = 64
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _batch_norm(train, self.axis_name, self.dtype)
    multipliers = (1, 1, 'M', 2, 2, 'M', 4, 4, 4, 'M', 8, 8, 8, 'M', 8, 8, 8, 'M')
    for m in multipliers:
      if m == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.Conv(self.width * m, (3, 3), use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(norm()(x))
    return jnp.mean(x, axis=(1, 2))


ENCODERS = {
    'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    'resnet34': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    'resnet50': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock),
    'vgg16': VGG16,
}


def parse_mlp_spec(spec: str) -> tuple[int, ...]:
  """'8192-8192-8192' -> (8192, 8192, 8192); raises ValueError naming the spec."""
  try:
    sizes = tuple(int(s) for s in spec.split('-'))
  except ValueError:
    sizes = ()
  if not sizes or any(s <= 0 for s in sizes):
    raise ValueError(f'Projector spec {spec!r} must be positive integers joined by "-", '
                     'e.g. "8192-8192-8192".')
  return sizes


class Projector(nn.Module):
  """Linear-BN-ReLU for every layer but the last, which is a plain Linear (paper §2)."""
  sizes: Sequence[int]
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _batch_norm(train, self.axis_name, self.dtype)
    for size in self.sizes[:-1]:
      x = nn.Dense(size, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(norm()(x))
    return nn.Dense(self.sizes[-1], use_bias=False, dtype=self.dtype)(x)


class BarlowTwinsModel(nn.Module):
  """Encoder -> projector, plus an online linear probe on the frozen features.

  The probe sees ``stop_gradient(features)``, so it measures the representation
  during pretraining without changing it (as BYOL and solo-learn do).

  Returns a dict with 'features' [N, F], 'embeddings' [N, D], 'probe_logits' [N, K].
  """
  encoder: str
  projector: str
  num_classes: int
  width: int = 64
  stem: str = 'cifar'
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  def setup(self):
    kwargs = dict(width=self.width, dtype=self.dtype, axis_name=self.axis_name)
    if self.encoder.startswith('resnet'):
      kwargs['stem'] = self.stem  # VGG has a single, stem-less layout.
    self.backbone = ENCODERS[self.encoder](**kwargs)
    self.head = Projector(parse_mlp_spec(self.projector), dtype=self.dtype, axis_name=self.axis_name)
    self.probe = nn.Dense(self.num_classes, dtype=jnp.float32)

  def __call__(self, x, train: bool = True):
    features = self.backbone(x, train=train)
    embeddings = self.head(features, train=train)
    probe_logits = self.probe(jax.lax.stop_gradient(features).astype(jnp.float32))
    return {'features': features, 'embeddings': embeddings, 'probe_logits': probe_logits}


def create_model(config, axis_name: Optional[str] = None) -> BarlowTwinsModel:
  """The model described by ``config.model`` (see configs/cifar_bt.py)."""
  m = config.model
  num_classes = input_pipeline.dataset_spec(config.dataset).num_classes
  return BarlowTwinsModel(
      encoder=m.encoder, projector=m.projector, num_classes=num_classes,
      width=m.width, stem=m.stem, dtype=jnp.dtype(m.dtype), axis_name=axis_name)


class MLP(nn.Module):
  """Linear-ReLU for every layer but the last, which is a plain Linear; no BatchNorm.

  The supervised Barlow Twins embedding head (seed 001 §4.2.1) is
  Linear(2048)-ReLU-Linear(128), unlike the BN projector of the paper.
  """
  sizes: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for size in self.sizes[:-1]:
      x = nn.relu(nn.Dense(size, dtype=self.dtype)(x))
    return nn.Dense(self.sizes[-1], dtype=self.dtype)(x)


class SupervisedModel(nn.Module):
  """Encoder -> optional Linear(feature_dim) -> linear classifier and embedding head.

  The supervised Barlow Twins network of seed 001 (§4.2.1): the encoder's
  output is mapped to 2048 units (``feature_dim``; 0 keeps the encoder's
  output, as fine-tuning does), then a linear classifier and an embedding
  head (``embedding``, e.g. '2048-128'; '' for none) read it. Both branches
  of the Siamese network are this one module applied twice.

  Returns a dict with 'features' [N, F] (encoder), 'representation' [N, R]
  (what the heads read), 'logits' [N, K] float32 and, with an embedding head,
  'embeddings' [N, D].
  """
  encoder: str
  num_classes: int
  width: int = 64
  stem: str = 'cifar'
  feature_dim: int = 2048
  embedding: str = '2048-128'
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  def setup(self):
    kwargs = dict(width=self.width, dtype=self.dtype, axis_name=self.axis_name)
    if self.encoder.startswith('resnet'):
      kwargs['stem'] = self.stem
    # Same module name as in BarlowTwinsModel, so a pretrained backbone drops in.
    self.backbone = ENCODERS[self.encoder](**kwargs)
    self.fc = nn.Dense(self.feature_dim, dtype=self.dtype) if self.feature_dim else None
    self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32)
    self.embed = MLP(parse_mlp_spec(self.embedding), self.dtype) if self.embedding else None

  def __call__(self, x, train: bool = True):
    features = self.backbone(x, train=train)
    representation = self.fc(features) if self.fc is not None else features
    out = {'features': features, 'representation': representation,
           'logits': self.classifier(representation.astype(jnp.float32))}
    if self.embed is not None:
      out['embeddings'] = self.embed(representation)
    return out


def create_supervised_model(config, axis_name: Optional[str] = None) -> SupervisedModel:
  """The SupervisedModel described by ``config.model`` (see configs/cifar_supervised_bt.py)."""
  m = config.model
  num_classes = input_pipeline.dataset_spec(config.dataset).num_classes
  return SupervisedModel(
      encoder=m.encoder, num_classes=num_classes, width=m.width, stem=m.stem,
      feature_dim=m.feature_dim, embedding=m.embedding, dtype=jnp.dtype(m.dtype),
      axis_name=axis_name)
