r"""Ghosh, Ghosh & Das (2022)'s comparison in one command: Barlow Twins vs baselines on a fraction.

  python -m barlow_jax.main --config=configs/cifar_fraction_comparison.py --workdir=runs/fraction10 \
      --config.fraction=0.1 --config.scale=cpu --config.data_dir=/path/to/tfds

For the given class-balanced fraction of CIFAR-10 this runs, or reuses when its
results already exist in the sub-workdir:
  pretrain/          Barlow Twins pretraining on the fraction (configs/cifar_bt.py
                     at scale 'full': ResNet-50, 1000 epochs; configs/cifar_bt_cpu.py
                     at scale 'cpu': the laptop quick start, cpu_epochs epochs);
  probe/             linear probe + kNN on the frozen encoder, trained on the
                     fraction's labels;
  finetune/          the whole pretrained network fine-tuned on the fraction's labels
                     (configs/cifar_finetune.py, paper App. B.2);
  baselines/         KNN, logistic regression, random forest on raw pixels of the fraction;
  supervised/        the same architecture trained from scratch with cross-entropy on
  supervised_noaug/  the fraction, with crop + flip and without augmentation
                     (configs/cifar_supervised.py: ResNet-50, 100 epochs at scale 'full';
                     the quick-start encoder for cpu_supervised_epochs at scale 'cpu');
and writes results.md / results.json with the paper's published numbers beside
ours, each row labelled with its model and training length. A finished row is
reused only if it recorded the config it would be run with now (outside
runtime/workdir.FREE_KEYS); otherwise the comparison stops naming the row's
directory and the keys, unless --allow_config_change, which runs it again.
"""

import os
from typing import NamedTuple

from absl import logging
import ml_collections

from barlow_jax import config_files
from barlow_jax.errors import ConfigError
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.stages import baselines
from barlow_jax.stages import finetune
from barlow_jax.stages import linear
from barlow_jax.stages import pretrain
from barlow_jax.stages import supervised


# Ghosh, Ghosh & Das (2022), Table 1 (test accuracy %, micro / macro) at 10% and 20%.
PUBLISHED = {
    0.1: {'knn_k5': (28.0, 24.1), 'logistic_regression': (33.25, 32.67),
          'random_forest': (38.72, 36.86), 'supervised_resnet50': (13.68, 7.03),
          'barlow_twins': (66.44, 66.31)},
    0.2: {'knn_k5': (28.52, 27.01), 'logistic_regression': (37.0, 36.66),
          'random_forest': (41.04, 40.45), 'supervised_resnet50': (16.39, 10.59),
          'barlow_twins': (69.14, 69.02)},
}
SUPERVISED_RUNS = (('supervised', '', 'crop + flip'), ('supervised_noaug', 'noaug', 'no augmentation'))


class StageConfigs(NamedTuple):
  """The config of every run of the comparison."""
  pretrain: ml_collections.ConfigDict
  probe: ml_collections.ConfigDict
  finetune: ml_collections.ConfigDict
  baselines: ml_collections.ConfigDict
  supervised: dict  # {name of SUPERVISED_RUNS: config}


def stage_configs(config, pretrained_workdir: str = '') -> StageConfigs:
  """The runs of a comparison config (configs/cifar_fraction_comparison.py).

  Args:
    config: fraction, scale ('cpu' or 'full'), cpu_epochs,
      cpu_supervised_epochs, data_dir.
    pretrained_workdir: where the probe and fine-tuning read the encoder.
  """
  full = config.scale == 'full'
  pretraining = config_files.load('cifar_bt' if full else 'cifar_bt_cpu')
  pretraining.fraction = config.fraction
  if not full:
    pretraining.num_epochs = config.cpu_epochs
    # Epochs of a fraction are short: every epoch would spend more time on
    # the monitor's 20k images than on training.
    pretraining.knn_monitor.every_epochs = 10.0
  probe = config_files.load('cifar_linear')
  finetuning = config_files.load('cifar_finetune')
  for c in (probe, finetuning):
    c.label_fraction = config.fraction  # The classifiers see the same labelled fraction.
    c.pretrained_workdir = pretrained_workdir
  pixels = config_files.load('cifar_baselines')
  pixels.label_fraction = config.fraction
  from_scratch = {}
  for name, arg, _ in SUPERVISED_RUNS:
    run = config_files.load('cifar_supervised', arg)
    run.fraction = config.fraction
    if not full:  # The pretraining encoder: the rows compare like with like.
      for key in ('encoder', 'width', 'stem'):
        run.model[key] = pretraining.model[key]
      run.num_epochs = config.cpu_supervised_epochs
    from_scratch[name] = run
  for c in (pretraining, probe, finetuning, pixels, *from_scratch.values()):
    c.data_dir = config.data_dir
  return StageConfigs(pretraining, probe, finetuning, pixels, from_scratch)


def _reuse_or_run(workdir: str, fn, config, allow_config_change: bool,
                  recorded_as=None) -> dict:
  """The row's results: reused if it finished under the same config, else (re)run.

  ``recorded_as`` is the config the stage records, when it is not ``config``
  itself (fine-tuning records the supervised config it derives).
  """
  finished = workdir_lib.finished_results(workdir, recorded_as or config, allow_config_change)
  if finished is not None:
    logging.info('Reusing %s.', workdir)
    return finished
  return fn(config, workdir, allow_config_change=allow_config_change)


