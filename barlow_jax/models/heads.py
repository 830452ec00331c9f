"""Heads on top of an encoder: the Barlow Twins projector and the plain MLP.

Sizes are given as strings, '8192-8192-8192', so that configs stay flat.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from barlow_jax.models import encoders


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


# torch.nn.Linear's default weight init, kaiming_uniform(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in). The official
# projector keeps it (Flax's default, lecun_normal, has variance 1/fan_in).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class Projector(nn.Module):
  """Linear-BN-ReLU for every layer but the last, which is a plain Linear (paper §2).

  As the official code: no biases, BatchNorm1d with PyTorch's defaults,
  torch's default Linear initialisation.
  """
  sizes: Sequence[int]
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = encoders.batch_norm(train, self.axis_name, self.dtype)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              kernel_init=TORCH_LINEAR_INIT)
    for size in self.sizes[:-1]:
      x = nn.relu(norm()(dense(size)(x)))
    return dense(self.sizes[-1])(x)


class MLP(nn.Module):
  """Linear-ReLU for every layer but the last, which is a plain Linear; no BatchNorm.

  The supervised Barlow Twins embedding head (Ramyaa 2022, §4.2.1) is
  Linear(2048)-ReLU-Linear(128), unlike the BN projector of the paper.
  """
  sizes: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for size in self.sizes[:-1]:
      x = nn.relu(nn.Dense(size, dtype=self.dtype)(x))
    return nn.Dense(self.sizes[-1], dtype=self.dtype)(x)
