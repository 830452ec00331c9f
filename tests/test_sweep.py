"""The gamma x seed sweep: resume after an interruption, the summary table, figures."""

import json
import os

import numpy as np
import pytest

from barlow_jax import config_files
from barlow_jax import errors
from barlow_jax import plots
from barlow_jax.experiments import sweep
from barlow_jax.runtime import workdir as workdir_lib
from conftest import assert_png_not_blank, tiny_supervised_config

GAMMAS = (0.0, 1e-3, 1e-2)


class Interrupted(Exception):
  pass


def _accuracy(gamma, seed, split):
  """Made-up results: gamma 1e-3 is best; the seed adds a little noise."""
  bonus = {0.0: 0.0, 1e-3: 0.02, 1e-2: 0.01}[gamma]
  return {'train': 0.9, 'test': 0.7, 'aug_test': 0.6}[split] + bonus + 0.003 * seed


class FakeRun:
  """Stands in for supervised.run: records calls, writes results, can crash."""

  def __init__(self, crash_at=None):
    self.calls, self.crash_at = [], crash_at

  def __call__(self, config, workdir, allow_config_change=False):
    if len(self.calls) == self.crash_at:
      raise Interrupted()
    self.calls.append((config.gamma, config.seed))
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_config(workdir, config)  # As trainer.fit records it.
    rng = np.random.default_rng(int(config.seed * 1000 + config.gamma * 1e4))
    labels = np.arange(60) % 10
    np.savez(os.path.join(workdir, 'embeddings_2d.npz'), labels=labels,
             pca=rng.normal(size=(60, 2)) + labels[:, None], tsne=rng.normal(size=(60, 2)))
    results = {f'{k}_accuracy': _accuracy(config.gamma, config.seed, k)
               for k in ('train', 'test', 'aug_test')}
    results['class_names'] = [f'class {i}' for i in range(10)]
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f)
    return results


def test_interrupted_sweep_resumes_without_rerunning_finished_runs(tmp_path):
  config = tiny_supervised_config()
  first = FakeRun(crash_at=4)
  with pytest.raises(Interrupted):
    sweep.run_sweep(config, GAMMAS, 2, str(tmp_path), run_fn=first)
  assert first.calls == [(0.0, 0), (1e-3, 0), (1e-2, 0), (0.0, 1)]  # Seed by seed.
  assert not (tmp_path / 'results.md').exists()

  second = FakeRun()
  summary = sweep.run_sweep(config, GAMMAS, 2, str(tmp_path), run_fn=second)
  assert second.calls == [(1e-3, 1), (1e-2, 1)]
  again = FakeRun()
  sweep.run_sweep(config, GAMMAS, 2, str(tmp_path), run_fn=again)
  assert again.calls == []

  test = summary['table']['0.001']['test_accuracy']
  expected = [100 * _accuracy(1e-3, s, 'test') for s in (0, 1)]
  assert test['mean'] == pytest.approx(np.mean(expected))
  assert test['std'] == pytest.approx(np.std(expected, ddof=1))
  assert summary['best_gamma'] == 1e-3
  assert summary['comparison']['difference'] == pytest.approx(2.0)

  table = (tmp_path / 'results.md').read_text()
  assert 'γ = 0 (CE baseline)' in table and '| Train Acc |' in table
  assert '| Test Acc - aug test data |' in table and '**' in table
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['best_gamma'] == 1e-3 and saved['config']['model']['encoder'] == 'resnet18'
  for method in ('pca', 'tsne'):
    assert_png_not_blank(tmp_path / f'embeddings_{method}.png')


def test_finished_runs_are_reused_only_under_the_config_they_recorded(tmp_path):
  config = tiny_supervised_config()
  sweep.run_sweep(config, (0.0, 1e-2), 1, str(tmp_path), run_fn=FakeRun())
  where = tmp_path / 'gamma_0' / 'seed_0'
  before = (where / 'results.json').read_text()

  config.log_every = 1  # Changes nothing a run computes: reused.
  again = FakeRun()
  sweep.run_sweep(config, (0.0, 1e-2), 1, str(tmp_path), run_fn=again)
  assert again.calls == []

  config.lambd = 0.01  # Another run: its old numbers are not this config's.
  with pytest.raises(errors.ConfigChangedError) as refused:
    sweep.run_sweep(config, (0.0, 1e-2), 1, str(tmp_path), run_fn=FakeRun())
  assert f'{where} holds finished results' in str(refused.value)
  assert 'lambd: 0.0051 -> 0.01' in str(refused.value)
  assert (where / 'results.json').read_text() == before

  rerun = FakeRun()
  sweep.run_sweep(config, (0.0, 1e-2), 1, str(tmp_path), run_fn=rerun, allow_config_change=True)
  assert rerun.calls == [(0.0, 0), (1e-2, 0)]


