"""Evaluation of a pretrained encoder: features, kNN, linear probe, metrics.

Everything starts from a pretraining workdir: its ``config.json`` says which
architecture to build and its Orbax checkpoint holds the weights. The encoder
is frozen and BatchNorm runs in inference mode.

Definitions used in results (seed 000 reports "micro" and "macro" scores):
  * micro = accuracy over all test examples (equal to micro-averaged F1 for
    single-label classification);
  * macro = macro-averaged F1 (unweighted mean of per-class F1). On CIFAR-10's
    balanced test set the macro-averaged *recall* equals the accuracy, so the
    seed's distinct macro numbers must be F1 (or precision); we use F1.
"""

import json
import math
import os
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn import metrics as skm
import tensorflow_datasets as tfds

from barlow_jax import input_pipeline
from barlow_jax import models
from barlow_jax import optim
from barlow_jax import train


class CheckpointMismatchError(ValueError):
  """The checkpoint's parameters do not fit the architecture of the config."""


def load_pretrain_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No pretraining config at {path}: is {workdir!r} a pretraining workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_encoder(config, workdir: str, step: Optional[int] = None, mesh=None):
  """Params and batch_stats of the BarlowTwinsModel described by ``config``.

  Args:
    config: a pretraining config (usually ``load_pretrain_config(workdir)``).
    workdir: the pretraining workdir holding ``checkpoints/``.
    step: checkpoint step; None for the latest.
    mesh: where to place the (replicated) variables; default all devices.

  Returns:
    (model without axis_name, {'params', 'batch_stats'}, step).

  Raises:
    FileNotFoundError: no checkpoint.
    CheckpointMismatchError: the checkpoint's shapes differ from ``config``'s
      architecture; the message lists the differing parameters.
  """
  mesh = mesh or train.make_mesh()
  manager = train.checkpoint_manager(workdir, config)
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'No checkpoint {"" if step is None else step} in '
                            f'{manager.directory} (have {list(manager.all_steps())}).')
  model = models.create_model(config)
  tx, _ = optim.create_optimizer(config, steps_per_epoch=1, total_steps=2)
  abstract = jax.eval_shape(lambda: train.create_train_state(config, model, tx, mesh))
  saved = manager.item_metadata(step).tree
  problems = [p for k in ('params', 'batch_stats')  # Params first: the most telling.
              for p in train.shape_mismatches(getattr(abstract, k), saved.get(k, {}), k)]
  if problems:
    raise CheckpointMismatchError(
        f'Checkpoint {manager.directory}/{step} does not match the architecture '
        f'{config.model.to_dict()}: {len(problems)} arrays differ, e.g.\n  '
        + '\n  '.join(problems[:8]))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract)
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return model, {'params': state.params, 'batch_stats': state.batch_stats}, step


def num_eval_batches(builder, split: str, local_batch: int) -> int:
  """Batches every process runs so that collectives line up: the largest share's."""
  n = jax.process_count()
  largest = max(builder.info.splits[s].num_examples for s in tfds.even_splits(split, n))
  return max(1, math.ceil(largest / local_batch))


def extract_features(config, model, variables, split: str, batch_size: int, mesh=None):
  """Frozen-encoder features of every example of ``split``, once each.

  Returns:
    (features [n, F] float32, labels [n] int64) as numpy, on every process.
  """
  mesh = mesh or train.make_mesh()
  spec = input_pipeline.dataset_spec(config.dataset)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir, config.download)
  local_batch = batch_size // jax.process_count()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.DATA_AXIS))
  crop = config.augment.crop_size
  dtype = jnp.dtype(config.model.dtype)

  @jax.jit
  def features(variables, images):
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1] != crop:  # e.g. ImageNet: 256 on the host, 224 centre crop here.
      off = (x.shape[1] - crop) // 2
      x = x[:, off:off + crop, off:off + crop]
    x = ((x - jnp.asarray(spec.mean)) / jnp.asarray(spec.std)).astype(dtype)
    return model.apply(variables, x, train=False)['features'].astype(jnp.float32)

  feats, labels = [], []
  batches = input_pipeline.eval_batches(builder, spec, split, local_batch,
                                        num_batches=num_eval_batches(builder, split, local_batch))
  for batch in input_pipeline.prefetch_to_mesh(batches, sharding):
    out = features(variables, batch['image'])
    gathered = multihost_utils.process_allgather(
        {'f': out, 'y': batch['label'], 'm': batch['mask']}, tiled=True)
    feats.append(gathered['f'][gathered['m']])
    labels.append(gathered['y'][gathered['m']])
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """Top-1/top-5, micro (accuracy) and macro-F1, per-class accuracy, confusion matrix."""
  pred = scores.argmax(-1)
  top5 = np.argsort(-scores, axis=-1)[:, :min(5, num_classes)]
  confusion = skm.confusion_matrix(labels, pred, labels=np.arange(num_classes))
  per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
  return {
      'top1': float((pred == labels).mean()),
      'top5': float((top5 == labels[:, None]).any(-1).mean()),
      'micro': float(skm.f1_score(labels, pred, average='micro')),
      'macro': float(skm.f1_score(labels, pred, average='macro')),
      'per_class_accuracy': per_class.tolist(),
      'confusion_matrix': confusion.tolist(),
      'num_examples': int(len(labels)),
  }


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


def train_linear_probe(train_features, train_labels, num_classes: int, *, epochs: int,
                       batch_size: int, lr: float, weight_decay: float, momentum: float = 0.9,
                       seed: int = 0):
  """Softmax regression on cached features: SGD momentum, cosine lr, decoupled wd.

  Features are standardised with the training mean/std first (so one lr fits
  every encoder width); the returned ``predict`` applies the same transform.

  Returns:
    predict(features) -> [n, num_classes] logits.
  """
  mean, std = train_features.mean(0), train_features.std(0) + 1e-6
  x_all = jnp.asarray((train_features - mean) / std, jnp.float32)
  y_all = jnp.asarray(train_labels, jnp.int32)
  n, dim = x_all.shape
  steps_per_epoch = max(1, n // batch_size)
  schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(weight_decay),
                   optax.sgd(schedule, momentum=momentum))
  params = {'w': jnp.zeros((dim, num_classes)), 'b': jnp.zeros((num_classes,))}
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = x @ params['w'] + params['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(carry, key):
    perm = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]

    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, x_all[idx], y_all[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    carry, _ = jax.lax.scan(step, carry, perm.reshape(steps_per_epoch, batch_size))
    return carry

  carry = (params, opt_state)
  for key in jax.random.split(jax.random.PRNGKey(seed), epochs):
    carry = epoch(carry, key)
  params = jax.device_get(carry[0])

  def predict(features):
    return ((features - mean) / std) @ params['w'] + params['b']

  return predict