def _model_and_length(config) -> str:
  m = config.model
  length = (f'{config.num_steps} steps' if config.get('num_steps')
            else f'{config.num_epochs:g} ep')
  projector = f", proj {m.projector}" if m.get('projector') else ''
  return f'{m.encoder} w{m.width}{projector}, {length}'


def table(fraction: float, pretrain_config, probe_results: dict, finetune_results: dict,
          base_results: dict, supervised_results: dict) -> str:
  """The comparison as Markdown.

  Args:
    fraction: the balanced fraction of CIFAR-10 train.
    pretrain_config: the pretraining config (model and length of the Barlow Twins rows).
    probe_results: results.json of the linear stage.
    finetune_results: results.json of the fine-tuning stage.
    base_results: results.json of the raw-pixel baselines.
    supervised_results: {name of SUPERVISED_RUNS: (config, results.json)}.
  """
  published = PUBLISHED.get(round(fraction, 2), {})
  rows = [('KNN (k=5), pixels', 'knn_k5', base_results.get('knn_k5'), 'sklearn'),
          ('Logistic regression, pixels', 'logistic_regression',
           base_results.get('logistic_regression'), 'sklearn'),
          ('Random forest, pixels', 'random_forest', base_results.get('random_forest'), 'sklearn')]
  for name, _, label in SUPERVISED_RUNS:
    config, results = supervised_results[name]
    rows.append((f'Supervised from scratch, {label}', 'supervised_resnet50', results['test'],
                 _model_and_length(config)))
  rows += [('Barlow Twins + linear probe', 'barlow_twins', probe_results['linear'],
            _model_and_length(pretrain_config)),
           ('Barlow Twins + kNN (k=20)', None, probe_results.get('knn_k20'), _model_and_length(pretrain_config)),
           ('Barlow Twins + fine-tuning', None, finetune_results['test'],
            f'{_model_and_length(pretrain_config)}, then {finetune_results["epochs"]:.3g} ep')]
  lines = [f'# Ghosh, Ghosh & Das (2022) comparison, CIFAR-10, balanced {100 * fraction:g}% of train', '',
           'Test accuracy (%) on the full 10k test set. micro = accuracy, macro = macro-F1. '
           'Paper columns are its published Table 1 (ResNet-50; Barlow Twins 1000 epochs); the '
           'paper has one supervised ResNet-50 row, shown beside both of ours.', '']
  fmt = lambda v: '—' if v is None else f'{v:.2f}'
  cells = [(name, fmt(ours and 100 * ours['micro']), fmt(ours and 100 * ours['macro']),
            *(fmt(x) for x in published.get(key, (None, None))), model)
           for name, key, ours, model in rows]
  lines.append(workdir_lib.markdown_table(
      ('method', 'ours micro', 'ours macro', 'paper micro', 'paper macro', 'ours: model / length'),
      cells))
  return '\n'.join(lines) + '\n'


def validate(config) -> None:
  """Checks a comparison config; raises ConfigError naming the key."""
  if config.scale not in ('cpu', 'full'):
    raise ConfigError(f"config.scale={config.scale!r} is not one of ['cpu', 'full'].")
  if not 0.0 < config.fraction <= 1.0:
    raise ConfigError(f'config.fraction={config.fraction} must be in (0, 1].')
  for key in ('cpu_epochs', 'cpu_supervised_epochs'):
    if config[key] <= 0:
      raise ConfigError(f'config.{key}={config[key]} must be positive.')


def run(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Runs (or reuses) every row of the comparison into ``workdir``; writes the table."""
  validate(config)
  pretrained_workdir = os.path.join(workdir, 'pretrain')
  runs = stage_configs(config, pretrained_workdir)
  # Resumes (under the same config), or returns at once when finished.
  pretrain.run(runs.pretrain, pretrained_workdir, allow_config_change=allow_config_change)
  reuse = lambda name, fn, c, recorded_as=None: _reuse_or_run(
      os.path.join(workdir, name), fn, c, allow_config_change, recorded_as)
  probe_results = reuse('probe', linear.run, runs.probe)
  finetune_results = reuse('finetune', finetune.run, runs.finetune, finetune.supervised_config(
      runs.finetune, workdir_lib.read_config(pretrained_workdir)))
  base_results = reuse('baselines', baselines.run, runs.baselines)
  supervised_results = {name: (c, reuse(name, supervised.run, c))
                        for name, c in runs.supervised.items()}
  text = table(config.fraction, runs.pretrain, probe_results, finetune_results, base_results,
               supervised_results)
  results = {'fraction': config.fraction, 'scale': config.scale, 'probe': probe_results,
             'finetune': finetune_results, 'baselines': base_results,
             **{name: r for name, (_, r) in supervised_results.items()},
             'published': PUBLISHED.get(round(config.fraction, 2))}
  workdir_lib.write_results(workdir, results, text)
  print(text)
  return results
