"""Weighted kNN on frozen features (Wu et al., 2018), as in the official evaluations."""

import jax
import jax.numpy as jnp
import numpy as np


def knn_scores(train_features, train_labels, test_features, num_classes: int, k: int,
               temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
  """Weighted kNN class scores (Wu et al., 2018): cosine similarity, exp(s/T) votes.

  Returns:
    [n_test, num_classes] scores; argmax is the prediction.
  """
  train_n = jnp.asarray(train_features / np.linalg.norm(train_features, axis=1, keepdims=True))
  train_onehot = jax.nn.one_hot(jnp.asarray(train_labels), num_classes)

  @jax.jit
  def scores(test):
    test = test / jnp.linalg.norm(test, axis=1, keepdims=True)
    sims, idx = jax.lax.top_k(test @ train_n.T, k)
    weights = jnp.exp(sims / temperature)
    return jnp.einsum('nk,nkc->nc', weights, train_onehot[idx])

  out = [np.asarray(scores(jnp.asarray(test_features[i:i + chunk])))
         for i in range(0, len(test_features), chunk)]
  return np.concatenate(out)
