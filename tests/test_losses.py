"""The Barlow Twins loss against the paper's pseudo-code, and across devices."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import pytest

from barlow_jax import losses


def paper_pseudocode_loss(z_a, z_b, lambd, ddof=0):
  """Algorithm 1 of Zbontar et al. (2021), transcribed to NumPy in float64.

  The paper writes z.std(0); the official training code normalises with
  BatchNorm1d (biased variance), which is ddof=0.
  """
  n, d = z_a.shape
  z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0, ddof=ddof)
  z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0, ddof=ddof)
  c = z_a_norm.T @ z_b_norm / n
  c_diff = (c - np.eye(d)) ** 2
  off = ~np.eye(d, dtype=bool)
  c_diff[off] *= lambd
  return c_diff.sum()


def barlow_twins_loss(z1, z2, lambd=losses.DEFAULT_LAMBDA, axis_name=None, eps=losses.BN_EPS):
  """The scalar loss ``sum_i (1-C_ii)^2 + lambd * sum_{i!=j} C_ij^2``, as the stages sum the terms."""
  terms = losses.barlow_twins_terms(z1, z2, axis_name=axis_name, eps=eps)
  return terms.on_diag + lambd * terms.off_diag


def _embeddings(n=32, d=64, seed=0):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
  z2 = 0.7 * z1 + 0.5 * rng.normal(size=(n, d))
  return z1.astype(np.float32), z2.astype(np.float32)


@pytest.mark.parametrize('lambd', [0.0051, 0.0, 1.0])
def test_loss_matches_paper_pseudocode(lambd):
  z1, z2 = _embeddings()
  expected = paper_pseudocode_loss(z1.astype(np.float64), z2.astype(np.float64), lambd)
  got = barlow_twins_loss(jnp.asarray(z1), jnp.asarray(z2), lambd, eps=0.0)
  np.testing.assert_allclose(float(got), expected, rtol=2e-5)


def test_default_eps_is_batchnorm_eps_and_barely_moves_the_loss():
  z1, z2 = _embeddings()
  exact = paper_pseudocode_loss(z1.astype(np.float64), z2.astype(np.float64), 0.0051)
  got = float(barlow_twins_loss(jnp.asarray(z1), jnp.asarray(z2)))
  assert got != pytest.approx(exact, rel=1e-9)  # eps is really applied ...
  assert got == pytest.approx(exact, rel=1e-3)  # ... and is small.


def test_terms_and_identity_cases():
  z1, _ = _embeddings()
  terms = losses.barlow_twins_terms(jnp.asarray(z1), jnp.asarray(z1), eps=0.0)
  assert float(terms.on_diag) == pytest.approx(0.0, abs=1e-4)  # C_ii = 1 for identical views.
  c = np.asarray(losses.cross_correlation(jnp.asarray(z1), jnp.asarray(z1), eps=0.0))
  np.testing.assert_allclose(np.diag(c), 1.0, atol=1e-5)
  np.testing.assert_allclose(float(terms.off_diag), (c ** 2).sum() - (np.diag(c) ** 2).sum(),
                             rtol=1e-4)


def test_bfloat16_inputs_are_computed_in_float32():
  z1, z2 = _embeddings()
  lo = barlow_twins_loss(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16))
  assert lo.dtype == jnp.float32


def test_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r'\(4, 8\) and \(4, 6\)'):
    barlow_twins_loss(jnp.zeros((4, 8)), jnp.zeros((4, 6)))


def _sharded_loss(mesh, lambd):
  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P('data'), P('data')),
                     out_specs=P(), check_vma=True)
  def loss(z1, z2):
    return barlow_twins_loss(z1, z2, lambd, axis_name='data')
  return loss


@pytest.mark.parametrize('dim', [64, 60])  # 60: not divisible by 8 -> full-C fallback.
def test_eight_devices_equal_one_device(dim):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ('data',))
  z1, z2 = _embeddings(n=32, d=dim, seed=1)
  single = barlow_twins_loss(jnp.asarray(z1), jnp.asarray(z2))
  multi = _sharded_loss(mesh, losses.DEFAULT_LAMBDA)(jnp.asarray(z1), jnp.asarray(z2))
  np.testing.assert_allclose(float(multi), float(single), rtol=1e-6)

  # Gradients through the collectives (the pmap-era trap would give 8x or 1/8x).
  def grad_single(z1, z2):
    return jax.grad(barlow_twins_loss, argnums=(0, 1))(z1, z2)

  def grad_multi(z1, z2):
    return jax.grad(lambda a, b: _sharded_loss(mesh, losses.DEFAULT_LAMBDA)(a, b),
                    argnums=(0, 1))(z1, z2)

  for g1, g8 in zip(grad_single(jnp.asarray(z1), jnp.asarray(z2)),
                    grad_multi(jnp.asarray(z1), jnp.asarray(z2))):
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-4, atol=1e-6)


def test_row_sharded_blocks_reassemble_the_full_matrix():
  mesh = Mesh(np.array(jax.devices()), ('data',))
  z1, z2 = _embeddings(n=32, d=64, seed=2)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P('data'), P('data')),
                     out_specs=P('data'), check_vma=False)
  def rows_of_c(a, b):
    a = losses._standardize(a, 'data', losses.BN_EPS)
    b = losses._standardize(b, 'data', losses.BN_EPS)
    return losses.cross_correlation_rows(a, b, 'data')

  full = losses.cross_correlation(jnp.asarray(z1), jnp.asarray(z2))
  np.testing.assert_allclose(np.asarray(rows_of_c(z1, z2)), np.asarray(full), atol=1e-6)
