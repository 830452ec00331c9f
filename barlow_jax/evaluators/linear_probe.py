"""Linear probes on a frozen encoder: on cached features, or on augmented views on the fly.

Both train the same softmax classifier with the same optimiser (SGD momentum,
cosine learning rate, weight decay added to the gradient, as torch's SGD) on
standardised features. ``train_linear_probe`` fits cached features with a
``lax.scan`` per epoch (seconds); ``train_augmented_probe`` encodes a fresh
augmented view of every batch with the frozen encoder, one jitted step per
batch, through the training loop every stage uses (runtime/loop.py), so it
logs, checkpoints into its own workdir and resumes like them.
"""

import functools
from typing import NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
from barlow_jax.models import pretrained
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import loop
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import writers


class ProbeHParams(NamedTuple):
  """How a probe trains: SGD momentum, cosine lr, weight decay added to the gradient."""
  epochs: int  # Passes over the data (each drops its last n % batch_size examples).
  batch_size: int  # Examples per step.
  lr: float  # Peak learning rate.
  weight_decay: float  # L2 coefficient.
  momentum: float = 0.9
  seed: int = 0  # The data order (and the augmented probe's views).

  @classmethod
  def of(cls, probe, seed: int) -> 'ProbeHParams':
    """From a config's ``probe`` section (epochs, batch_size, lr, weight_decay, momentum)."""
    return cls(probe.epochs, probe.batch_size, probe.lr, probe.weight_decay, probe.momentum, seed)


def feature_standardizer(train_features: np.ndarray,
                         per_feature: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) of the training features; the probes divide by std.

  Standardising first lets one learning rate fit every encoder width. With
  ``per_feature=False`` every feature is divided by the same std (that of all
  centred features): a probe folded into a layer that keeps training
  (fine-tuning) must not multiply a nearly constant feature by 1 / its tiny std.
  """
  mean = train_features.mean(0)
  if per_feature:
    return mean, train_features.std(0) + 1e-6
  return mean, np.full_like(mean, (train_features - mean).std() + 1e-6)


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


def train_linear_probe(train_features, train_labels, num_classes: int, hparams: ProbeHParams,
                       *, batch_indices: Optional[np.ndarray] = None, per_feature: bool = True):
  """predict(features) -> [n, num_classes] logits of fit_linear_probe's classifier."""
  return _probe_predictor(*fit_linear_probe(train_features, train_labels, num_classes, hparams,
                                            batch_indices=batch_indices, per_feature=per_feature))


def as_dense(params: dict, mean: np.ndarray, std: np.ndarray) -> dict:
  """The probe as a Dense layer on raw features: standardisation folded into its weights.

  ((x - mean) / std) @ w + b == x @ (w / std) + (b - (mean / std) @ w).

  Returns:
    {'kernel': [F, K], 'bias': [K]} float32, as flax.linen.Dense names them.
  """
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)
  kernel = w / std[:, None]
  bias = b - (mean / std) @ w
  return {'kernel': kernel.astype(np.float32), 'bias': bias.astype(np.float32)}


def fit_linear_probe(train_features, train_labels, num_classes: int, hparams: ProbeHParams, *,
                     batch_indices: Optional[np.ndarray] = None, per_feature: bool = True):
  """Softmax regression on cached features: SGD momentum, cosine lr, weight decay.

  Features are standardised with the training mean/std first
  (feature_standardizer); predictions must apply the same transform
  (_probe_predictor, or as_dense to fold it into the weights).

  Args:
    train_features: [n, F] features.
    train_labels: [n] int labels.
    num_classes: K.
    hparams: epochs, batch size, optimiser and the seed of the per-epoch shuffles.
    batch_indices: [steps, batch_size] rows of ``train_features`` for each
      step, replacing the epochs of shuffles (e.g. another pipeline's order);
      the cosine then runs over these steps.
    per_feature: standardise each feature by its own std (else by one std).

  Returns:
    (params {'w': [F, K], 'b': [K]}, mean [F], std [F]).
  """
  mean, std = feature_standardizer(train_features, per_feature)
  x_all = jnp.asarray((train_features - mean) / std, jnp.float32)
  y_all = jnp.asarray(train_labels, jnp.int32)
  n, dim = x_all.shape
  # A labelled fraction may hold fewer examples than a batch.
  batch_size, epochs = min(hparams.batch_size, n), hparams.epochs
  steps_per_epoch = n // batch_size
  total = epochs * steps_per_epoch if batch_indices is None else len(batch_indices)
  tx = probe_optimizer(hparams.lr, hparams.weight_decay, hparams.momentum, total)

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
    for key in jax.random.split(jax.random.PRNGKey(hparams.seed), epochs):
      order = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]
      carry = fit(carry, order.reshape(steps_per_epoch, batch_size))
  return jax.device_get(carry[0]), mean, std


