"""The 1-D device mesh every stage runs on, and the shardings of its arrays.

One axis, ``DATA_AXIS``, spans every device of every process: batches are
split along it, parameters are replicated over it, and BatchNorm, the Barlow
Twins loss and every collective name it.
"""

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The one mesh axis; BatchNorm, the loss and every collective use this name.
DATA_AXIS = 'data'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over ``devices`` (default: all of them) with the one axis DATA_AXIS."""
  # Mesh(...) has Auto axis types (jax.make_mesh would default to Explicit).
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimiser state)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over the devices."""
  return NamedSharding(mesh, P(DATA_AXIS))
