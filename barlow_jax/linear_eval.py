"""Evaluation stage: kNN and a linear probe on a frozen pretrained encoder.

  python -m barlow_jax.main --config=configs/cifar_linear.py \
      --config.pretrained_workdir=runs/bt --workdir=runs/probe

Features of the train and test splits are computed once (no augmentation),
then the kNN classifiers and the linear probe run on them. With
``probe.augment`` the linear probe instead trains on features of augmented
train images (``probe.view``, crop + flip) computed on the fly, one jitted
step per batch (evaluate.train_augmented_probe); test features stay clean
and cached. Writes ``results.json``, ``results.md`` and
``confusion_matrix.png`` to the workdir.
"""

import json
import os

from absl import logging
import jax
import ml_collections
import numpy as np

from barlow_jax import augment
from barlow_jax import config_validation
from barlow_jax import evaluate
from barlow_jax import input_pipeline
from barlow_jax import models
from barlow_jax import plots
from barlow_jax import train


def _encoder(config, mesh):
  """(pretrain config, model, variables, description) for the probe."""
  pre = evaluate.load_pretrain_config(config.pretrained_workdir)
  for key in ('data_dir', 'download'):  # Where the data is may differ from pretraining.
    if config.get(key) is not None:
      pre[key] = config[key]
  if config.random_init:
    model = models.create_model(pre)
    size = pre.augment.crop_size
    variables = model.init(jax.random.PRNGKey(config.seed), np.zeros((2, size, size, 3), np.float32),
                           train=False)
    return pre, model, variables, 'random init (same architecture)'
  model, variables, step = evaluate.restore_encoder(pre, config.pretrained_workdir,
                                                    config.get('checkpoint_step'), mesh)
  return pre, model, variables, f'pretrained, step {step}'


def _label_subset(labels, config, num_classes):
  if config.label_fraction >= 1.0:
    return np.arange(len(labels))
  return input_pipeline.balanced_subset(labels, config.label_fraction, num_classes,
                                        config.fraction_seed)


def probe_data_config(config, pre) -> ml_collections.ConfigDict:
  """The input_pipeline config of the augmented probe's training images.

  Its ``fraction`` is the label fraction, so load_train_data keeps the same
  class-balanced subset (same labels, fraction and seed) as _label_subset.
  """
  return ml_collections.ConfigDict({
      'dataset': pre.dataset, 'data_dir': pre.data_dir, 'download': pre.download,
      'train_split': config.train_split, 'fraction': config.label_fraction,
      'fraction_seed': config.fraction_seed})


def _linear_probe(config, pre, model, variables, train_x, train_y, mesh):
  """The trained probe's ``predict``: on cached features, or on the fly with augmentation."""
  p = config.probe
  hyper = dict(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
               momentum=p.momentum, seed=config.seed)
  if not p.augment:
    num_classes = input_pipeline.dataset_spec(pre.dataset).num_classes
    return evaluate.train_linear_probe(train_x, train_y, num_classes, **hyper)
  data = input_pipeline.load_train_data(probe_data_config(config, pre))
  if data.num_global != len(train_y):  # Two selections of the same subset must agree.
    raise RuntimeError(f'The augmented probe sees {data.num_global} training examples, the '
                       f'cached features {len(train_y)}.')
  mean, std = evaluate.feature_standardizer(train_x)
  return evaluate.train_augmented_probe(pre, model, variables, data,
                                        augment.view_from_config(p.view), mean, std, mesh=mesh,
                                        **hyper)


def run(config, workdir: str) -> dict:
  """Runs kNN + linear probe; returns (and writes) the results dict."""
  config_validation.validate_linear(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = train.make_mesh()
  pre, model, variables, description = _encoder(config, mesh)
  spec = input_pipeline.dataset_spec(pre.dataset)
  train_x, train_y = evaluate.extract_features(pre, model, variables, config.train_split,
                                               config.batch_size, mesh)
  test_split = config.get('test_split') or spec.test_split
  test_x, test_y = evaluate.extract_features(pre, model, variables, test_split,
                                             config.batch_size, mesh)
  keep = _label_subset(train_y, config, spec.num_classes)
  train_x, train_y = train_x[keep], train_y[keep]
  logging.info('Features: train %s, test %s.', train_x.shape, test_x.shape)

  results = {'encoder': description, 'pretrained_workdir': config.pretrained_workdir,
             'model': pre.model.to_dict(), 'dataset': pre.dataset,
             'label_fraction': config.label_fraction, 'num_train': int(len(train_y))}
  for k in config.knn.k:
    scores = evaluate.knn_scores(train_x, train_y, test_x, spec.num_classes, k,
                                 config.knn.temperature)
    results[f'knn_k{k}'] = evaluate.classification_metrics(scores, test_y, spec.num_classes)
  predict = _linear_probe(config, pre, model, variables, train_x, train_y, mesh)
  results['linear'] = evaluate.classification_metrics(predict(test_x), test_y, spec.num_classes)
  # How the probe was trained: on cached clean features, or on augmented views.
  view = augment.view_from_config(config.probe.view)
  results['linear']['augmented'] = bool(config.probe.augment)
  if config.probe.augment:
    results['linear']['view'] = view._asdict()
  # The same probe on test images through probe.view (crop + flip): how much
  # of the accuracy survives the augmentations the representation should
  # be invariant to (seed 001 reports this as "aug test" accuracy).
  aug_x, aug_y = evaluate.extract_features(pre, model, variables, test_split, config.batch_size,
                                           mesh, evaluate.make_feature_fn(pre, model, view),
                                           seed=config.seed)
  results['linear_aug_test'] = evaluate.classification_metrics(predict(aug_x), aug_y,
                                                               spec.num_classes)

  builder = input_pipeline.get_builder(pre.dataset, pre.data_dir, pre.download)
  results['class_names'] = list(builder.info.features['label'].names)
  if jax.process_index() == 0:
    _write(results, workdir, pre)
  return results


def _write(results: dict, workdir: str, pre) -> None:
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  probe = 'linear probe (augmented views)' if results['linear']['augmented'] else 'linear probe'
  plots.confusion_matrix_png(results['linear']['confusion_matrix'], results['class_names'],
                             os.path.join(workdir, 'confusion_matrix.png'),
                             f"{probe}, {results['encoder']}")
  names = {'linear': 'linear, trained on augmented views' if results['linear']['augmented']
           else 'linear',
           'linear_aug_test': 'linear, on augmented test images (probe.view)'}
  rows = [(names.get(k, k), v) for k, v in results.items() if isinstance(v, dict) and 'top1' in v]
  lines = [f"# Evaluation of {results['pretrained_workdir']} ({results['encoder']})", '',
           f"{pre.model.encoder} width {pre.model.width}, projector {pre.model.projector}, "
           f"{pre.dataset}, labels used: {results['num_train']} "
           f"(fraction {results['label_fraction']})", '',
           '| classifier | top-1 | top-5 | micro | macro-F1 |', '|---|---|---|---|---|']
  lines += [f"| {k} | {100 * v['top1']:.2f} | {100 * v['top5']:.2f} | {100 * v['micro']:.2f} | "
            f"{100 * v['macro']:.2f} |" for k, v in rows]
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
