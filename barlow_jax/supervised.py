"""Supervised learning with a Barlow Twins term (seed 001, eq. 3.5): CE + CE + gamma * BT.

  python -m barlow_jax.main --config=configs/cifar_supervised_bt.py --config.gamma=0.001 --workdir=runs/sbt

Two weight-shared branches (one SupervisedModel applied to two views) each
give class logits and an embedding; the loss is

  CE(logits1, y) + CE(logits2, y) + gamma * BT(z1, z2).

CE is the mean over the labelled examples of the global batch (labels < 0,
e.g. STL-10's unlabelled images, only enter the BT term); BT is the
cross-device loss of losses.py with ``lambd`` on the off-diagonal term. With
gamma = 0 the BT term is only logged (on stop_gradient embeddings), so the
loss is exactly the sum of the two cross-entropies: the baseline under the
same augmentation. With ``num_branches = 1`` the stage is plain supervised
training on one view (fine-tuning, the supervised baselines).

The step is the one of train.py: ``jax.shard_map`` over the data axis,
BatchNorm with ``axis_name``, keys drawn for the global batch and sliced per
device, and (with ``check_vma=True``) no pmean of gradients.

At the end the run is evaluated on every example once (padded batches):
train accuracy (train images, no augmentation), test accuracy, and
augmented-test accuracy (test images through ``config.eval.aug_view``). It
writes results.json, results.md, confusion_matrix.png and, with an
embedding head, PCA / t-SNE plots of augmented train images and the
cross-correlation matrix of one batch.
"""

import functools
import json
import math
import os
from typing import Callable, Optional

from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from barlow_jax import augment
from barlow_jax import config_validation
from barlow_jax import evaluate
from barlow_jax import input_pipeline
from barlow_jax import losses
from barlow_jax import models
from barlow_jax import optim
from barlow_jax import plots
from barlow_jax import train

DATA_AXIS = train.DATA_AXIS
CONSOLE_KEYS = ('loss', 'ce1', 'ce2', 'bt_loss', 'accuracy', 'learning_rate')
# The splits a run reports, in table order.
SPLITS = ('train', 'test', 'aug_test')


def branch_keys(rng: jax.Array, step: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """One key per example and branch for the global batch of ``step``.

  Drawn for the global batch and sliced per device by shard_map, so example
  i gets the same augmentation whatever the device count.
  """
  k1, k2 = jax.random.split(jax.random.fold_in(rng, step))
  return jax.random.split(k1, n), jax.random.split(k2, n)


def _total_loss(out1: dict, out2: Optional[dict], labels, gamma: float, lambd: float,
                axis_name: Optional[str]):
  """Eq. 3.5 and its parts from the model outputs of the branches.

  Returns:
    (loss, metrics dict); every value identical on every device.
  """
  ce1, acc1 = losses.masked_cross_entropy(out1['logits'], labels, axis_name)
  if out2 is None:
    return ce1, {'loss': ce1, 'ce1': ce1, 'accuracy': acc1}
  ce2, acc2 = losses.masked_cross_entropy(out2['logits'], labels, axis_name)
  loss = ce1 + ce2
  metrics = {'ce1': ce1, 'ce2': ce2, 'accuracy': acc1, 'accuracy2': acc2}
  if 'embeddings' in out1:
    z1, z2 = out1['embeddings'], out2['embeddings']
    if gamma == 0:  # Logged, not trained: gamma * BT would still put 0 * grad (NaN-prone) in.
      z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
    terms = losses.barlow_twins_terms(z1, z2, axis_name)
    bt_loss = terms.on_diag + lambd * terms.off_diag
    metrics.update(bt_loss=bt_loss, on_diag=terms.on_diag, off_diag=terms.off_diag)
    if gamma > 0:
      loss = loss + gamma * bt_loss
  metrics['loss'] = loss
  return loss, metrics


def make_train_step(config, model: models.SupervisedModel, tx, mesh: Mesh,
                    lr_schedule: Callable) -> Callable:
  """Returns jitted ``train_step(state, batch) -> (state, metrics)``; state is donated.

  Args:
    config: a supervised config (configs/cifar_supervised_bt.py).
    model: the SupervisedModel, built with ``axis_name=DATA_AXIS``.
    tx: the optax transformation.
    mesh: the 1-D data mesh.
    lr_schedule: logged as 'learning_rate'.

  Returns:
    The step; ``batch`` is {'image': uint8 [N, H, W, 3], 'label': int32 [N]}
    sharded over the mesh, N the global batch; labels < 0 are unlabelled.
  """
  aug = config.augment
  spec = input_pipeline.dataset_spec(config.dataset)
  view1, view2 = augment.view_from_config(aug.view1), augment.view_from_config(aug.view2)
  dtype = jnp.dtype(config.model.dtype)
  gamma, lambd = float(config.gamma), float(config.lambd)
  two_branches = config.num_branches == 2

  def views(keys, images, view):
    x = augment.augment_batch(keys, images, view, aug.crop_size)
    return augment.normalize(x, spec.mean, spec.std).astype(dtype)

  def per_device(state, images, labels, keys1, keys2):
    x1 = views(keys1, images, view1)
    x2 = views(keys2, images, view2) if two_branches else None

    def loss_fn(params):
      # One forward pass per branch, as train.py does per view: BN statistics
      # are per branch and the running averages are updated in turn.
      out1, upd = model.apply({'params': params, 'batch_stats': state.batch_stats}, x1,
                              train=True, mutable=['batch_stats'])
      out2 = None
      if two_branches:
        out2, upd = model.apply({'params': params, 'batch_stats': upd['batch_stats']}, x2,
                                train=True, mutable=['batch_stats'])
      loss, metrics = _total_loss(out1, out2, labels, gamma, lambd, DATA_AXIS)
      return loss, (upd['batch_stats'], metrics)

    (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   learning_rate=lr_schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
      out_specs=(P(), P()), check_vma=True)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: train.TrainState, batch: dict):
    keys1, keys2 = branch_keys(state.rng, state.step, batch['image'].shape[0])
    return sharded(state, batch['image'], batch['label'], keys1, keys2)

  return train_step


