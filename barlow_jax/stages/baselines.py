"""Classical baselines of Ghosh, Ghosh & Das (2022, Table 1) on raw pixels of a balanced fraction.

  python -m barlow_jax.main --config=configs/cifar_baselines.py \
      --config.label_fraction=0.1 --workdir=runs/base10

KNN (k=5), logistic regression and a random forest (scikit-learn) are fitted on
the flattened pixels (scaled to [0, 1], then standardised per pixel) of the
same class-balanced subset that pretraining with the same fraction_seed uses,
and scored on the whole test split. Writes results.json and results.md.
"""

import time

from absl import logging
from etils import epath
import numpy as np
from sklearn import ensemble
from sklearn import linear_model
from sklearn import neighbors
from sklearn import pipeline as sk_pipeline
from sklearn import preprocessing

from barlow_jax import config_validation
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.evaluators import metrics
from barlow_jax.runtime import workdir as workdir_lib


def load_pixels(dataset: datasets.Dataset, split: str):
  """All images of a split as flat float32 pixels in [0, 1], with labels, in TFDS order."""
  images, labels = [], []
  for batch in pipeline.eval_batches(dataset.builder, dataset.spec, split, 1000):
    images.append(batch['image'][batch['mask']])
    labels.append(batch['label'][batch['mask']])
  images = np.concatenate(images)
  return images.reshape(len(images), -1).astype(np.float32) / 255.0, np.concatenate(labels)


def classifiers(config) -> dict:
  scaled = lambda clf: sk_pipeline.make_pipeline(preprocessing.StandardScaler(), clf)
  return {
      'knn_k5': scaled(neighbors.KNeighborsClassifier(n_neighbors=5, n_jobs=-1)),
      # The inverse regularisation strength C is chosen by stratified k-fold
      # cross-validation on the training fraction (never the test set): with
      # 5000 images of 3072 pixels, C=1 overfits (27% held-out accuracy at 10%
      # of CIFAR-10, 38% at C=1e-3).
      'logistic_regression': scaled(linear_model.LogisticRegressionCV(
          Cs=list(config.logistic_cs), l1_ratios=(0.0,), cv=config.logistic_cv_folds,
          scoring='accuracy', max_iter=config.logistic_max_iter, n_jobs=-1,
          use_legacy_attributes=False)),
      'random_forest': ensemble.RandomForestClassifier(
          n_estimators=config.forest_trees, n_jobs=-1, random_state=config.seed),
  }


def run(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Fits and scores config.methods; writes config.json and the results, returns the results.

  Nothing resumes (every run starts afresh), so ``allow_config_change`` has
  nothing to allow; it is there for the one signature of every mode.
  """
  del allow_config_change
  config_validation.validate_baselines(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  dataset = datasets.resolve(config.dataset, data_dir=config.data_dir, download=config.download,
                             crop_size=0)  # Tuned names only (validate_baselines).
  spec = dataset.spec
  datasets.split_size(dataset.builder, config.train_split, 'train_split')
  train_x, train_y = load_pixels(dataset, config.train_split)
  keep = pipeline.balanced_subset(train_y, config.label_fraction, spec.num_classes,
                                        config.fraction_seed)
  train_x, train_y = train_x[keep], train_y[keep]
  test_x, test_y = load_pixels(dataset, spec.test_split)
  results = {'dataset': config.dataset, 'label_fraction': config.label_fraction,
             'num_train': int(len(train_y)), 'features': 'raw pixels'}
  for name, clf in classifiers(config).items():
    if name not in config.methods:
      continue
    t0 = time.time()
    clf.fit(train_x, train_y)
    scores = clf.predict_proba(test_x)
    results[name] = metrics.classification_metrics(scores, test_y, spec.num_classes)
    results[name]['seconds'] = time.time() - t0
    if name == 'logistic_regression':
      results[name]['chosen_c'] = float(clf[-1].C_)
    logging.info('%s: top-1 %.4f (%.0f s)', name, results[name]['top1'], time.time() - t0)
  lines = [f"# Raw-pixel baselines, {config.dataset}, {results['num_train']} training images "
           f"(balanced fraction {config.label_fraction})", '',
           workdir_lib.markdown_table(
               ('method', 'top-1', 'micro', 'macro-F1'),
               [(k, *(f'{100 * v[m]:.2f}' for m in ('top1', 'micro', 'macro')))
                for k, v in results.items() if isinstance(v, dict)])]
  workdir_lib.record_start(workdir, config, None, [])  # config.json: whose results these are.
  workdir_lib.write_results(workdir, results, '\n'.join(lines) + '\n')
  return results
