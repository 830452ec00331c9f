"""Supervised learning with a Barlow Twins term (Ramyaa 2022, eq. 3.5): CE + CE + gamma * BT.

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

The step, the loop, checkpoints and resume are the trainer's (trainer.py),
shared with pretraining; this module brings the model and the loss.

At the end the run is evaluated on every example once (padded batches):
train accuracy (train images, no augmentation), test accuracy, and
augmented-test accuracy (test images through ``config.eval.aug_view``). It
writes results.json, results.md, confusion_matrix.png and, with an
embedding head, PCA / t-SNE plots of augmented train images and the
cross-correlation matrix of one batch.
"""

import os
from typing import Optional

from absl import logging
from etils import epath
import jax
import numpy as np
from jax.sharding import Mesh

from barlow_jax import config_validation
from barlow_jax import losses
from barlow_jax import plots
from barlow_jax import trainer
from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.evaluators import metrics as metrics_lib
from barlow_jax.evaluators import predict
from barlow_jax.models import factory
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.runtime import writers
from barlow_jax.runtime.mesh import DATA_AXIS

CONSOLE_KEYS = ('loss', 'ce1', 'ce2', 'bt_loss', 'accuracy', 'learning_rate')
# The splits a run reports, in table order.
SPLITS = ('train', 'test', 'aug_test')


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


def make_loss_fn(model: factory.SupervisedModel, gamma: float, lambd: float) -> trainer.LossFn:
  """Eq. 3.5 over one or two branches (one model applied to each view)."""

  def loss_fn(params, batch_stats, inputs, labels):
    outputs, batch_stats = trainer.apply_per_view(model, params, batch_stats, inputs)
    out2 = outputs[1] if len(outputs) == 2 else None
    loss, metrics = _total_loss(outputs[0], out2, labels, gamma, lambd, DATA_AXIS)
    return loss, (batch_stats, metrics)

  return loss_fn


def train_split(config) -> str:
  """The TFDS split trained on: unlabelled images are added only when BT uses them (§4.4)."""
  if config.gamma > 0 and config.get('unlabelled_split'):
    return f'{config.train_split}+{config.unlabelled_split}'
  return config.train_split


def predict_fns(config, model: factory.SupervisedModel, spec: datasets.DatasetSpec) -> dict:
  """{None: no augmentation, 'view1': ..., 'view2': ...} prediction functions."""
  fns = {None: predict.make_predict_fn(config, model, None, spec=spec)}
  for name in ('view1', 'view2'):
    fns[name] = predict.make_predict_fn(config, model,
                                        augment.view_from_config(config.augment[name]), spec=spec)
  return fns


def evaluate_accuracy(config, dataset: datasets.Dataset, fns: dict, variables: dict,
                      mesh: Mesh) -> dict:
  """Classification metrics on train, test and augmented test.

  Args:
    config: the supervised config.
    dataset: its resolved dataset.
    fns: from predict_fns.
    variables: the model's variables, replicated over ``mesh``.
    mesh: the data mesh.

  Returns:
    {'train': metrics, 'test': metrics, 'aug_test': metrics}.
  """
  num_classes = dataset.spec.num_classes
  sources = {'train': (config.eval.train_split, None),
             'test': (config.eval.test_split, None),
             'aug_test': (config.eval.test_split, config.eval.aug_view)}
  results = {}
  for name in SPLITS:
    split, view = sources[name]
    out = predict.predict_split(dataset, fns[view], variables, split, config.eval.batch_size,
                                mesh, keys=('logits',), seed=config.seed)
    results[name] = metrics_lib.classification_metrics(out['logits'], out['label'], num_classes)
    if name == 'train' and _trained_on_a_fraction(config):
      # The 'train' row covers every labelled image of the split; whether the
      # run fits what it was trained on is read off the labelled fraction.
      keep = pipeline.balanced_subset(out['label'], config.fraction, num_classes,
                                      config.fraction_seed)
      results['train_labelled'] = metrics_lib.classification_metrics(
          out['logits'][keep], out['label'][keep], num_classes)
  for name, r in results.items():
    logging.info('%s accuracy %.4f (%d examples).', name, r['top1'], r['num_examples'])
  return results


def _trained_on_a_fraction(config) -> bool:
  """Whether the run trained on a balanced fraction of eval.train_split (same order, same ids)."""
  return config.fraction < 1.0 and config.eval.train_split == train_split(config)


def embedding_figures(config, dataset: datasets.Dataset, fns: dict, variables: dict, mesh: Mesh,
                      workdir: str, title: str) -> dict:
  """PCA / t-SNE PNGs of augmented train images and the C heatmap of one batch.

  Writes embeddings_pca.png, embeddings_tsne.png (config.plots.tsne),
  cross_correlation.png and embeddings_2d.npz (the 2-D points, for the
  sweep's side-by-side figures) into ``workdir``.

  Returns:
    {'mean_diag_c': mean of diag(C), 'mean_abs_offdiag_c': mean |C_ij|, i != j}.
  """
  n, split = config.plots.num_examples, config.eval.train_split
  out1 = predict.predict_split(dataset, fns['view1'], variables, split, config.eval.batch_size,
                               mesh, keys=('representation', 'embeddings'), seed=config.seed,
                               max_examples=n)
  # The other branch of the same images, for C (another seed: independent draws).
  out2 = predict.predict_split(dataset, fns['view2'], variables, split, config.eval.batch_size,
                               mesh, keys=('embeddings',), seed=config.seed + 1,
                               max_examples=min(n, config.batch_size))
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
                         dataset.class_names,
                         f'{m.upper()} of augmented train {config.plots.features}')
  with (epath.Path(workdir) / 'embeddings_2d.npz').open('wb') as f:
    np.savez(f, labels=labels, **points)
  off = c[~np.eye(len(c), dtype=bool)]
  return {'mean_diag_c': float(np.diag(c).mean()), 'mean_abs_offdiag_c': float(np.abs(off).mean())}


