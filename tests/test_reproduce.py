"""The one-command comparison of Ghosh, Ghosh & Das (2022): what each row runs, and its table."""

import json

import pytest

from barlow_jax import config_files
from barlow_jax import config_validation
from barlow_jax import errors
from barlow_jax.experiments import reproduce
from barlow_jax.runtime import workdir as workdir_lib
from conftest import DATA_DIR


def _configs(fraction, scale, cpu_epochs, cpu_supervised_epochs, data_dir):
  config = config_files.load('cifar_fraction_comparison')
  config.fraction, config.scale, config.data_dir = fraction, scale, data_dir
  config.cpu_epochs, config.cpu_supervised_epochs = cpu_epochs, cpu_supervised_epochs
  reproduce.validate(config)
  runs = reproduce.stage_configs(config, 'runs/x/pretrain')
  assert runs.probe.pretrained_workdir == runs.finetune.pretrained_workdir == 'runs/x/pretrain'
  return runs


def test_every_run_uses_the_same_fraction_and_the_cpu_rows_the_same_encoder():
  pre, probe, tune, base, sup = _configs(0.2, 'cpu', 7.0, 3.0, DATA_DIR)
  assert pre.fraction == probe.label_fraction == tune.label_fraction == base.label_fraction == 0.2
  assert pre.num_epochs == 7.0 and pre.model.encoder == 'resnet18'
  assert sorted(sup) == ['supervised', 'supervised_noaug']
  for config in sup.values():
    assert config.fraction == 0.2 and config.num_epochs == 3.0 and config.gamma == 0.0
    assert (config.model.encoder, config.model.width) == (pre.model.encoder, pre.model.width)
    config_validation.validate_supervised(config)
  assert sup['supervised'].augment.view1.crop == 1.0
  assert sup['supervised_noaug'].augment.view1.crop == 0.0
  assert sup['supervised_noaug'].augment.view1.flip == 0.0
  config_validation.validate_pretrain(pre)
  # At full scale, seed 000's architecture and lengths.
  pre, _, _, _, sup = _configs(0.1, 'full', 7.0, 3.0, None)
  assert (pre.model.encoder, pre.num_epochs) == ('resnet50', 1000.0)
  assert (sup['supervised'].model.encoder, sup['supervised'].num_epochs) == ('resnet50', 100.0)


def _metrics(micro: float, macro: float) -> dict:
  return {'micro': micro, 'macro': macro}


def test_table_puts_our_numbers_beside_the_seeds():
  pre, _, _, _, sup = _configs(0.1, 'cpu', 30.0, 15.0, None)
  text = reproduce.table(
      0.1, pre,
      probe_results={'linear': _metrics(0.5, 0.49), 'knn_k20': _metrics(0.45, 0.44)},
      finetune_results={'test': _metrics(0.6, 0.59), 'epochs': 20.0},
      base_results={'knn_k5': _metrics(0.3, 0.29), 'logistic_regression': _metrics(0.4, 0.39),
                    'random_forest': _metrics(0.41, 0.4)},
      supervised_results={'supervised': (sup['supervised'], {'test': _metrics(0.35, 0.34)}),
                          'supervised_noaug': (sup['supervised_noaug'],
                                               {'test': _metrics(0.25, 0.24)})})
  lines = text.splitlines()
  assert lines[0] == '# Ghosh, Ghosh & Das (2022) comparison, CIFAR-10, balanced 10% of train'
  assert '| KNN (k=5), pixels | 30.00 | 29.00 | 28.00 | 24.10 | sklearn |' in lines
  assert '| Logistic regression, pixels | 40.00 | 39.00 | 33.25 | 32.67 | sklearn |' in lines
  assert ('| Supervised from scratch, no augmentation | 25.00 | 24.00 | 13.68 | 7.03 | '
          'resnet18 w8, 15 ep |') in lines
  assert ('| Barlow Twins + linear probe | 50.00 | 49.00 | 66.44 | 66.31 | '
          f'resnet18 w8, proj {pre.model.projector}, 30 ep |') in lines
  assert '| Barlow Twins + kNN (k=20) | 45.00 | 44.00 | — | — |' in text
  assert ('| Barlow Twins + fine-tuning | 60.00 | 59.00 | — | — | '
          f'resnet18 w8, proj {pre.model.projector}, 30 ep, then 20 ep |') in lines


def test_a_finished_row_is_reused_only_under_the_config_it_recorded(tmp_path):
  _, probe, tune, _, _ = _configs(0.1, 'cpu', 30.0, 15.0, DATA_DIR)
  calls = []

  def fake_stage(config, workdir, allow_config_change=False):
    calls.append(allow_config_change)
    workdir_lib.record_start(workdir, config, None, [])
    workdir_lib.write_results(workdir, {'linear': 0.5}, '')
    return {'linear': 0.5}

  row = str(tmp_path / 'probe')
  (tmp_path / 'probe').mkdir()
  assert reproduce._reuse_or_run(row, fake_stage, probe, False) == {'linear': 0.5}
  assert reproduce._reuse_or_run(row, fake_stage, probe, False) == {'linear': 0.5}
  assert calls == [False]  # Reused.
  probe.probe.epochs = 7
  with pytest.raises(errors.ConfigChangedError, match=r'probe\.epochs: 100 -> 7'):
    reproduce._reuse_or_run(row, fake_stage, probe, False)
  reproduce._reuse_or_run(row, fake_stage, probe, True)
  assert calls == [False, True]  # Run again under the new config.
  # A stage that records another config than it is given: compared with that one.
  recorded = json.loads((tmp_path / 'probe' / 'config.json').read_text())
  assert recorded['probe']['epochs'] == 7
  assert reproduce._reuse_or_run(row, fake_stage, tune, False, recorded_as=probe) == {
      'linear': 0.5}
