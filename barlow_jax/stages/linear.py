"""Evaluation stage: kNN and a linear probe on a frozen pretrained encoder.

  python -m barlow_jax.main --config=configs/cifar_linear.py \
      --config.pretrained_workdir=runs/bt --workdir=runs/probe

``--config.dataset=NAME`` probes the encoder on another dataset than its
pretraining's (stages/transfer.py probes several into one table). Features
of the train and test splits are computed once (no augmentation), then the
kNN classifiers and the linear probe run on them. With
``probe.augment`` the linear probe instead trains on features of augmented
train images (``probe.view``, crop + flip) computed on the fly, one jitted
step per batch (evaluators/linear_probe.train_augmented_probe); test features
stay clean and cached. Writes ``results.json``, ``results.md`` and
``confusion_matrix.png`` to the workdir; the pretraining workdir is only read.
"""

import os

from absl import logging
from etils import epath
import jax

from barlow_jax import config_validation
from barlow_jax import plots
from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.evaluators import knn
from barlow_jax.evaluators import linear_probe
from barlow_jax.evaluators import metrics
from barlow_jax.evaluators import predict
from barlow_jax.models import factory
from barlow_jax.models import pretrained
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.runtime import workdir as workdir_lib

# results.md lists the per-class accuracy of datasets with at most this many classes.
PER_CLASS_MAX = 20


def load_encoder(config, mesh) -> tuple[pretrained.Pretrained, str]:
  """The encoder to probe and how it was obtained (trained, or the random-init baseline)."""
  overrides = {'data_dir': config.data_dir, 'download': config.download}
  if not config.random_init:
    encoder = pretrained.load(config.pretrained_workdir, mesh, config.checkpoint_step, overrides)
    return encoder, f'pretrained, step {encoder.step}'
  pretrained_config = pretrained.read_config(config.pretrained_workdir, overrides)
  model = factory.create_model(pretrained_config, datasets.num_classes(pretrained_config))
  variables = state_lib.init_variables(model, pretrained_config.augment.crop_size,
                                       jax.random.PRNGKey(config.seed))
  return (pretrained.Pretrained(pretrained_config, model, variables, 0),
          'random init (same architecture)')


def train_probe(config, encoder: pretrained.Pretrained, dataset: datasets.Dataset, train_x,
                train_y, workdir: str, mesh):
  """The trained probe's ``predict``: on cached features, or on the fly with augmentation.

  The augmented probe's images are the label fraction of train_split
  (load_train_data keeps the same class-balanced subset, same labels,
  fraction and seed, as the cached features).
  """
  hparams = linear_probe.ProbeHParams.of(config.probe, config.seed)
  if not config.probe.augment:
    return linear_probe.train_linear_probe(train_x, train_y, dataset.spec.num_classes, hparams)
  data = pipeline.load_train_data(dataset, config.train_split, config.label_fraction,
                                  config.fraction_seed)
  if data.num_global != len(train_y):  # Two selections of the same subset must agree.
    raise RuntimeError(f'The augmented probe sees {data.num_global} training examples, the '
                       f'cached features {len(train_y)}.')
  return linear_probe.train_augmented_probe(
      encoder, data, augment.view_from_config(config.probe.view),
      linear_probe.feature_standardizer(train_x), workdir, hparams, mesh)


def _features(config, encoder: pretrained.Pretrained, dataset: datasets.Dataset, split: str,
              mesh, view=None):
  fn = predict.make_predict_fn(encoder.config, encoder.model, view, outputs=('features',),
                               spec=dataset.spec)
  out = predict.predict_split(dataset, fn, encoder.variables, split, config.batch_size,
                              mesh, seed=config.seed)
  return out['features'], out['label']


def check_splits(config, dataset: datasets.Dataset) -> str:
  """The test split, once train_split and test_split are known to exist."""
  test_split = config.test_split or dataset.spec.test_split
  datasets.split_size(dataset.builder, config.train_split, 'train_split')
  datasets.split_size(dataset.builder, test_split, 'test_split')
  return test_split


def record_config(config, workdir: str, allow_config_change: bool) -> None:
  """config.json of the probe; the augmented probe resumes its head only under the same config."""
  if config.probe.augment:
    resume_step, differences = workdir_lib.agree_on_start(workdir, config, allow_config_change)
  else:
    resume_step, differences = None, []
  workdir_lib.record_start(workdir, config, resume_step, differences)


