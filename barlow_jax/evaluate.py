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

import functools
import json
import math
import os
import time
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

from barlow_jax import augment
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


def make_inference_fn(config, model, view: Optional[augment.ViewAugment] = None,
                      outputs: Optional[tuple[str, ...]] = None):
  """Jitted ``(variables, uint8 images, key) -> {output: float32}`` in inference mode.

  Images become the network's input through augment.model_inputs: without
  ``view`` scaled, centre-cropped to ``config.augment.crop_size`` if larger and
  standardised (``key`` unused); with ``view`` augmented first, example i with
  ``split(key, n)[i]`` for the global batch of n, so a view does not depend on
  the device count. ``outputs`` picks the model outputs (None: all); the rest
  are not computed. Build it once and reuse it: each call compiles anew.
  """
  spec = input_pipeline.dataset_spec(config.dataset)
  crop = config.augment.crop_size
  dtype = jnp.dtype(config.model.dtype)

  @jax.jit
  def apply(variables, images, key):
    x = augment.model_inputs(images, key, view, crop, spec.mean, spec.std, dtype)
    out = model.apply(variables, x, train=False)
    return {k: v.astype(jnp.float32) for k, v in out.items() if outputs is None or k in outputs}

  return apply


def make_feature_fn(config, model, view: Optional[augment.ViewAugment] = None):
  """Jitted ``(variables, uint8 images, key) -> float32 features``; see make_inference_fn.

  Pass it to extract_features when features are extracted repeatedly (the
  pretraining kNN monitor).
  """
  apply = make_inference_fn(config, model, view, outputs=('features',))
  return lambda variables, images, key: apply(variables, images, key)['features']


def extract_features(config, model, variables, split: str, batch_size: int, mesh=None,
                     feature_fn=None, seed: int = 0):
  """Frozen-encoder features of every example of ``split``, once each.

  Args:
    config: the pretraining config (dataset, crop size, dtype).
    model: the BarlowTwinsModel, without axis_name.
    variables: {'params', 'batch_stats'}.
    split: TFDS split expression.
    batch_size: global batch of the extraction.
    mesh: the data mesh; default all devices.
    feature_fn: from make_feature_fn(config, model[, view]); None builds one
      without augmentation.
    seed: with an augmenting feature_fn, batch i is augmented with
      ``fold_in(PRNGKey(seed), i)``.

  Returns:
    (features [n, F] float32, labels [n] int64) as numpy, in the order of ``split``
    whatever the process count, on every process.
  """
  mesh = mesh or train.make_mesh()
  spec = input_pipeline.dataset_spec(config.dataset)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir, config.download)
  local_batch = batch_size // jax.process_count()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.DATA_AXIS))
  features = feature_fn or make_feature_fn(config, model)
  base_key = jax.random.PRNGKey(seed)

  feats, labels, index = [], [], []
  batches = input_pipeline.eval_batches(builder, spec, split, local_batch,
                                        num_batches=num_eval_batches(builder, split, local_batch))
  for i, batch in enumerate(input_pipeline.prefetch_to_mesh(batches, sharding)):
    out = features(variables, batch['image'], jax.random.fold_in(base_key, i))
    gathered = multihost_utils.process_allgather(
        {'f': out, 'y': batch['label'], 'i': batch['index'], 'm': batch['mask']}, tiled=True)
    feats.append(gathered['f'][gathered['m']])
    labels.append(gathered['y'][gathered['m']])
    index.append(gathered['i'][gathered['m']])
  # The split's order, whatever the process count: label fractions chosen from
  # these labels are the ones input_pipeline.load_train_data chooses.
  order = np.argsort(np.concatenate(index), kind='stable')
  return np.concatenate(feats)[order], np.concatenate(labels)[order].astype(np.int64)


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


def feature_standardizer(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) per feature of the training features; the probes divide by std.

  Standardising first lets one learning rate fit every encoder width.
  """
  return train_features.mean(0), train_features.std(0) + 1e-6


def probe_optimizer(lr: float, weight_decay: float, momentum: float,
                    total_steps: int) -> optax.GradientTransformation:
  """SGD momentum, cosine lr from ``lr`` to 0, weight decay added to the gradient (torch's SGD)."""
  schedule = optax.cosine_decay_schedule(lr, total_steps)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum))