def train_split(config) -> str:
  """The TFDS split trained on: unlabelled images are added only when BT uses them (§4.4)."""
  if config.gamma > 0 and config.get('unlabelled_split'):
    return f'{config.train_split}+{config.unlabelled_split}'
  return config.train_split


def with_backbone(state: train.TrainState, variables: dict) -> train.TrainState:
  """``state`` with the encoder's params and batch_stats taken from ``variables``.

  Args:
    state: a fresh TrainState of a SupervisedModel.
    variables: {'params', 'batch_stats'} of a model with a 'backbone' module
      of the same architecture (a Barlow Twins pretraining checkpoint).
  """
  params, stats = dict(state.params), dict(state.batch_stats)
  params['backbone'] = variables['params']['backbone']
  stats['backbone'] = variables['batch_stats']['backbone']
  return state.replace(params=params, batch_stats=stats)


def _train(config, workdir: str, model, mesh: Mesh, writer,
           init_variables: Optional[dict]) -> tuple[train.TrainState, int, int]:
  """Trains (or resumes) to the end; returns (state, total steps, train examples)."""
  data_config = ml_collections.ConfigDict(config.to_dict())
  data_config.train_split = train_split(config)
  data = input_pipeline.load_train_data(data_config)
  steps_per_epoch = max(1, data.num_global // config.batch_size)
  total_steps = optim.num_train_steps(config, steps_per_epoch)
  tx, lr_schedule = optim.create_optimizer(config, steps_per_epoch, total_steps)

  manager = train.checkpoint_manager(workdir, config)
  state = train.create_train_state(config, model, tx, mesh)
  if init_variables is not None:
    state = with_backbone(state, init_variables)
  state = train.restore_or_keep(manager, state)  # A resumed run keeps its own weights.
  start_step = int(state.step)
  logging.info('Split %r: %d examples, %d steps/epoch, %d steps, start at %d; gamma %g.',
               data_config.train_split, data.num_global, steps_per_epoch, total_steps,
               start_step, config.gamma)

  train_step = make_train_step(config, model, tx, mesh, lr_schedule)
  local_batch = config.batch_size // jax.process_count()
  batches = input_pipeline.prefetch_to_mesh(
      input_pipeline.train_dataset(data, local_batch, config.seed, start_step,
                                   cache=config.cache_dataset).as_numpy_iterator(),
      NamedSharding(mesh, P(DATA_AXIS)))
  progress = train.Progress(total_steps, config.batch_size, start_step, console_keys=CONSOLE_KEYS)
  try:
    state = train.run_steps(config, state, train_step, batches, manager, writer, progress,
                            start_step, total_steps)
  finally:
    manager.wait_until_finished()  # Never leave a half-written save behind.
  return state, total_steps, data.num_global


def predict_split(config, predict: Callable, variables: dict, split: str, mesh: Mesh,
                  seed: int = 0, keys=('logits',), max_examples: Optional[int] = None) -> dict:
  """Model outputs for the labelled examples of ``split``, each exactly once.

  Args:
    config: the supervised config.
    predict: from evaluate.make_inference_fn.
    variables: {'params', 'batch_stats'}, replicated over ``mesh``.
    split: TFDS split expression.
    mesh: the data mesh.
    seed: augmentation seed (batch i uses fold_in(PRNGKey(seed), i)).
    keys: which model outputs to return.
    max_examples: stop after this many (global) examples; None for all.

  Returns:
    {key: [n, ...] float32 for each of keys, 'label': [n] int64}, numpy, on every process.
  """
  spec = input_pipeline.dataset_spec(config.dataset)
  builder = input_pipeline.get_builder(config.dataset, config.data_dir, config.download)
  local_batch = config.eval.batch_size // jax.process_count()
  num_batches = evaluate.num_eval_batches(builder, split, local_batch)
  if max_examples is not None:
    # The same count on every process, so the collectives line up.
    num_batches = min(num_batches, math.ceil(max_examples / config.eval.batch_size))
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  batches = input_pipeline.eval_batches(builder, spec, split, local_batch, num_batches=num_batches)
  base_key = jax.random.PRNGKey(seed)
  collected = {k: [] for k in (*keys, 'label')}
  for i, batch in enumerate(input_pipeline.prefetch_to_mesh(batches, sharding)):
    if i == num_batches:
      break
    out = predict(variables, batch['image'], jax.random.fold_in(base_key, i))
    gathered = multihost_utils.process_allgather(
        {**{k: out[k] for k in keys}, 'label': batch['label'], 'mask': batch['mask']}, tiled=True)
    keep = gathered['mask'] & (gathered['label'] >= 0)
    for k in collected:
      collected[k].append(gathered[k][keep])
  result = {k: np.concatenate(v) for k, v in collected.items()}
  result['label'] = result['label'].astype(np.int64)
  if max_examples is not None:
    result = {k: v[:max_examples] for k, v in result.items()}
  return result


def predict_fns(config, model: models.SupervisedModel) -> dict:
  """{None: no augmentation, 'view1': ..., 'view2': ...} prediction functions."""
  fns = {None: evaluate.make_inference_fn(config, model, None)}
  for name in ('view1', 'view2'):
    fns[name] = evaluate.make_inference_fn(config, model,
                                           augment.view_from_config(config.augment[name]))
  return fns


def evaluate_accuracy(config, fns: dict, variables: dict, mesh: Mesh) -> dict:
  """evaluate.classification_metrics on train, test and augmented test.

  Args:
    config: the supervised config.
    fns: from predict_fns.
    variables: the model's variables, replicated over ``mesh``.
    mesh: the data mesh.

  Returns:
    {'train': metrics, 'test': metrics, 'aug_test': metrics}.
  """
  num_classes = input_pipeline.dataset_spec(config.dataset).num_classes
  sources = {'train': (config.eval.train_split, None),
             'test': (config.eval.test_split, None),
             'aug_test': (config.eval.test_split, config.eval.aug_view)}
  results = {}
  for name in SPLITS:
    split, view = sources[name]
    out = predict_split(config, fns[view], variables, split, mesh, seed=config.seed)
    results[name] = evaluate.classification_metrics(out['logits'], out['label'], num_classes)
    logging.info('%s accuracy %.4f (%d examples).', name, results[name]['top1'],
                 results[name]['num_examples'])
  return results


def embedding_figures(config, fns: dict, variables: dict, mesh: Mesh, workdir: str,
                      class_names, title: str) -> dict:
  """PCA / t-SNE PNGs of augmented train images and the C heatmap of one batch.

  Writes embeddings_pca.png, embeddings_tsne.png (config.plots.tsne),
  cross_correlation.png and embeddings_2d.npz (the 2-D points, for the
  sweep's side-by-side figures) into ``workdir``.

  Returns:
    {'mean_diag_c': mean of diag(C), 'mean_abs_offdiag_c': mean |C_ij|, i != j}.
  """
  n, split = config.plots.num_examples, config.eval.train_split
  out1 = predict_split(config, fns['view1'], variables, split, mesh, seed=config.seed,
                       keys=('representation', 'embeddings'), max_examples=n)
  # The other branch of the same images, for C (another seed: independent draws).
  out2 = predict_split(config, fns['view2'], variables, split, mesh, seed=config.seed + 1,
                       keys=('embeddings',), max_examples=min(n, config.batch_size))
  batch = len(out2['embeddings'])
  c = np.asarray(losses.cross_correlation(out1['embeddings'][:batch], out2['embeddings']))
  if jax.process_index() > 0:
    return {}
  plots.cross_correlation_png(c, os.path.join(workdir, 'cross_correlation.png'),
                              f'C of one batch ({batch}), {title}')
  features, labels = out1[config.plots.features], out1['label']
  methods = ('pca', 'tsne') if config.plots.tsne else ('pca',)
  points = {m: plots.project_2d(features, m, config.seed) for m in methods}
  for m, p in points.items():
    plots.embeddings_png([(p, labels, title)], os.path.join(workdir, f'embeddings_{m}.png'),
                         class_names, f'{m.upper()} of augmented train {config.plots.features}')
  np.savez(os.path.join(workdir, 'embeddings_2d.npz'), labels=labels, **points)
  off = c[~np.eye(len(c), dtype=bool)]
  return {'mean_diag_c': float(np.diag(c).mean()), 'mean_abs_offdiag_c': float(np.abs(off).mean())}


def run(config, workdir: str, init_variables: Optional[dict] = None,
        extra_results: Optional[dict] = None) -> dict:
  """Trains, evaluates and writes results into ``workdir``; resumes if interrupted.

  Args:
    config: a supervised config (configs/cifar_supervised_bt.py).
    workdir: checkpoints, config.json, TensorBoard scalars, results.
    init_variables: {'params', 'batch_stats'} whose 'backbone' initialises
      the encoder (fine-tuning); None trains from scratch.
    extra_results: added to results.json (e.g. where the encoder came from).

  Returns:
    The results dict written to results.json.
  """
  config_validation.validate_supervised(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = train.make_mesh()
  model = models.create_supervised_model(config, axis_name=DATA_AXIS)
  train._write_config(workdir, config)  # pylint: disable=protected-access
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  try:
    state, total_steps, num_train = _train(config, workdir, model, mesh, writer, init_variables)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    fns = predict_fns(config, model)
    metrics = evaluate_accuracy(config, fns, variables, mesh)
    writer.write_scalars(total_steps, {f'eval/{k}_accuracy': m['top1'] for k, m in metrics.items()})
  finally:
    writer.flush()

  builder = input_pipeline.get_builder(config.dataset, config.data_dir, config.download)
  class_names = list(builder.info.features['label'].names)
  results = {
      'gamma': float(config.gamma), 'seed': int(config.seed), 'lambd': float(config.lambd),
      'ablation': config.get('ablation'), 'dataset': config.dataset,
      'train_split': train_split(config), 'fraction': float(config.fraction),
      'num_train': int(num_train), 'num_branches': int(config.num_branches),
      'model': config.model.to_dict(), 'num_steps': int(total_steps),
      'epochs': float(total_steps * config.batch_size / num_train),
      **{f'{k}_accuracy': m['top1'] for k, m in metrics.items()},
      **metrics, 'class_names': class_names, **(extra_results or {}),
  }
  if config.plots.num_examples > 0 and config.model.embedding and config.num_branches == 2:
    results.update(embedding_figures(config, fns, variables, mesh, workdir, class_names,
                                     f'gamma = {config.gamma:g}'))
  if jax.process_index() == 0:
    write_results(results, workdir)
  return results


def write_results(results: dict, workdir: str) -> None:
  """results.md, confusion_matrix.png, then results.json (last: it marks the run done)."""
  plots.confusion_matrix_png(results['test']['confusion_matrix'], results['class_names'],
                             os.path.join(workdir, 'confusion_matrix.png'),
                             f"test, gamma = {results['gamma']:g}")
  m = results['model']
  lines = [f"# Supervised run: gamma = {results['gamma']:g}, seed {results['seed']}", '',
           f"{m['encoder']} width {m['width']}, {results['dataset']} "
           f"({results['train_split']}, fraction {results['fraction']}, {results['num_train']} "
           f"images), {results['num_branches']} branch(es), ablation {results['ablation']}, "
           f"{results['num_steps']} steps ({results['epochs']:.2f} epochs).", '',
           '| split | top-1 | top-5 | micro | macro-F1 | examples |', '|---|---|---|---|---|---|']
  if results['train']['num_examples'] != results['num_train']:
    # A fraction (or an added unlabelled split): the train row is not the trained-on set.
    lines[4:4] = [f"The train row is every labelled image of eval.train_split "
                  f"({results['train']['num_examples']}), not only the {results['num_train']} "
                  "trained on.", '']
  names = {'train': 'train', 'test': 'test', 'aug_test': 'augmented test'}
  for k in SPLITS:
    r = results[k]
    lines.append(f"| {names[k]} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} | "
                 f"{100 * r['micro']:.2f} | {100 * r['macro']:.2f} | {r['num_examples']} |")
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  # Written last and atomically: the sweep takes its presence as "run finished".
  tmp = os.path.join(workdir, 'results.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, os.path.join(workdir, 'results.json'))
