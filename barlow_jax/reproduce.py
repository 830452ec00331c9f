r"""Seed 000's comparison in one command: Barlow Twins vs classical baselines on a fraction.

  python -m barlow_jax.reproduce --fraction=0.1 --scale=cpu --workdir=runs/seed000_10 \
      --data_dir=../shared/tfds

For the given class-balanced fraction of CIFAR-10 this runs, or reuses when its
results already exist in the sub-workdir:
  pretrain/   Barlow Twins pretraining on the fraction (configs/cifar_bt.py at
              --scale=full: ResNet-50, 1000 epochs; configs/cifar_bt_cpu.py at
              --scale=cpu: the laptop quick start, epochs from --cpu_epochs);
  probe/      linear probe + kNN on the frozen encoder, trained on the fraction's labels;
  baselines/  KNN, logistic regression, random forest on raw pixels of the fraction;
and writes results.md / results.json with the seed's published numbers beside ours,
each row labelled with its model and training length.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from barlow_jax import baselines
from barlow_jax import linear_eval
from barlow_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_float('fraction', 0.1, 'Balanced fraction of CIFAR-10 train (seed 000: 0.1, 0.2).')
flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'cpu: quick-start encoder; full: seed 000 setting.')
flags.DEFINE_float('cpu_epochs', 30.0, 'Pretraining epochs over the fraction at --scale=cpu.')
flags.DEFINE_string('workdir', None, 'Root directory of the comparison.')
flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets).')

# Seed 000, Table 1 (test accuracy %, micro / macro) at 10% and 20%.
SEED_000 = {
    0.1: {'knn_k5': (28.0, 24.1), 'logistic_regression': (33.25, 32.67),
          'random_forest': (38.72, 36.86), 'supervised_resnet50': (13.68, 7.03),
          'barlow_twins': (66.44, 66.31)},
    0.2: {'knn_k5': (28.52, 27.01), 'logistic_regression': (37.0, 36.66),
          'random_forest': (41.04, 40.45), 'supervised_resnet50': (16.39, 10.59),
          'barlow_twins': (69.14, 69.02)},
}


def _configs(fraction: float, scale: str, cpu_epochs: float, data_dir):
  from configs import cifar_baselines, cifar_bt, cifar_bt_cpu, cifar_linear  # pylint: disable=g-import-not-at-top
  pre = (cifar_bt if scale == 'full' else cifar_bt_cpu).get_config()
  pre.fraction = fraction
  if scale == 'cpu':
    pre.num_epochs = cpu_epochs
  probe = cifar_linear.get_config()
  probe.label_fraction = fraction  # The classifier sees the same labelled fraction.
  base = cifar_baselines.get_config()
  base.label_fraction = fraction
  for c in (pre, probe, base):
    c.data_dir = data_dir
  return pre, probe, base


def _cached(workdir: str, fn, config):
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    logging.info('Reusing %s.', path)
    with open(path) as f:
      return json.load(f)
  return fn(config, workdir)


def table(fraction: float, pre, probe_results: dict, base_results: dict) -> str:
  seed = SEED_000.get(round(fraction, 2), {})
  ours_model = (f'{pre.model.encoder} w{pre.model.width}, proj {pre.model.projector}, '
                f'{pre.num_epochs:g} ep')
  rows = [('KNN (k=5), pixels', 'knn_k5', base_results.get('knn_k5'), 'sklearn'),
          ('Logistic regression, pixels', 'logistic_regression',
           base_results.get('logistic_regression'), 'sklearn'),
          ('Random forest, pixels', 'random_forest', base_results.get('random_forest'), 'sklearn'),
          ('Supervised ResNet-50 (seed)', 'supervised_resnet50', None, 'not run here'),
          ('Barlow Twins + linear probe', 'barlow_twins', probe_results['linear'], ours_model),
          ('Barlow Twins + kNN (k=20)', None, probe_results.get('knn_k20'), ours_model)]
  lines = [f'# Seed 000 comparison, CIFAR-10, balanced {100 * fraction:g}% of train', '',
           'Test accuracy (%) on the full 10k test set. micro = accuracy, macro = macro-F1. '
           'Seed columns are the published Table 1 (ResNet-50, 1000 epochs for Barlow Twins).', '',
           '| method | ours micro | ours macro | seed micro | seed macro | ours: model / length |',
           '|---|---|---|---|---|---|']
  for name, key, ours, model in rows:
    s = seed.get(key, (None, None))
    fmt = lambda v: '—' if v is None else f'{v:.2f}'
    lines.append(f"| {name} | {fmt(ours and 100 * ours['micro'])} | "
                 f"{fmt(ours and 100 * ours['macro'])} | {fmt(s[0])} | {fmt(s[1])} | {model} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  tf.config.experimental.set_visible_devices([], 'GPU')
  pre, probe, base = _configs(FLAGS.fraction, FLAGS.scale, FLAGS.cpu_epochs, FLAGS.data_dir)
  pre_dir = os.path.join(FLAGS.workdir, 'pretrain')
  train.train_and_evaluate(pre, pre_dir)  # Resumes, or returns at once when finished.
  probe.pretrained_workdir = pre_dir
  probe_results = _cached(os.path.join(FLAGS.workdir, 'probe'), linear_eval.run, probe)
  base_results = _cached(os.path.join(FLAGS.workdir, 'baselines'), baselines.run, base)
  text = table(FLAGS.fraction, pre, probe_results, base_results)
  with open(os.path.join(FLAGS.workdir, 'results.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as f:
    json.dump({'fraction': FLAGS.fraction, 'scale': FLAGS.scale, 'probe': probe_results,
               'baselines': base_results, 'seed_000': SEED_000.get(round(FLAGS.fraction, 2))},
              f, indent=2)
  print(text)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
