"""Online kNN accuracy during pretraining: a hook for the training loop (runtime/loop.py).

Every ``config.knn_monitor.every_epochs`` epochs (converted to steps once)
and at the last step, the hook encodes a memory bank (``train_split``) and
test images (``test_split``) with the current weights, frozen and BatchNorm
in inference mode, and scores the test images by weighted kNN
(evaluators/knn.py: cosine similarity, k nearest, exp(s / T) votes). It
runs outside the jitted train step, on every process (the features are
gathered from all of them), and returns ``{'monitor/knn_top1': accuracy}``
for the loop to log.

Labels of the bank are used even when pretraining sees only a fraction of
the training set: the monitor tracks the representation, it is not a result.
"""

import time
from typing import Callable, Optional

from absl import logging
import numpy as np

from barlow_jax.data import datasets
from barlow_jax.errors import ConfigError
from barlow_jax.evaluators import knn
from barlow_jax.evaluators import predict
from barlow_jax.models import factory

METRIC = 'monitor/knn_top1'


def every_steps(every_epochs: float, steps_per_epoch: int) -> int:
  """The monitor's period in steps (at least 1); 0 when every_epochs is 0 (off)."""
  if every_epochs <= 0:
    return 0
  return max(1, int(round(every_epochs * steps_per_epoch)))


def fires_at(step: int, period: int, total_steps: int) -> bool:
  """Whether the monitor runs after ``step`` updates: every ``period`` steps and at the end."""
  return period > 0 and (step % period == 0 or step == total_steps)


def knn_top1(config, dataset: datasets.Dataset, variables, mesh,
             predict_fn: predict.PredictFn) -> float:
  """kNN top-1 accuracy of ``variables`` on config.knn_monitor's splits.

  Args:
    config: a pretraining config with a knn_monitor block.
    dataset: its resolved dataset (datasets.resolve).
    variables: {'params', 'batch_stats'}, replicated over ``mesh``.
    mesh: the data mesh.
    predict_fn: from predict.make_predict_fn, compiled once for every call.

  Returns:
    The fraction of test examples whose highest-scoring class is their label.
  """
  m = config.knn_monitor
  num_classes = dataset.spec.num_classes
  bank, test = (predict.predict_split(dataset, predict_fn, variables, split, config.batch_size,
                                      mesh) for split in (m.train_split, m.test_split))
  scores = knn.knn_scores(bank['features'], bank['label'], test['features'], num_classes, m.k,
                          m.temperature)
  return float(np.mean(scores.argmax(1) == test['label']))


def make_hook(config, dataset: datasets.Dataset, steps_per_epoch: int, total_steps: int,
              mesh) -> Optional[Callable[[int, object], Optional[dict]]]:
  """The kNN monitor as a loop.run_steps hook, or None when it is off (or absent).

  Checks the splits against the dataset's metadata now, before anything
  compiles, so that a typo fails at the start and not after the first epoch.

  Args:
    config: the pretraining config.
    dataset: its resolved dataset (datasets.resolve).
    steps_per_epoch: to convert knn_monitor.every_epochs to steps.
    total_steps: the run's last step, where the monitor always runs.
    mesh: the data mesh.

  Returns:
    ``hook(step, state) -> {METRIC: top-1} or None`` (None at steps where it
    does not run), or None.

  Raises:
    ConfigError: a split that does not exist, or a bank
      smaller than k.
  """
  m = config.get('knn_monitor')
  period = every_steps(m.every_epochs, steps_per_epoch) if m is not None else 0
  if period == 0:
    return None
  builder = dataset.builder
  bank = datasets.split_size(builder, m.train_split, 'knn_monitor.train_split')
  datasets.split_size(builder, m.test_split, 'knn_monitor.test_split')
  if bank < m.k:
    raise ConfigError(
        f'config.knn_monitor.k={m.k} is larger than the memory bank '
        f'config.knn_monitor.train_split={m.train_split!r} ({bank} examples).')
  # No axis_name: inference only, outside shard_map.
  model = factory.create_model(config, dataset.spec.num_classes)
  predict_fn = predict.make_predict_fn(config, model, outputs=('features',), spec=dataset.spec)
  logging.info('kNN monitor every %d steps and at step %d: bank %r (%d), test %r, k=%d.',
               period, total_steps, m.train_split, bank, m.test_split, m.k)

  def hook(step: int, state) -> Optional[dict]:
    if not fires_at(step, period, total_steps):
      return None
    t0 = time.time()
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    top1 = knn_top1(config, dataset, variables, mesh, predict_fn)
    logging.info('step %d: kNN (k=%d) top-1 %.4f on %r (%.1f s).', step, m.k, top1,
                 m.test_split, time.time() - t0)
    return {METRIC: top1}

  return hook