def init_probe(dim: int, num_classes: int) -> dict:
  return {'w': jnp.zeros((dim, num_classes)), 'b': jnp.zeros((num_classes,))}


def probe_update(tx: optax.GradientTransformation, params: dict, opt_state, x, y):
  """One step of softmax regression on standardised features.

  Args:
    tx: from probe_optimizer.
    params: {'w': [F, K], 'b': [K]}.
    opt_state: tx's state.
    x: [n, F] standardised features (a global batch under jit is fine: XLA
      reduces the mean loss over the devices).
    y: [n] int labels.

  Returns:
    (params, opt_state, {'loss', 'accuracy'} of the batch before the update).
  """
  def loss_fn(params):
    logits = x @ params['w'] + params['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  accuracy = (logits.argmax(-1) == y).mean()
  return optax.apply_updates(params, updates), opt_state, {'loss': loss, 'accuracy': accuracy}


def _probe_predictor(params: dict, mean: np.ndarray, std: np.ndarray):
  params = jax.device_get(params)

  def predict(features):
    return ((features - mean) / std) @ params['w'] + params['b']

  return predict


def train_linear_probe(train_features, train_labels, num_classes: int, *, epochs: int,
                       batch_size: int, lr: float, weight_decay: float, momentum: float = 0.9,
                       seed: int = 0, batch_indices: Optional[np.ndarray] = None):
  """Softmax regression on cached features: SGD momentum, cosine lr, weight decay.

  Features are standardised with the training mean/std first
  (feature_standardizer); the returned ``predict`` applies the same transform.

  Args:
    train_features: [n, F] features.
    train_labels: [n] int labels.
    num_classes: K.
    epochs: passes over the data (each drops its last n % batch_size examples).
    batch_size: examples per step.
    lr: peak learning rate.
    weight_decay: L2 coefficient.
    momentum: SGD momentum.
    seed: the per-epoch shuffles.
    batch_indices: [steps, batch_size] rows of ``train_features`` for each
      step, replacing the epochs of shuffles (e.g. another pipeline's order);
      the cosine then runs over these steps.

  Returns:
    predict(features) -> [n, num_classes] logits.
  """
  mean, std = feature_standardizer(train_features)
  x_all = jnp.asarray((train_features - mean) / std, jnp.float32)
  y_all = jnp.asarray(train_labels, jnp.int32)
  n, dim = x_all.shape
  steps_per_epoch = max(1, n // batch_size)
  total = epochs * steps_per_epoch if batch_indices is None else len(batch_indices)
  tx = probe_optimizer(lr, weight_decay, momentum, total)

  @jax.jit
  def fit(carry, idx):
    def step(carry, rows):
      params, opt_state, _ = probe_update(tx, *carry, x_all[rows], y_all[rows])
      return (params, opt_state), None

    return jax.lax.scan(step, carry, idx)[0]

  params = init_probe(dim, num_classes)
  carry = (params, tx.init(params))
  if batch_indices is not None:
    carry = fit(carry, jnp.asarray(batch_indices, jnp.int32))
  else:
    for key in jax.random.split(jax.random.PRNGKey(seed), epochs):
      order = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]
      carry = fit(carry, order.reshape(steps_per_epoch, batch_size))
  return _probe_predictor(carry[0], mean, std)


def make_augmented_probe_step(config, model, view: augment.ViewAugment,
                              tx: optax.GradientTransformation, mean, std, seed: int):
  """Jitted ``step(head, variables, batch) -> (head, metrics)`` of the on-the-fly probe.

  One program per global batch: augment the uint8 images on the device, run
  the frozen encoder in inference mode (BatchNorm with its running
  statistics), standardise the features with the fixed ``mean``/``std`` and
  update the linear head only. Plain jit on global arrays: with ``batch``
  sharded over the data mesh, XLA splits the per-example work over the
  devices and inserts the reduction of the mean loss.

  Args:
    config: the pretraining config (dataset, crop size, dtype).
    model: the BarlowTwinsModel, without axis_name.
    view: the training augmentation.
    tx: from probe_optimizer.
    mean: [F] feature mean (of the clean training features).
    std: [F] feature std, likewise.
    seed: example i of step s is augmented with
      ``split(fold_in(PRNGKey(seed), s), N)[i]``: the same view whatever the
      device or process count.

  Returns:
    The step; ``head = (params, opt_state, step)`` is donated, ``batch`` is
    {'image': uint8 [N, H, W, 3], 'label': int [N]} with N the global batch.
  """
  spec = input_pipeline.dataset_spec(config.dataset)
  crop, dtype = config.augment.crop_size, jnp.dtype(config.model.dtype)
  base_key = jax.random.PRNGKey(seed)
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(head, variables, batch):
    params, opt_state, i = head
    x = augment.model_inputs(batch['image'], jax.random.fold_in(base_key, i), view, crop,
                             spec.mean, spec.std, dtype)
    # Gradients are taken with respect to the head's params only: the encoder is frozen.
    features = model.apply(variables, x, train=False)['features'].astype(jnp.float32)
    params, opt_state, metrics = probe_update(tx, params, opt_state, (features - mean) / std,
                                              batch['label'])
    return (params, opt_state, i + 1), metrics

  return step


def train_augmented_probe(config, model, variables, data: input_pipeline.TrainData,
                          view: augment.ViewAugment, mean: np.ndarray, std: np.ndarray, *,
                          epochs: int, batch_size: int, lr: float, weight_decay: float,
                          momentum: float = 0.9, seed: int = 0, mesh=None):
  """Linear probe on features of augmented train images, computed on the fly.

  The same classifier, optimiser and schedule as train_linear_probe, but
  every step encodes a fresh augmented view of its batch. Features cannot be
  standardised by statistics of augmented features known in advance, so the
  fixed ``mean``/``std`` (of the clean training features) standardise both
  the training views and, through ``predict``, the clean test features.

  Args:
    config: the pretraining config.
    model: the BarlowTwinsModel, without axis_name.
    variables: the frozen {'params', 'batch_stats'}.
    data: the training examples (input_pipeline.load_train_data; its
      fraction is the balanced label fraction).
    view: the training augmentation.
    mean: [F] from feature_standardizer of the clean training features.
    std: [F], likewise.
    epochs: steps are ``epochs * (data.num_global // batch_size)``; batches
      run over the concatenated per-epoch shuffles of input_pipeline.
    batch_size: global batch, divisible by the device and process counts.
    lr: peak learning rate (cosine to 0).
    weight_decay: L2 coefficient.
    momentum: SGD momentum.
    seed: data order (input_pipeline.train_dataset) and augmentation keys.
    mesh: the data mesh; default all devices.

  Returns:
    predict(features) -> [n, num_classes] logits, for clean features.
  """
  mesh = mesh or train.make_mesh()
  steps_per_epoch = max(1, data.num_global // batch_size)
  total = epochs * steps_per_epoch
  tx = probe_optimizer(lr, weight_decay, momentum, total)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = init_probe(len(mean), data.spec.num_classes)
  head = jax.device_put((params, tx.init(params), jnp.int32(0)), replicated)
  variables = jax.device_put(variables, replicated)
  step = make_augmented_probe_step(config, model, view, tx, mean, std, seed)
  stream = input_pipeline.train_dataset(data, batch_size // jax.process_count(), seed,
                                        cache=config.get('cache_dataset', True))
  batches = input_pipeline.prefetch_to_mesh(
      stream.as_numpy_iterator(),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.DATA_AXIS)))
  logging.info('Augmented probe: %d examples, %d steps of %d (%d epochs).', data.num_global,
               total, batch_size, epochs)
  summed, start = None, time.time()
  for i in range(total):
    head, metrics = step(head, variables, next(batches))
    summed = metrics if summed is None else jax.tree.map(jnp.add, summed, metrics)
    if (i + 1) % steps_per_epoch == 0:  # One host sync per epoch.
      m = {k: float(v) / steps_per_epoch for k, v in jax.device_get(summed).items()}
      logging.info('probe epoch %d/%d  loss %.4f  accuracy %.4f  %.0f img/s',
                   (i + 1) // steps_per_epoch, epochs, m['loss'], m['accuracy'],
                   steps_per_epoch * batch_size / max(time.time() - start, 1e-9))
      summed, start = None, time.time()
  return _probe_predictor(head[0], mean, std)
