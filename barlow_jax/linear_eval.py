"""Evaluation stage: kNN and a linear probe on a frozen pretrained encoder.

  python -m barlow_jax.main --config=configs/cifar_linear.py \
      --config.pretrained_workdir=runs/bt --workdir=runs/probe

Features of the train and test splits are computed once (no augmentation),
then the kNN classifiers and the linear probe run on them. Writes
``results.json``, ``results.md`` and ``confusion_matrix.png`` to the workdir.
"""

import json
import os

from absl import logging
import jax
import numpy as np

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


def run(config, workdir: str) -> dict:
  """Runs kNN + linear probe; returns (and writes) the results dict."""
  config_validation.validate_linear(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = train.make_mesh()
  pre, model, variables, description = _encoder(config, mesh)
  spec = input_pipeline.dataset_spec(pre.dataset)
  train_x, train_y = evaluate.extract_features(pre, model, variables, config.train_split,
                                               config.batch_size, mesh)
  test_x, test_y = evaluate.extract_features(pre, model, variables, spec.test_split,
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
  predict = evaluate.train_linear_probe(
      train_x, train_y, spec.num_classes, epochs=config.probe.epochs,
      batch_size=config.probe.batch_size, lr=config.probe.lr,
      weight_decay=config.probe.weight_decay, momentum=config.probe.momentum, seed=config.seed)
  results['linear'] = evaluate.classification_metrics(predict(test_x), test_y, spec.num_classes)

  builder = input_pipeline.get_builder(pre.dataset, pre.data_dir, pre.download)
  results['class_names'] = list(builder.info.features['label'].names)
  if jax.process_index() == 0:
    _write(results, workdir, pre)
  return results


def _write(results: dict, workdir: str, pre) -> None:
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  plots.confusion_matrix_png(results['linear']['confusion_matrix'], results['class_names'],
                             os.path.join(workdir, 'confusion_matrix.png'),
                             f"linear probe, {results['encoder']}")
  rows = [(k, v) for k, v in results.items() if isinstance(v, dict) and 'top1' in v]
  lines = [f"# Evaluation of {results['pretrained_workdir']} ({results['encoder']})", '',
           f"{pre.model.encoder} width {pre.model.width}, projector {pre.model.projector}, "
           f"{pre.dataset}, labels used: {results['num_train']} "
           f"(fraction {results['label_fraction']})", '',
           '| classifier | top-1 | top-5 | micro | macro-F1 |', '|---|---|---|---|---|']
  lines += [f"| {k} | {100 * v['top1']:.2f} | {100 * v['top5']:.2f} | {100 * v['micro']:.2f} | "
            f"{100 * v['macro']:.2f} |" for k, v in rows]
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
