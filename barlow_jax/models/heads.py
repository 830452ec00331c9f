"""Heads on top of an encoder: the Barlow Twins projector and the plain MLP.

Sizes are given as strings, '8192-8192-8192', so that configs stay flat.
"""

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


class Projector(nn.Module):
  """Linear-BN-ReLU for every layer but the last, which is a plain Linear (paper §2)."""
  sizes: Sequence[int]
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = encoders.batch_norm(train, self.axis_name, self.dtype)
    for size in self.sizes[:-1]:
      x = nn.Dense(size, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(norm()(x))
    return nn.Dense(self.sizes[-1], use_bias=False, dtype=self.dtype)(x)


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
