r"""Seed 000's comparison in one command: Barlow Twins vs baselines on a balanced fraction.

  python -m barlow_jax.reproduce --fraction=0.1 --scale=cpu --workdir=runs/seed000_10 \
      --data_dir=../shared/tfds

For the given class-balanced fraction of CIFAR-10 this runs, or reuses when its
results already exist in the sub-workdir:
  pretrain/          Barlow Twins pretraining on the fraction (configs/cifar_bt.py
                     at --scale=full: ResNet-50, 1000 epochs; configs/cifar_bt_cpu.py
                     at --scale=cpu: the laptop quick start, --cpu_epochs epochs);
  probe/             linear probe + kNN on the frozen encoder, trained on the
                     fraction's labels;
  finetune/          the whole pretrained network fine-tuned on the fraction's labels
                     (configs/cifar_finetune.py, paper App. B.2);
  baselines/         KNN, logistic regression, random forest on raw pixels of the fraction;
  supervised/        the same architecture trained from scratch with cross-entropy on
  supervised_noaug/  the fraction, with crop + flip and without augmentation
                     (configs/cifar_supervised.py: ResNet-50, 100 epochs at --scale=full;
                     the quick-start encoder for --cpu_supervised_epochs at --scale=cpu);
and writes results.md / results.json with the seed's published numbers beside
ours, each row labelled with its model and training length.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from barlow_jax import baselines
from barlow_jax import finetune
from barlow_jax import linear_eval
from barlow_jax import supervised
from barlow_jax import train

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a script, so that the
  module imports beside others that define --workdir (barlow_jax.sweep)."""
  flags.DEFINE_float('fraction', 0.1, 'Balanced fraction of CIFAR-10 train (seed 000: 0.1, 0.2).')
  flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'],
                    'cpu: quick-start encoder; full: seed 000 setting.')
  flags.DEFINE_float('cpu_epochs', 30.0, 'Pretraining epochs over the fraction at --scale=cpu.')
  flags.DEFINE_float('cpu_supervised_epochs', 30.0,
                     'Epochs of the supervised-from-scratch baselines at --scale=cpu.')
  flags.DEFINE_string('workdir', None, 'Root directory of the comparison.')
  flags.DEFINE_string('data_dir', None,
                      'TFDS data dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets).')
  flags.mark_flags_as_required(['workdir'])


# Seed 000, Table 1 (test accuracy %, micro / macro) at 10% and 20%.
SEED_000 = {
    0.1: {'knn_k5': (28.0, 24.1), 'logistic_regression': (33.25, 32.67),
          'random_forest': (38.72, 36.86), 'supervised_resnet50': (13.68, 7.03),
          'barlow_twins': (66.44, 66.31)},
    0.2: {'knn_k5': (28.52, 27.01), 'logistic_regression': (37.0, 36.66),
          'random_forest': (41.04, 40.45), 'supervised_resnet50': (16.39, 10.59),
          'barlow_twins': (69.14, 69.02)},
}
SUPERVISED_RUNS = (('supervised', '', 'crop + flip'), ('supervised_noaug', 'noaug', 'no augmentation'))


def _configs(fraction: float, scale: str, cpu_epochs: float, cpu_supervised_epochs: float,
             data_dir):
  """(pretrain, probe, fine-tuning, baselines, {name: supervised config}) of the comparison.

  The probe and fine-tuning configs get their pretrained_workdir in main().
  """
  from configs import cifar_baselines, cifar_bt, cifar_bt_cpu, cifar_finetune, cifar_linear, cifar_supervised  # pylint: disable=g-import-not-at-top
  pre = (cifar_bt if scale == 'full' else cifar_bt_cpu).get_config()
  pre.fraction = fraction
  if scale == 'cpu':
    pre.num_epochs = cpu_epochs
    # Epochs of a fraction are short: every epoch would spend more time on
    # the monitor's 20k images than on training.
    pre.knn_monitor.every_epochs = 10.0
  probe = cifar_linear.get_config()
  probe.label_fraction = fraction  # The classifier sees the same labelled fraction.
  tune = cifar_finetune.get_config()
  tune.label_fraction = fraction
  base = cifar_baselines.get_config()
  base.label_fraction = fraction
  supervised_configs = {}
  for name, arg, _ in SUPERVISED_RUNS:
    sup = cifar_supervised.get_config(arg)
    sup.fraction = fraction
    if scale == 'cpu':  # The pretraining encoder: the rows compare like with like.
      for key in ('encoder', 'width', 'stem'):
        sup.model[key] = pre.model[key]
      sup.num_epochs = cpu_supervised_epochs
    supervised_configs[name] = sup
  for c in (pre, probe, tune, base, *supervised_configs.values()):
    c.data_dir = data_dir
  return pre, probe, tune, base, supervised_configs


