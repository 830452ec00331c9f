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
