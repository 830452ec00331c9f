r"""A gamma x seed grid of supervised runs, and a table shaped like Ramyaa (2022)'s Table 4.2.

  python -m barlow_jax.main --config=configs/supervised_bt_sweep.py --workdir=runs/sweep \
      --config.gammas=0,1e-4,1e-3,1e-2 --config.num_seeds=3 [--config.run.key=value ...]

Each run has its own workdir, ``<workdir>/gamma_<g>/seed_<s>``; a run whose
results.json exists is read back instead of trained, and an unfinished one
resumes from its checkpoint, so rerunning an interrupted sweep continues
where it stopped. Both only under the config the run recorded (outside
runtime/workdir.FREE_KEYS): a sweep rerun with other settings stops naming
the run and the keys, unless --allow_config_change, which runs (or resumes)
them under the new settings. Runs go seed by seed (every gamma of seed 0 first), so a
partial sweep already compares all gammas. Writes ``results.json`` and
``results.md`` (train / test / augmented-test accuracy, mean +- std over
seeds per gamma; gamma = 0 is the cross-entropy baseline) and, from the
runs' saved 2-D embeddings, ``embeddings_{pca,tsne}.png`` with gamma = 0 next
to the best gamma.
"""

import math
import os
from typing import Callable, Optional, Sequence

from absl import logging
from etils import epath
import ml_collections
import numpy as np

from barlow_jax import config_validation
from barlow_jax import plots
from barlow_jax.errors import ConfigError
from barlow_jax.runtime import distributed
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.stages import supervised

METRICS = (('train_accuracy', 'Train Acc'), ('test_accuracy', 'Test Acc - test data'),
           ('aug_test_accuracy', 'Test Acc - aug test data'))


def run_dir(workdir: str, gamma: float, seed: int) -> str:
  return os.path.join(workdir, f'gamma_{gamma:g}', f'seed_{seed}')


def run_sweep(config, gammas: Sequence[float], num_seeds: int, workdir: str,
              run_fn: Callable = supervised.run, allow_config_change: bool = False) -> dict:
  """Runs (or reads back) every (gamma, seed) and writes the summary.

  Args:
    config: a supervised config; gamma and seed are set per run.
    gammas: the gamma values; include 0 for the baseline.
    num_seeds: seeds config.seed, config.seed + 1, ...
    workdir: the sweep's directory.
    run_fn: ``(config, workdir, allow_config_change=...) -> results dict``;
      supervised.run.
    allow_config_change: run (or resume) runs recorded with another config
      under this one instead of refusing.

  Raises:
    ConfigChangedError: a run finished (or started) with another config.

  Returns:
    The summary written to ``workdir``/results.json.
  """
  seeds = [config.seed + i for i in range(num_seeds)]
  runs = {}
  for seed in seeds:
    for gamma in gammas:
      directory = run_dir(workdir, gamma, seed)
      run_config = ml_collections.ConfigDict(config.to_dict())
      run_config.gamma, run_config.seed = float(gamma), int(seed)
      finished = workdir_lib.finished_results(directory, run_config, allow_config_change)
      if finished is not None:
        logging.info('gamma %g seed %d: finished before, reading %s.', gamma, seed, directory)
        runs[(gamma, seed)] = finished
        continue
      distributed.pause_point('sweep_next_run')  # Tests: a signal between runs.
      logging.info('gamma %g seed %d: running in %s.', gamma, seed, directory)
      runs[(gamma, seed)] = run_fn(run_config, directory, allow_config_change=allow_config_change)
  summary = summarize(runs, gammas, seeds)
  summary['workdir'] = workdir
  _write(summary, config, workdir)
  return summary


def _mean_std(values: Sequence[float]) -> dict:
  # Sample standard deviation (ddof=1) over seeds; 0 for a single seed.
  values = [100.0 * v for v in values]
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {'mean': float(np.mean(values)), 'std': std, 'values': values}


def summarize(runs: dict, gammas: Sequence[float], seeds: Sequence[int]) -> dict:
  """Mean +- std (percent) per gamma, the best gamma and its gap to gamma = 0.

  Args:
    runs: {(gamma, seed): results dict with *_accuracy in [0, 1]}.
    gammas: in table order.
    seeds: the seeds run.

  Returns:
    {'gammas', 'seeds', 'table': {str(gamma): {metric: {mean, std, values}}},
     'best_gamma', 'comparison'}.
  """
  table = {f'{g:g}': {k: _mean_std([runs[(g, s)][k] for s in seeds]) for k, _ in METRICS}
           for g in gammas}
  positive = [g for g in gammas if g > 0]
  best = max(positive, key=lambda g: table[f'{g:g}']['test_accuracy']['mean']) if positive else None
  summary = {'gammas': [float(g) for g in gammas], 'seeds': list(seeds), 'table': table,
             'best_gamma': best, 'comparison': None}
  if best is not None and 0 in gammas:
    base, top = table['0']['test_accuracy'], table[f'{best:g}']['test_accuracy']
    n = len(seeds)
    # Standard error of the difference of two means (Welch); 0 with one seed.
    se = math.sqrt((base['std'] ** 2 + top['std'] ** 2) / n) if n > 1 else 0.0
    diff = top['mean'] - base['mean']
    summary['comparison'] = {'metric': 'test_accuracy', 'baseline': base['mean'],
                             'best': top['mean'], 'difference': diff, 'stderr': se,
                             'difference_over_stderr': diff / se if se > 0 else None}
  return summary


