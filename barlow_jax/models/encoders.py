"""Encoders: ResNet-18/34/50 (CIFAR or ImageNet stem, any width) and VGG-16-BN.

All modules are Flax Linen: pure ``init``/``apply`` on ``{'params', 'batch_stats'}``.
BatchNorm takes ``axis_name`` so that, inside ``shard_map``, its batch
statistics span every device of the data axis (the official code's SyncBN).
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from barlow_jax.models import conv as conv_lib

ModuleDef = Any

# PyTorch's BatchNorm momentum 0.1 is Flax's 0.9 (Flax keeps 0.9 of the old value).
BN_MOMENTUM = 0.9
BN_EPS = 1e-5
# torchvision's padding, written out: Flax's 'SAME' pads a stride-2 layer of an
# even input by (0, 1) where torch pads (1, 1), which shifts every window by a
# pixel (features of converted torchvision weights would not match). For
# stride 1 the two agree.
PAD_3X3 = ((1, 1), (1, 1))
PAD_7X7 = ((3, 3), (3, 3))


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm (SyncBatchNorm over ``axis_name``), channels last.

  flax.linen.BatchNorm's variables (params 'scale', 'bias'; batch_stats
  'mean', 'var') and arithmetic (both moments in one all-reduce, the
  variance as E[x^2] - E[x]^2, computed in float32 or wider), with one
  difference: in training, the running variance averages the *unbiased* batch
  variance (times n / (n - 1), n the values per channel over the global
  batch), as torch.nn.BatchNorm and SyncBatchNorm do and as the official
  checkpoints hold; Flax averages the biased one. The batch is still normalised with the
  biased variance, as in both. tests/test_official_step.py checks the running
  statistics against PyTorch's.
  """
  use_running_average: bool
  axis_name: Optional[str] = None
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones_init()

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, shape, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, shape, jnp.float32)
    scale = self.param('scale', self.scale_init, shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), shape, jnp.float32)
    # float32 at least (bfloat16 inputs are widened; float64, as in the float64
    # run of tests/test_official_step.py, stays float64).
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      moments = jnp.stack([x32.mean(axes), jnp.square(x32).mean(axes)])
      count = math.prod(x.shape[:-1])
      if self.axis_name is not None and not self.is_initializing():
        moments = lax.pmean(moments, self.axis_name)
        count *= lax.axis_size(self.axis_name)
      mean = moments[0]
      var = jnp.maximum(moments[1] - jnp.square(mean), 0.0)  # Rounding can make it negative.
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        unbiased = var * (count / max(count - 1, 1))
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    y = (x32 - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def batch_norm(train: bool, axis_name: Optional[str], dtype: Any, **kwargs) -> ModuleDef:
  return functools.partial(BatchNorm, use_running_average=not train, dtype=dtype,
                           axis_name=axis_name if train else None, **kwargs)


def _conv_fn(backend: str):
  """conv.conv_general_dilated on ``backend``, for flax.linen.Conv(conv_general_dilated=...)."""
  return functools.partial(conv_lib.conv_general_dilated, backend=backend)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=PAD_3X3)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=PAD_3X3)(y)
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
    # The stride is on the 3x3 conv (ResNet v1.5, as torchvision).
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=PAD_3X3)(y)))
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
    conv_backend: the CPU convolution, one of conv.BACKENDS (same parameters either way).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width: int = 64
  stem: str = 'imagenet'
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  conv_backend: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             conv_general_dilated=_conv_fn(self.conv_backend),
                             kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))
    norm = batch_norm(train, self.axis_name, self.dtype)
    if self.stem == 'cifar':
      x = conv(self.width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    else:
      x = conv(self.width, (7, 7), (2, 2), padding=PAD_7X7, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      # Padded with -inf, as torch's MaxPool2d(3, 2, padding=1).
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_3X3)
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
  conv_backend: str = 'auto'  # The CPU convolution, one of conv.BACKENDS.

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = batch_norm(train, self.axis_name, self.dtype)
    multipliers = (1, 1, 'M', 2, 2, 'M', 4, 4, 4, 'M', 8, 8, 8, 'M', 8, 8, 8, 'M')
    for m in multipliers:
      if m == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.Conv(self.width * m, (3, 3), use_bias=False, dtype=self.dtype,
                    conv_general_dilated=_conv_fn(self.conv_backend))(x)
        x = nn.relu(norm()(x))
    return jnp.mean(x, axis=(1, 2))


ENCODERS = {
    'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    'resnet34': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    'resnet50': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock),
    'vgg16': VGG16,
}
