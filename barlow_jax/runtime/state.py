"""The training state every stage that trains carries from step to step."""

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from barlow_jax.runtime import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates done.
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # Base key; step keys are fold_in(rng, step), so resume is exact.


def init_variables(model, image_size: int, rng: jax.Array) -> dict:
  """``model``'s fresh variables, initialised on a dummy batch of two ``image_size``^2 RGB images.

  The one initialisation of every model the package builds (training state,
  restore targets, random-init baselines); under ``jax.eval_shape`` it gives
  the shapes without computing anything.

  Args:
    model: a Flax module called as ``model(images, train=...)``.
    image_size: side of the (square) network input.
    rng: the initialisation key.

  Returns:
    {'params', 'batch_stats', ...} as ``model.init`` returns them.
  """
  return model.init(rng, jnp.zeros((2, image_size, image_size, 3), jnp.float32), train=False)


def variable_shapes(model, image_size: int) -> dict:
  """init_variables' result as shapes and dtypes (jax.ShapeDtypeStruct), nothing computed:
  the restore target of a checkpoint of ``model``."""
  return jax.eval_shape(lambda: init_variables(model, image_size, jax.random.PRNGKey(0)))


def create_train_state(model, tx, mesh: Mesh, seed: int, image_size: int,
                       variables: Optional[dict] = None) -> TrainState:
  """The initial state of ``model``, replicated over ``mesh``.

  Args:
    model: a Flax module with 'params' and 'batch_stats'.
    tx: the optax transformation.
    mesh: the data mesh.
    seed: initialisation and augmentation keys derive from PRNGKey(seed).
    image_size: side of the (square) network input, for the dummy batch.
    variables: {'params', 'batch_stats'} whose modules replace the fresh
      ones of the same name (fine-tuning: the pretrained 'backbone' and,
      initialised by a linear probe, the 'classifier'); None keeps the init.
  """
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))

  @functools.partial(jax.jit, out_shardings=mesh_lib.replicated(mesh))
  def init(variables):
    fresh = init_variables(model, image_size, init_rng)
    params, batch_stats = dict(fresh['params']), dict(fresh['batch_stats'])
    if variables is not None:  # Modules the model lacks (a projector) are not taken.
      params.update({k: v for k, v in variables['params'].items() if k in params})
      batch_stats.update({k: v for k, v in variables.get('batch_stats', {}).items()
                          if k in batch_stats})
    return TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=state_rng)

  # Runs once, in ~0.1 s; on CPU, LLVM's optimisation of its ~55 initialiser
  # RNG programs took 9.0 s of the quick start's start-up, unoptimised 1.5 s.
  # Accelerators keep their defaults (the option is XLA:CPU's); under a trace
  # (jax.eval_shape of this function: restore targets) nothing is compiled,
  # and jit refuses compiler options on a nested jit.
  traced = isinstance(jnp.zeros(()), jax.core.Tracer)
  if mesh.devices.flat[0].platform == 'cpu' and not traced:
    return init.lower(variables).compile({'xla_backend_optimization_level': 0})(variables)
  return init(variables)