def test_single_seed_has_zero_std_and_no_stderr_ratio(tmp_path):
  summary = sweep.run_sweep(tiny_supervised_config(), (0.0, 1e-2), 1, str(tmp_path),
                            run_fn=FakeRun())
  assert summary['table']['0']['test_accuracy']['std'] == 0.0
  assert summary['comparison']['difference_over_stderr'] is None


@pytest.mark.parametrize('method', ['pca', 'tsne'])
def test_embedding_plot_is_written_and_not_blank(tmp_path, method):
  rng = np.random.default_rng(0)
  labels = np.arange(90) % 10
  features = rng.normal(size=(90, 24)) + 3 * np.eye(24)[labels]
  points = plots.project_2d(features, method)
  assert points.shape == (90, 2) and np.isfinite(points).all()
  path = tmp_path / f'{method}.png'
  plots.embeddings_png([(points, labels, 'a'), (points[::-1], labels, 'b')], str(path),
                       [f'c{i}' for i in range(10)], 'title')
  assert_png_not_blank(path)


def test_sweep_config_names_the_run_config_and_is_validated():
  config = config_files.load('supervised_bt_sweep', 'stl10_supervised_bt')
  assert config.mode == 'sweep' and config.run.dataset == 'stl10'
  config = config_files.load('supervised_bt_sweep', 'cifar_supervised_bt:vgg16,crop')
  assert (config.run.model.encoder, config.run.ablation) == ('vgg16', 'crop')
  sweep.validate(config)
  config.gammas = (0.0, -1.0)
  with pytest.raises(errors.ConfigError, match=r'config\.gammas=\(0\.0, -1\.0\)'):
    sweep.validate(config)


def _summary(test_means: dict, std: float = 1.0, seeds=(0, 1, 2)) -> dict:
  """summarize() of runs whose seeds spread ±std around the given test accuracies (percent)."""
  offsets = (-std, 0.0, std)[:len(seeds)] if len(seeds) > 1 else (0.0,)
  runs = {(g, s): {'train_accuracy': 0.9, 'test_accuracy': (mean + offsets[i]) / 100,
                   'aug_test_accuracy': 0.5}
          for g, mean in test_means.items() for i, s in enumerate(seeds)}
  return sweep.summarize(runs, list(test_means), list(seeds))


def _bold_columns(table: str) -> set:
  """Indices of the columns with a bold cell, from the Markdown table's rows."""
  rows = [line.split(' | ') for line in table.splitlines() if line.startswith('| Test Acc')]
  return {i for row in rows for i, cell in enumerate(row) if cell.startswith('**')}


def test_table_bolds_the_baseline_when_it_wins_and_says_gamma_does_not_beat_it():
  # The case seen on a real tiny sweep: the best gamma > 0 (12.11) below the baseline (12.70).
  summary = _summary({0.0: 12.70, 1e-3: 12.11, 1e-2: 11.50}, std=0.3)
  text = sweep.markdown(summary, tiny_supervised_config())
  assert _bold_columns(text) == {1}  # Column 0 is the row label; 1 is gamma = 0.
  assert '**12.70 ± 0.30**' in text and '**12.11' not in text
  # Difference -0.59; standard error sqrt((0.3^2 + 0.3^2) / 3) = 0.2449: -2.4 of them.
  assert ('Best γ > 0 by mean test accuracy: 0.001, 12.11 against 12.70 for the baseline '
          '(γ = 0): it does not beat the baseline (-0.59 points, -2.4 standard errors of the '
          'difference; standard error 0.24).') in text


def test_table_bolds_the_best_gamma_when_it_beats_the_baseline():
  summary = _summary({0.0: 63.62, 1e-3: 64.00, 1e-2: 62.96}, std=0.5)
  text = sweep.markdown(summary, tiny_supervised_config())
  assert _bold_columns(text) == {2}
  # Difference 0.38; standard error sqrt(2 * 0.25 / 3) = 0.4082: +0.9 of them.
  assert 'it beats the baseline (+0.38 points, +0.9 standard errors' in text
  assert '; standard error 0.41).' in text


def test_table_with_one_seed_says_there_is_no_standard_error():
  summary = _summary({0.0: 50.0, 1e-2: 51.0}, seeds=(0,))
  text = sweep.markdown(summary, tiny_supervised_config())
  assert _bold_columns(text) == {2}
  assert 'it beats the baseline (+1.00 points; one seed, so no standard error).' in text
