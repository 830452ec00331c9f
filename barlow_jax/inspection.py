"""Looking inside a run: parameter and BatchNorm tables, test images, nearest neighbours.

What notebooks/inspect_run.ipynb shows, as functions with tests, so that its
cells stay one call each.
"""

import re
from typing import Optional, Sequence

from flax import traverse_util
import numpy as np

from barlow_jax.data import datasets
from barlow_jax.data import pipeline


def _natural(name: str) -> list:
  """Sort key putting 'Block_2' before 'Block_10'."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def _flat(tree: dict) -> dict:
  """{'a/b/c': leaf} of a nested dict, in natural order of the names."""
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
  return {name: flat[name] for name in sorted(flat, key=_natural)}


def param_table(params: dict) -> list[tuple[str, tuple, int]]:
  """(name, shape, count) of every parameter array; the counts sum to the model's size."""
  return [(name, tuple(np.shape(x)), int(np.prod(np.shape(x), dtype=np.int64)))
          for name, x in _flat(params).items()]


def batchnorm_stats(batch_stats: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(layer, running mean [C], running variance [C]) of every BatchNorm, in name order."""
  flat = _flat(batch_stats)
  layers = sorted({name.rsplit('/', 1)[0] for name in flat}, key=_natural)
  return [(layer, np.asarray(flat[f'{layer}/mean']), np.asarray(flat[f'{layer}/var']))
          for layer in layers]


def batchnorm_table(stats) -> list[tuple]:
  """(layer, channels, mean |running mean|, mean, min and max running variance) per layer."""
  return [(layer, len(mean), float(np.abs(mean).mean()), float(var.mean()), float(var.min()),
           float(var.max())) for layer, mean, var in stats]


def first_images(dataset: datasets.Dataset, num: int, split: Optional[str] = None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """uint8 images, labels and class names of the first ``num`` examples of ``split``.

  ``dataset`` is a resolved one (datasets.from_config of the run's config);
  ``split`` defaults to its test split; one process reads them all.
  """
  split = split or dataset.spec.test_split
  batch = next(pipeline.eval_batches(dataset.builder, dataset.spec, split, num))
  keep = batch['mask']
  return batch['image'][keep], batch['label'][keep], dataset.class_names


def nearest_neighbours(features, queries: Sequence[int], k: int) -> np.ndarray:
  """The ``k`` most cosine-similar rows of ``features`` to each query row, itself excluded.

  Args:
    features: [n, d] features of a bank of examples.
    queries: indices of rows of ``features``.
    k: neighbours per query, k < n.

  Returns:
    [len(queries), k] indices into ``features``, most similar first.
  """
  x = np.asarray(features, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  queries = np.asarray(queries)
  similarity = x[queries] @ x.T
  similarity[np.arange(len(queries)), queries] = -np.inf  # Not its own neighbour.
  return np.argsort(-similarity, axis=1, kind='stable')[:, :k]