def probe_dataset(config, encoder: pretrained.Pretrained, dataset: datasets.Dataset,
                  test_split: str, workdir: str, mesh):
  """kNN and the linear probe of the frozen ``encoder`` on one dataset.

  Features of config.train_split (its balanced label_fraction) and of
  ``test_split``, computed once without augmentation; the kNN classifiers
  (config.knn) and the probe (train_probe) read them.

  Returns:
    ({'num_train', 'knn_k<k>' for each k, 'linear'}: metrics on ``test_split``,
     the probe's ``classify(features) -> scores``).
  """
  spec = dataset.spec
  train_x, train_y = _features(config, encoder, dataset, config.train_split, mesh)
  test_x, test_y = _features(config, encoder, dataset, test_split, mesh)
  if config.label_fraction < 1.0:
    keep = pipeline.balanced_subset(train_y, config.label_fraction, spec.num_classes,
                                    config.fraction_seed)
    train_x, train_y = train_x[keep], train_y[keep]
  logging.info('%s features: train %s, test %s.', dataset.name, train_x.shape, test_x.shape)
  results = {'num_train': int(len(train_y))}
  for k in config.knn.k:
    scores = knn.knn_scores(train_x, train_y, test_x, spec.num_classes, k, config.knn.temperature)
    results[f'knn_k{k}'] = metrics.classification_metrics(scores, test_y, spec.num_classes)
  classify = train_probe(config, encoder, dataset, train_x, train_y, workdir, mesh)
  results['linear'] = metrics.classification_metrics(classify(test_x), test_y, spec.num_classes)
  return results, classify


def run(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Runs kNN + linear probe; returns (and writes) the results dict.

  The dataset is the pretraining's, or ``config.dataset`` (standardised with
  the encoder's statistics: datasets.for_encoder). The pretraining workdir is
  only read. Only the augmented probe resumes (its head, from
  ``workdir``/checkpoints), refused under another config than it recorded
  unless ``allow_config_change``; the cached probe starts afresh.
  """
  config_validation.validate_linear(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh()
  encoder, description = load_encoder(config, mesh)
  dataset = datasets.for_encoder(config.get('dataset'), encoder.config)
  test_split = check_splits(config, dataset)
  record_config(config, workdir, allow_config_change)
  scores, classify = probe_dataset(config, encoder, dataset, test_split, workdir, mesh)
  results = {'encoder': description, 'pretrained_workdir': config.pretrained_workdir,
             'model': encoder.config.model.to_dict(), 'dataset': dataset.name,
             'label_fraction': config.label_fraction, **scores}
  # How the probe was trained: on cached clean features, or on augmented views.
  view = augment.view_from_config(config.probe.view)
  results['linear']['augmented'] = bool(config.probe.augment)
  if config.probe.augment:
    results['linear']['view'] = view._asdict()
  # The same probe on test images through probe.view (crop + flip): how much
  # of the accuracy survives the augmentations the representation should be
  # invariant to (Ramyaa (2022) reports this as "aug test" accuracy).
  aug_x, aug_y = _features(config, encoder, dataset, test_split, mesh, view)
  results['linear_aug_test'] = metrics.classification_metrics(classify(aug_x), aug_y,
                                                              dataset.spec.num_classes)
  results['class_names'] = dataset.class_names
  write_results(results, workdir, encoder.config)
  return results


def per_class_table(class_names, accuracy, confusion,
                    max_classes: int = PER_CLASS_MAX) -> list[str]:
  """results.md lines: the linear probe's test accuracy of each class, by name.

  Only up to ``max_classes`` classes (beyond, the table would drown the
  summary; results.json has every class's accuracy).
  """
  if len(class_names) > max_classes:
    return []
  return ['', workdir_lib.markdown_table(
      ('class', 'linear top-1', 'test images'),
      [(name, f'{100 * acc:.2f}', sum(row)) for name, acc, row in zip(class_names, accuracy,
                                                                      confusion)])]


def write_results(results: dict, workdir: str, pretrained_config) -> None:
  """confusion_matrix.png, results.md, then results.json (it marks the run done)."""
  if jax.process_index() > 0:
    return
  probe = 'linear probe (augmented views)' if results['linear']['augmented'] else 'linear probe'
  plots.confusion_matrix_png(results['linear']['confusion_matrix'], results['class_names'],
                             os.path.join(workdir, 'confusion_matrix.png'),
                             f"{probe}, {results['encoder']}")
  names = {'linear': 'linear, trained on augmented views' if results['linear']['augmented']
           else 'linear',
           'linear_aug_test': 'linear, on augmented test images (probe.view)'}
  rows = [(names.get(k, k), v) for k, v in results.items() if isinstance(v, dict) and 'top1' in v]
  m = pretrained_config.model
  lines = [f"# Evaluation of {results['pretrained_workdir']} ({results['encoder']})", '',
           f"{m.encoder} width {m.width}, projector {m.projector}, "
           f"{results['dataset']}, labels used: {results['num_train']} "
           f"(fraction {results['label_fraction']})", '',
           workdir_lib.markdown_table(
               ('classifier', 'top-1', 'top-5', 'micro', 'macro-F1'),
               [(k, *(f'{100 * v[m]:.2f}' for m in ('top1', 'top5', 'micro', 'macro')))
                for k, v in rows])]
  lines += per_class_table(results['class_names'], results['linear']['per_class_accuracy'],
                           results['linear']['confusion_matrix'])
  workdir_lib.write_results(workdir, results, '\n'.join(lines) + '\n')