def load_data(config, dataset: datasets.Dataset) -> pipeline.TrainData:
  """The training set (train_split, plus the unlabelled split when BT uses it).

  The evaluation splits are checked too, so that a typo fails now and not
  after training.
  """
  split = train_split(config)
  data = pipeline.load_train_data(dataset, split, config.fraction, config.fraction_seed)
  for key in ('train_split', 'test_split'):
    datasets.split_size(data.builder, config.eval[key], f'eval.{key}')
  logging.info('Split %r, gamma %g.', split, config.gamma)
  return data


def run(config, workdir: str, init_variables: Optional[dict] = None,
        extra_results: Optional[dict] = None, allow_config_change: bool = False,
        dataset: Optional[datasets.Dataset] = None) -> dict:
  """Trains, evaluates and writes results into ``workdir``; resumes if interrupted.

  Args:
    config: a supervised config (configs/cifar_supervised_bt.py).
    workdir: checkpoints, config.json, TensorBoard scalars, results.
    init_variables: {'params', 'batch_stats'} whose 'backbone' initialises
      the encoder (fine-tuning); None trains from scratch.
    extra_results: added to results.json (e.g. where the encoder came from).
    allow_config_change: resume a run recorded with another config instead
      of refusing (trainer.fit).
    dataset: config.dataset already resolved (fine-tuning resolves it with
      the pretraining's statistics); None resolves it here.

  Returns:
    The results dict written to results.json.
  """
  config_validation.validate_supervised(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh()
  dataset = dataset or datasets.from_config(config)
  datasets.record_stats(config, dataset)
  model = factory.create_supervised_model(config, dataset.spec.num_classes, axis_name=DATA_AXIS)
  data = load_data(config, dataset)
  num_train = data.num_global
  total_steps = trainer.Length.of(config, num_train).total_steps
  task = trainer.Task(model, make_loss_fn(model, config.gamma, config.lambd),
                      config.num_branches, CONSOLE_KEYS)
  state = trainer.fit(config, workdir, task, data, mesh, init_variables=init_variables,
                      allow_config_change=allow_config_change)
  writer = writers.create(workdir, config)
  try:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    fns = predict_fns(config, model, dataset.spec)
    metrics = evaluate_accuracy(config, dataset, fns, variables, mesh)
    writer.write_scalars(total_steps, {f'eval/{k}_accuracy': m['top1'] for k, m in metrics.items()})
  finally:
    writer.flush()

  class_names = dataset.class_names
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
    results.update(embedding_figures(config, dataset, fns, variables, mesh, workdir,
                                     f'gamma = {config.gamma:g}'))
  write_results(results, workdir)
  return results


def write_results(results: dict, workdir: str) -> None:
  """confusion_matrix.png, results.md, then results.json (last: it marks the run done)."""
  if jax.process_index() > 0:
    return
  plots.confusion_matrix_png(results['test']['confusion_matrix'], results['class_names'],
                             os.path.join(workdir, 'confusion_matrix.png'),
                             f"test, gamma = {results['gamma']:g}")
  m = results['model']
  lines = [f"# Supervised run: gamma = {results['gamma']:g}, seed {results['seed']}", '',
           f"{m['encoder']} width {m['width']}, {results['dataset']} "
           f"({results['train_split']}, fraction {results['fraction']}, {results['num_train']} "
           f"images), {results['num_branches']} branch(es), ablation {results['ablation']}, "
           f"{results['num_steps']} steps ({results['epochs']:.2f} epochs).", '']
  if results['train']['num_examples'] != results['num_train']:
    # A fraction (or an added unlabelled split): the train row is not the trained-on set.
    lines += [f"The train row is every labelled image of eval.train_split "
              f"({results['train']['num_examples']}), not only the {results['num_train']} "
              "trained on.", '']
  names = {'train': 'train', 'train_labelled': 'train, the labelled fraction trained on',
           'test': 'test', 'aug_test': 'augmented test'}
  rows = [(names[k], *(f'{100 * results[k][m]:.2f}' for m in ('top1', 'top5', 'micro', 'macro')),
           results[k]['num_examples'])
          for k in ('train', 'train_labelled', *SPLITS[1:]) if k in results]
  lines.append(workdir_lib.markdown_table(
      ('split', 'top-1', 'top-5', 'micro', 'macro-F1', 'examples'), rows))
  workdir_lib.write_results(workdir, results, '\n'.join(lines) + '\n')
