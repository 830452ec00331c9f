"""The one inference program and the one loop that runs it over a split.

Every evaluation (features for the probes and kNN, the kNN monitor,
predictions of supervised runs, the embedding pictures) goes through
``predict_split``: each process reads its share of the split in padded
batches (data/pipeline.eval_batches), the jitted ``predict`` runs on the
global batch, and the outputs of the real examples are gathered from every
process and put back in the split's order, whatever the process count.
The pictures of two augmented views during pretraining (stages/pretrain)
run the same ``predict`` on one fixed batch, on one device of process 0.
BatchNorm runs in inference mode.
"""

import math
from typing import Callable, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.runtime import mesh as mesh_lib

# predict(variables, uint8 images [N, H, W, 3], key) -> {output name: float32 [N, ...]}.
PredictFn = Callable[[dict, jax.Array, jax.Array], dict]

# An output make_predict_fn adds when asked: the network's input, its
# standardisation undone and clipped to [0, 1] (the augmented view, to show).
INPUTS = 'inputs'


def make_predict_fn(config, model, view: Optional[augment.ViewAugment] = None,
                    outputs: Optional[Sequence[str]] = None, *,
                    spec: datasets.DatasetSpec) -> PredictFn:
  """Jitted ``(variables, uint8 images, key) -> {output: float32}`` in inference mode.

  Images become the network's input through augment.model_inputs: without
  ``view`` scaled, centre-cropped to ``config.augment.crop_size`` if larger and
  standardised (``key`` unused); with ``view`` augmented first, example i with
  ``split(key, n)[i]`` for the global batch of n, so a view does not depend on
  the device count. ``outputs`` picks the model outputs (None: all), and
  INPUTS the input images; the rest are not computed; ``spec``'s channel mean
  and std standardise the images
  (``config`` gives augment.crop_size and model.dtype). Build it once and
  reuse it: each call compiles anew.
  """
  crop = config.augment.crop_size
  dtype = jnp.dtype(config.model.dtype)
  mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)

  @jax.jit
  def predict(variables, images, key):
    x = augment.model_inputs(images, key, view, crop, spec.mean, spec.std, dtype)
    out = model.apply(variables, x, train=False)
    out = {k: v.astype(jnp.float32) for k, v in out.items() if outputs is None or k in outputs}
    if outputs is not None and INPUTS in outputs:
      out[INPUTS] = jnp.clip(x.astype(jnp.float32) * std + mean, 0.0, 1.0)
    return out

  return predict


def num_eval_batches(builder, split: str, local_batch: int) -> int:
  """Batches every process runs so that collectives line up: the largest share's."""
  n = jax.process_count()
  largest = max(builder.info.splits[s].num_examples for s in tfds.even_splits(split, n))
  return max(1, math.ceil(largest / local_batch))


def predict_split(dataset: datasets.Dataset, predict: PredictFn, variables: dict, split: str,
                  batch_size: int,
                  mesh: Optional[Mesh] = None, *, keys: Sequence[str] = ('features',),
                  seed: int = 0, max_examples: Optional[int] = None) -> dict:
  """Outputs of ``predict`` for the labelled examples of ``split``, in the split's order.

  Args:
    dataset: from datasets.resolve.
    predict: from make_predict_fn.
    variables: {'params', 'batch_stats'}, replicated over ``mesh``.
    split: TFDS split expression.
    batch_size: global batch of the inference.
    mesh: the data mesh; default all devices.
    keys: which outputs of ``predict`` to return.
    seed: with an augmenting ``predict``, batch i is augmented with
      ``fold_in(PRNGKey(seed), i)``.
    max_examples: stop after this many (global) examples; None for all.

  Returns:
    {key: [n, ...] float32 for each of keys, 'label': [n] int64} as numpy, on
    every process; unlabelled examples (label < 0) are left out.
  """
  mesh = mesh or mesh_lib.make_mesh()
  builder, spec = dataset.builder, dataset.spec
  local_batch = batch_size // jax.process_count()
  num_batches = num_eval_batches(builder, split, local_batch)
  if max_examples is not None:
    # The same count on every process, so the collectives line up.
    num_batches = min(num_batches, math.ceil(max_examples / batch_size))
  batches = pipeline.eval_batches(builder, spec, split, local_batch, num_batches=num_batches)
  base_key = jax.random.PRNGKey(seed)
  collected = {k: [] for k in (*keys, 'label', 'index')}
  for i, batch in enumerate(pipeline.prefetch_to_mesh(batches, mesh_lib.batch_sharded(mesh))):
    if i == num_batches:
      break
    out = predict(variables, batch['image'], jax.random.fold_in(base_key, i))
    gathered = multihost_utils.process_allgather(
        {**{k: out[k] for k in keys}, 'label': batch['label'], 'index': batch['index'],
         'mask': batch['mask']}, tiled=True)
    keep = gathered['mask'] & (gathered['label'] >= 0)
    for k in collected:
      collected[k].append(gathered[k][keep])
  result = {k: np.concatenate(v) for k, v in collected.items()}
  # Gathered batches interleave the processes; the split's order is the same
  # whatever the process count, so label fractions chosen from these labels
  # are the ones pipeline.load_train_data chooses.
  order = np.argsort(result.pop('index'), kind='stable')[:max_examples]
  result = {k: v[order] for k, v in result.items()}
  result['label'] = result['label'].astype(np.int64)
  return result