def make_augmented_probe_step(config, model, view: augment.ViewAugment,
                              tx: optax.GradientTransformation, mean, std, seed: int,
                              spec: datasets.DatasetSpec):
  """Jitted ``step(head, batch, variables) -> (head, metrics)`` of the on-the-fly probe.

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
    {'image': uint8 [N, H, W, 3], 'label': int [N]} with N the global batch,
    ``variables`` the frozen encoder's.
  """
  crop, dtype = config.augment.crop_size, jnp.dtype(config.model.dtype)
  base_key = jax.random.PRNGKey(seed)
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(head, batch, variables):
    params, opt_state, i = head
    x = augment.model_inputs(batch['image'], jax.random.fold_in(base_key, i), view, crop,
                             spec.mean, spec.std, dtype)
    # Gradients are taken with respect to the head's params only: the encoder is frozen.
    features = model.apply(variables, x, train=False)['features'].astype(jnp.float32)
    params, opt_state, metrics = probe_update(tx, params, opt_state, (features - mean) / std,
                                              batch['label'])
    return (params, opt_state, i + 1), metrics

  return step


def train_augmented_probe(encoder: pretrained.Pretrained, data: pipeline.TrainData,
                          view: augment.ViewAugment, standardizer: tuple[np.ndarray, np.ndarray],
                          workdir: str, hparams: ProbeHParams, mesh=None):
  """Linear probe on features of augmented train images, computed on the fly.

  The same classifier, optimiser and schedule as train_linear_probe, but
  every step encodes a fresh augmented view of its batch. Features cannot be
  standardised by statistics of augmented features known in advance, so the
  fixed (mean, std) of the clean training features standardise both the
  training views and, through ``predict``, the clean test features. The head
  is saved at the end into ``workdir``/checkpoints; a rerun resumes.

  Args:
    encoder: the frozen encoder (its config, model without axis_name, and
      {'params', 'batch_stats'}).
    data: the training examples (pipeline.load_train_data; its fraction is
      the balanced label fraction).
    view: the training augmentation.
    standardizer: ([F] mean, [F] std) from feature_standardizer of the clean
      training features.
    workdir: the probe's own workdir (never the pretraining one).
    hparams: as train_linear_probe's; steps are ``epochs * (data.num_global
      // batch_size)``, the batch is global (divisible by the device and
      process counts), the seed gives the data order (pipeline.train_dataset)
      and the augmentation keys.
    mesh: the data mesh; default all devices.

  Returns:
    predict(features) -> [n, num_classes] logits, for clean features.
  """
  mesh = mesh or mesh_lib.make_mesh()
  (mean, std), config, batch_size = standardizer, encoder.config, hparams.batch_size
  steps_per_epoch = max(1, data.num_global // batch_size)
  total = hparams.epochs * steps_per_epoch
  tx = probe_optimizer(hparams.lr, hparams.weight_decay, hparams.momentum, total)
  replicated = mesh_lib.replicated(mesh)
  params = init_probe(len(mean), data.spec.num_classes)
  head = jax.device_put((params, tx.init(params), jnp.int32(0)), replicated)
  mngr = checkpoint.manager(workdir, max_to_keep=1)
  head = checkpoint.restore_latest(mngr, head)
  start = int(head[2])
  step = make_augmented_probe_step(config, encoder.model, view, tx, mean, std, hparams.seed,
                                   data.spec)
  batches = pipeline.global_batches(
      data, batch_size, hparams.seed, start, config.cache_dataset,
      host_crop.HostCrops(config.augment.crop_size, (view,)), mesh_lib.batch_sharded(mesh))
  logging.info('Augmented probe: %d examples, %d steps of %d (%d epochs), start at %d.',
               data.num_global, total, batch_size, hparams.epochs, start)
  # A line per epoch; one save, at the end.
  run = loop.Run(loop.Schedule(total, log_every=steps_per_epoch, save_every=total), start, mngr,
                 writers.create(workdir, config),
                 loop.Progress(total, batch_size, start, console_keys=('loss', 'accuracy')))
  with loop.finishing(run):
    head = loop.run_steps(head, step, batches, run,
                          frozen=(jax.device_put(encoder.variables, replicated),))
  return _probe_predictor(head[0], mean, std)