def best_column(summary: dict) -> float:
  """The gamma with the highest mean test accuracy, the baseline (gamma = 0) included."""
  return max(summary['gammas'], key=lambda g: summary['table'][f'{g:g}']['test_accuracy']['mean'])


def verdict(summary: dict) -> str:
  """In words: does the best gamma > 0 beat the baseline, and by how many standard errors.

  Args:
    summary: from ``summarize``, with a comparison (gamma = 0 and a gamma > 0 were run).
  """
  c = summary['comparison']
  if c['difference_over_stderr'] is None:
    spread = f"{c['difference']:+.2f} points; one seed, so no standard error"
  else:
    spread = (f"{c['difference']:+.2f} points, {c['difference_over_stderr']:+.1f} standard "
              f"errors of the difference; standard error {c['stderr']:.2f}")
  beats = 'beats' if c['difference'] > 0 else 'does not beat'
  return (f"Best γ > 0 by mean test accuracy: {summary['best_gamma']:g}, {c['best']:.2f} against "
          f"{c['baseline']:.2f} for the baseline (γ = 0): it {beats} the baseline ({spread}).")


def markdown(summary: dict, config) -> str:
  """The results table (rows: Train / Test / Aug-test accuracy; columns: gamma), then the verdict.

  The column of the best mean test accuracy is bold, the baseline's included.
  """
  gammas, best = summary['gammas'], best_column(summary)
  head = [('γ = 0 (CE baseline)' if g == 0 else f'γ = {g:g}') for g in gammas]
  rows = []
  for key, label in METRICS:
    cells = []
    for g in gammas:
      s = summary['table'][f'{g:g}'][key]
      cell = f"{s['mean']:.2f} ± {s['std']:.2f}"
      cells.append(f'**{cell}**' if g == best else cell)
    rows.append((label, *cells))
  m = config.model
  lines = [f'# Supervised Barlow Twins sweep: {config.dataset}, {m.encoder} width {m.width}, '
           f'ablation {config.get("ablation")}', '',
           f'{len(summary["seeds"])} seeds ({summary["seeds"]}); mean ± sample std (ddof=1) of '
           'accuracy in %, at the final step; bold: the best mean test accuracy.', '',
           workdir_lib.markdown_table(('', *head), rows)]
  if summary['comparison'] is not None:
    lines += ['', verdict(summary)]
  return '\n'.join(lines) + '\n'


def _load_points(directory: str) -> Optional[dict]:
  path = epath.Path(directory) / 'embeddings_2d.npz'
  if not path.exists():
    return None
  with path.open('rb') as f, np.load(f) as data:
    return {k: data[k] for k in data.files}


def compare_figures(summary: dict, workdir: str, class_names=None) -> list[str]:
  """Side-by-side PCA / t-SNE of gamma = 0 and the best gamma (first seed with both).

  Returns:
    The paths written (none if either run saved no embeddings).
  """
  best = summary['best_gamma']
  if best is None or 0 not in summary['gammas']:
    return []
  for seed in summary['seeds']:
    base = _load_points(run_dir(workdir, 0, seed))
    top = _load_points(run_dir(workdir, best, seed))
    if base is not None and top is not None:
      break
  else:
    return []
  written = []
  for method in ('pca', 'tsne'):
    if method in base and method in top:
      path = os.path.join(workdir, f'embeddings_{method}.png')
      panels = [(base[method], base['labels'], 'γ = 0 (cross-entropy)'),
                (top[method], top['labels'], f'γ = {best:g} (CE + BT)')]
      plots.embeddings_png(panels, path, class_names,
                           f'{method.upper()} of augmented train images, seed {seed}')
      written.append(path)
  return written


def _write(summary: dict, config, workdir: str) -> None:
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  first = workdir_lib.read_results(run_dir(workdir, summary['gammas'][0], summary['seeds'][0]))
  class_names = first.get('class_names') if first else None
  summary['figures'] = compare_figures(summary, workdir, class_names)
  workdir_lib.write_results(workdir, {**summary, 'config': config.to_dict()},
                            markdown(summary, config))


def validate(config) -> None:
  """Checks a sweep config (configs/supervised_bt_sweep.py); raises ConfigError."""
  gammas = [float(g) for g in config.gammas]
  if not gammas or any(g < 0 for g in gammas) or len(set(gammas)) < len(gammas):
    raise ConfigError(
        f'config.gammas={tuple(config.gammas)} must be distinct values >= 0.')
  if config.num_seeds < 1:
    raise ConfigError(f'config.num_seeds={config.num_seeds} must be >= 1.')
  config_validation.validate_supervised(config.run)


def run(config, workdir: str, allow_config_change: bool = False) -> dict:
  """The sweep of a sweep config: every (gamma, seed) of ``config.run``; the summary."""
  validate(config)
  summary = run_sweep(config.run, [float(g) for g in config.gammas], config.num_seeds, workdir,
                      allow_config_change=allow_config_change)
  print(markdown(summary, config.run))
  return summary
