"""Initialisation as the official code's: the projector's Linear layers as torch.nn.Linear's default."""

import jax
import numpy as np

from barlow_jax.models import heads


def test_projector_kernels_are_uniform_within_one_over_sqrt_fan_in():
  projector = heads.Projector((512, 256), axis_name=None)
  params = projector.init(jax.random.PRNGKey(0), np.zeros((4, 300), np.float32),
                          train=False)['params']
  kernels = [v['kernel'] for k, v in sorted(params.items()) if k.startswith('Dense')]
  assert [k.shape for k in kernels] == [(300, 512), (512, 256)]
  assert not any('bias' in v for k, v in params.items() if k.startswith('Dense'))
  for kernel in kernels:
    bound = 1.0 / np.sqrt(kernel.shape[0])  # torch: kaiming_uniform(a=sqrt(5)) = U(-b, b).
    k = np.asarray(kernel)
    assert np.abs(k).max() <= bound
    assert np.abs(k).max() > 0.99 * bound  # Uniform up to the bound, not a narrower law.
    np.testing.assert_allclose(k.var(), bound ** 2 / 3, rtol=0.05)