def _cached(workdir: str, fn, config):
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    logging.info('Reusing %s.', path)
    with open(path) as f:
      return json.load(f)
  return fn(config, workdir)


def _model_and_length(config) -> str:
  m = config.model
  length = (f'{config.num_steps} steps' if config.get('num_steps')
            else f'{config.num_epochs:g} ep')
  projector = f", proj {m.projector}" if m.get('projector') else ''
  return f'{m.encoder} w{m.width}{projector}, {length}'


def table(fraction: float, pre, probe_results: dict, finetune_results: dict,
          base_results: dict, supervised_results: dict) -> str:
  """The comparison as Markdown.

  Args:
    fraction: the balanced fraction of CIFAR-10 train.
    pre: the pretraining config (model and length of the Barlow Twins rows).
    probe_results: results.json of the linear stage.
    finetune_results: results.json of the fine-tuning stage.
    base_results: results.json of the raw-pixel baselines.
    supervised_results: {name of SUPERVISED_RUNS: (config, results.json)}.
  """
  seed = SEED_000.get(round(fraction, 2), {})
  rows = [('KNN (k=5), pixels', 'knn_k5', base_results.get('knn_k5'), 'sklearn'),
          ('Logistic regression, pixels', 'logistic_regression',
           base_results.get('logistic_regression'), 'sklearn'),
          ('Random forest, pixels', 'random_forest', base_results.get('random_forest'), 'sklearn')]
  for name, _, label in SUPERVISED_RUNS:
    config, results = supervised_results[name]
    rows.append((f'Supervised from scratch, {label}', 'supervised_resnet50', results['test'],
                 _model_and_length(config)))
  rows += [('Barlow Twins + linear probe', 'barlow_twins', probe_results['linear'],
            _model_and_length(pre)),
           ('Barlow Twins + kNN (k=20)', None, probe_results.get('knn_k20'), _model_and_length(pre)),
           ('Barlow Twins + fine-tuning', None, finetune_results['test'],
            f'{_model_and_length(pre)}, then {finetune_results["epochs"]:.3g} ep')]
  lines = [f'# Seed 000 comparison, CIFAR-10, balanced {100 * fraction:g}% of train', '',
           'Test accuracy (%) on the full 10k test set. micro = accuracy, macro = macro-F1. '
           'Seed columns are the published Table 1 (ResNet-50; Barlow Twins 1000 epochs); the '
           'seed has one supervised ResNet-50 row, shown beside both of ours.', '',
           '| method | ours micro | ours macro | seed micro | seed macro | ours: model / length |',
           '|---|---|---|---|---|---|']
  fmt = lambda v: '—' if v is None else f'{v:.2f}'
  for name, key, ours, model in rows:
    s = seed.get(key, (None, None))
    lines.append(f"| {name} | {fmt(ours and 100 * ours['micro'])} | "
                 f"{fmt(ours and 100 * ours['macro'])} | {fmt(s[0])} | {fmt(s[1])} | {model} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  tf.config.experimental.set_visible_devices([], 'GPU')
  pre, probe, tune, base, supervised_configs = _configs(
      FLAGS.fraction, FLAGS.scale, FLAGS.cpu_epochs, FLAGS.cpu_supervised_epochs, FLAGS.data_dir)
  pre_dir = os.path.join(FLAGS.workdir, 'pretrain')
  train.train_and_evaluate(pre, pre_dir)  # Resumes, or returns at once when finished.
  probe.pretrained_workdir = pre_dir
  probe_results = _cached(os.path.join(FLAGS.workdir, 'probe'), linear_eval.run, probe)
  tune.pretrained_workdir = pre_dir
  finetune_results = _cached(os.path.join(FLAGS.workdir, 'finetune'), finetune.run, tune)
  base_results = _cached(os.path.join(FLAGS.workdir, 'baselines'), baselines.run, base)
  supervised_results = {
      name: (config, _cached(os.path.join(FLAGS.workdir, name), supervised.run, config))
      for name, config in supervised_configs.items()}
  text = table(FLAGS.fraction, pre, probe_results, finetune_results, base_results,
               supervised_results)
  with open(os.path.join(FLAGS.workdir, 'results.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as f:
    json.dump({'fraction': FLAGS.fraction, 'scale': FLAGS.scale, 'probe': probe_results,
               'finetune': finetune_results, 'baselines': base_results,
               **{name: results for name, (_, results) in supervised_results.items()},
               'seed_000': SEED_000.get(round(FLAGS.fraction, 2))}, f, indent=2)
  print(text)


if __name__ == '__main__':
  define_flags()
  app.run(main)
