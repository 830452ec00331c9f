"""Barlow Twins loss (Zbontar et al., 2021, Algorithm 1), single- or multi-device.

The embeddings are standardised over the *global* batch (as the official
implementation's ``BatchNorm1d(affine=False)`` does under DDP: biased variance,
eps inside the square root), and the cross-correlation matrix is always
computed in float32 at least (float64 embeddings stay float64), whatever the
compute dtype of the network.

Inside ``jax.shard_map`` pass ``axis_name``: every device then owns a block of
rows of C, computed from all-gathered embeddings (N*D bytes moved instead of
an all-reduce of the D*D matrix; ../shared/JAX_NOTES.md §2: 22 ms vs 335 ms at
D=2048 on 8 CPU devices).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import optax

DEFAULT_LAMBDA = 0.0051  # 1/D for D=8192 was rounded to this in the paper.
BN_EPS = 1e-5  # torch.nn.BatchNorm1d default, used by the official code.


class BarlowTwinsTerms(NamedTuple):
  """The two sums of the loss; ``loss = on_diag + lambd * off_diag``."""
  on_diag: jax.Array  # sum_i (1 - C_ii)^2
  off_diag: jax.Array  # sum_{i != j} C_ij^2 (before multiplying by lambda)


def _standardize(z: jax.Array, axis_name: Optional[str], eps: float) -> jax.Array:
  """Zero mean, unit (biased) variance per feature over the global batch."""
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))  # float32 at least.
  mean = z.mean(axis=0)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  var = jnp.square(z - mean).mean(axis=0)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
  return (z - mean) * lax.rsqrt(var + eps)


def _matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
  # HIGHEST: accelerators would otherwise use bf16 passes for an f32 matmul,
  # and C sums N products per entry.
  return jnp.matmul(a.T, b, precision=lax.Precision.HIGHEST)


def _terms_from_rows(c_rows: jax.Array, diag: jax.Array) -> BarlowTwinsTerms:
  on = jnp.sum(jnp.square(1.0 - diag))
  off = jnp.sum(jnp.square(c_rows)) - jnp.sum(jnp.square(diag))
  return BarlowTwinsTerms(on, off)


def cross_correlation(z1: jax.Array, z2: jax.Array, eps: float = BN_EPS) -> jax.Array:
  """The full D x D cross-correlation matrix of one (single-device) batch."""
  z1n, z2n = _standardize(z1, None, eps), _standardize(z2, None, eps)
  return _matmul_t(z1n, z2n) / z1.shape[0]


def barlow_twins_terms(
    z1: jax.Array,
    z2: jax.Array,
    axis_name: Optional[str] = None,
    eps: float = BN_EPS,
) -> BarlowTwinsTerms:
  """On- and off-diagonal sums of the global cross-correlation matrix.

  Args:
    z1: [n, D] embeddings of the first view (this device's rows of the batch).
    z2: [n, D] embeddings of the second view, same examples in the same order.
    axis_name: the mesh axis the batch is split over, inside ``shard_map``;
      None for a single device.
    eps: added to the variance before the square root.

  Returns:
    BarlowTwinsTerms; identical on every device of ``axis_name``.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(f'Expected two [N, D] embeddings of equal shape, got '
                     f'{z1.shape} and {z2.shape}.')
  z1n, z2n = _standardize(z1, axis_name, eps), _standardize(z2, axis_name, eps)
  if axis_name is None:
    c = _matmul_t(z1n, z2n) / z1.shape[0]
    return _terms_from_rows(c, jnp.diagonal(c))

  num_devices = lax.axis_size(axis_name)
  if z1.shape[1] % num_devices:
    # Rare (D not a multiple of the device count): all-reduce the full matrix.
    c = lax.psum(_matmul_t(z1n, z2n), axis_name) / (z1.shape[0] * num_devices)
    return _terms_from_rows(c, jnp.diagonal(c))
  c_rows = cross_correlation_rows(z1n, z2n, axis_name)
  rows = c_rows.shape[0]
  first = lax.axis_index(axis_name) * rows
  diag = jnp.diagonal(lax.dynamic_slice_in_dim(c_rows, first, rows, axis=1))
  local = _terms_from_rows(c_rows, diag)
  return BarlowTwinsTerms(lax.psum(local.on_diag, axis_name),
                          lax.psum(local.off_diag, axis_name))


def cross_correlation_rows(z1n: jax.Array, z2n: jax.Array, axis_name: str) -> jax.Array:
  """This device's block of rows of C from standardised, batch-sharded embeddings.

  Device k owns rows [k*D/K, (k+1)*D/K) of C. all_to_all hands it those
  feature columns of z1 for the whole global batch; all_gather hands it all
  of z2. Traffic is O(N*D) and no device ever holds the full D x D matrix.
  D must be divisible by the number of devices K.

  Returns:
    [D/K, D] float32.
  """
  global_batch = z1n.shape[0] * lax.axis_size(axis_name)
  z1_cols = lax.all_to_all(z1n, axis_name, split_axis=1, concat_axis=0, tiled=True)
  z2_all = lax.all_gather(z2n, axis_name, axis=0, tiled=True)
  return _matmul_t(z1_cols, z2_all) / global_batch


def _sum(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x.sum() if axis_name is None else lax.psum(x.sum(), axis_name)


def masked_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    axis_name: Optional[str] = None,
) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and accuracy over the labelled examples.

  Examples with ``label < 0`` (unlabelled, e.g. STL-10's 'unlabelled' split)
  are left out of both the sum and the count, so they contribute nothing.

  Args:
    logits: [n, K] (this device's rows of the batch).
    labels: [n] int; negative means unlabelled.
    axis_name: the mesh axis the batch is split over, inside ``shard_map``;
      the mean is then over the labelled examples of the global batch.

  Returns:
    (loss, accuracy), float32 scalars, identical on every device; both are 0
    when no example of the batch is labelled.
  """
  valid = labels >= 0
  safe = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  correct = (jnp.argmax(logits, -1) == safe) & valid
  count = jnp.maximum(_sum(valid, axis_name), 1)
  return _sum(jnp.where(valid, ce, 0.0), axis_name) / count, _sum(correct, axis_name) / count
