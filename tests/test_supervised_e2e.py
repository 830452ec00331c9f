"""End to end on the real CIFAR-10: a supervised CE + BT run, and fine-tuning a checkpoint."""

import json
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.evaluators import linear_probe
from barlow_jax.evaluators import predict
from barlow_jax.stages import finetune
from barlow_jax.models import factory
from barlow_jax.models import pretrained
from barlow_jax.stages import supervised
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from conftest import (config_module, DATA_DIR, assert_png_not_blank, needs_cifar10, pretraining_workdir,
                      snapshot, tiny_config, tiny_supervised_config)

cifar_finetune = config_module('cifar_finetune')


@needs_cifar10
def test_supervised_run_writes_results_and_plots(tmp_path, small_resnet):
  config = tiny_supervised_config()  # 8 devices, 4 steps, gamma 0.01.
  config.model.encoder = small_resnet
  results = supervised.run(config, str(tmp_path))

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['num_steps'] == 4 and saved['gamma'] == 0.01
  # Every example counted exactly once (72 = 2 batches of 32 + 8 padded).
  assert saved['train']['num_examples'] == 64
  assert saved['test']['num_examples'] == saved['aug_test']['num_examples'] == 72
  for key in ('train_accuracy', 'test_accuracy', 'aug_test_accuracy'):
    assert 0.0 <= saved[key] <= 1.0 and saved[key] == results[key]
  assert -1.0 <= saved['mean_diag_c'] <= 1.0
  assert '| augmented test |' in (tmp_path / 'results.md').read_text()
  for name in ('embeddings_pca', 'embeddings_tsne', 'cross_correlation', 'confusion_matrix'):
    assert_png_not_blank(tmp_path / f'{name}.png')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


@needs_cifar10
def test_finetune_starts_from_the_pretrained_encoder(tmp_path, small_resnet):
  pretraining = tiny_config()
  pretraining.model.encoder = small_resnet
  pretraining.seed = 1  # Another initialisation than the fine-tuning model's own (seed 0).
  pretraining_workdir(tmp_path / 'bt', pretraining, step=2)
  pretrained_files = snapshot(tmp_path / 'bt')

  config = cifar_finetune.get_config()
  config.pretrained_workdir = str(tmp_path / 'bt')
  config.data_dir, config.download = DATA_DIR, False
  config.train_split = 'train[:1000]'  # The balanced fraction of a small split: a fast label scan.
  config.label_fraction, config.num_steps, config.batch_size = 0.1, 3, 16
  config.log_every, config.checkpoint.every_steps = 1, 3
  config.eval.train_split, config.eval.test_split, config.eval.batch_size = (
      'train[:1000]', 'test[:40]', 64)
  results = finetune.run(config, str(tmp_path / 'ft'))
  assert snapshot(tmp_path / 'bt') == pretrained_files  # The pretraining workdir is only read.

  saved = json.loads((tmp_path / 'ft' / 'results.json').read_text())
  assert saved['test']['top1'] == results['test']['top1']
  assert saved['pretrained_step'] == 2 and saved['label_fraction'] == 0.1
  assert saved['num_train'] == 100  # 10% of train[:1000], 10 per class.
  assert saved['model']['encoder'] == small_resnet and saved['model']['width'] == 4
  assert saved['test']['num_examples'] == 40
  # Train accuracy on every image of the split and on the labelled fraction trained on.
  assert saved['train']['num_examples'] == 1000
  assert saved['train_labelled']['num_examples'] == 100
  assert np.array(saved['train_labelled']['confusion_matrix']).sum(axis=1).tolist() == [10] * 10
  assert '| train, the labelled fraction trained on |' in (tmp_path / 'ft' / 'results.md').read_text()
  for key in ('top1', 'top5', 'micro', 'macro'):
    assert 0.0 <= saved['test'][key] <= 1.0
  assert '| test |' in (tmp_path / 'ft' / 'results.md').read_text()

  # Three steps at the backbone's small lr leave it next to the pretrained
  # encoder, far from a fresh initialisation of the same architecture.
  encoder = pretrained.load(str(tmp_path / 'bt'), mesh_lib.make_mesh()).variables
  manager = checkpoint.manager(str(tmp_path / 'ft'), config.checkpoint.max_to_keep)
  tuned = manager.restore(3, args=ocp.args.StandardRestore())['params']['backbone']
  fresh_config = tiny_config()
  fresh_config.model.encoder = small_resnet
  fresh_model = factory.create_model(fresh_config, datasets.num_classes(fresh_config))
  fresh = state_lib.init_variables(fresh_model, 32,
                                   jax.random.PRNGKey(0))['params']['backbone']
  distance = lambda a, b: float(optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, b)))
  to_pretrained = distance(tuned, jax.device_get(encoder['params']['backbone']))
  assert to_pretrained < 0.01 * distance(tuned, fresh), to_pretrained


@needs_cifar10
def test_finetune_classifier_starts_as_the_linear_probe(tmp_path, small_resnet):
  pretraining = tiny_config()
  pretraining.model.encoder = small_resnet
  pretraining_workdir(tmp_path / 'bt', pretraining, step=2)
  config = cifar_finetune.get_config()
  config.pretrained_workdir, config.data_dir, config.download = str(tmp_path / 'bt'), DATA_DIR, False
  config.train_split, config.label_fraction, config.eval.batch_size = 'train[:1000]', 0.1, 64
  config.probe.epochs, config.head_init = 5, 'linear_probe'
  mesh = mesh_lib.make_mesh()
  encoder = pretrained.load(config.pretrained_workdir, mesh)
  init = finetune.initial_variables(config, encoder, datasets.from_config(encoder.config), mesh)

  # Reference: the linear probe fitted on the same labelled images' features.
  dataset = datasets.from_config(encoder.config)
  feats = predict.predict_split(dataset, predict.make_predict_fn(
      encoder.config, encoder.model, None, outputs=('features',), spec=dataset.spec),
      encoder.variables, 'train[:1000]', 64, mesh)
  keep = pipeline.balanced_subset(feats['label'], 0.1, 10, config.fraction_seed)
  probe = linear_probe.train_linear_probe(
      feats['features'][keep], feats['label'][keep], 10,
      linear_probe.ProbeHParams(epochs=5, batch_size=256, lr=config.probe.lr,
                                weight_decay=config.probe.weight_decay, seed=config.seed),
      per_feature=False)
  head = jax.device_get(init['params']['classifier'])
  logits = feats['features'][keep] @ head['kernel'] + head['bias']
  np.testing.assert_allclose(logits, probe(feats['features'][keep]), rtol=1e-3, atol=1e-3)
  # The initial modules are the fine-tuning model's own, with its shapes.
  model = factory.create_supervised_model(finetune.supervised_config(config, encoder.config), 10)
  fresh = state_lib.init_variables(model, 32, jax.random.PRNGKey(0))
  assert set(init['params']) == {'backbone', 'classifier'}
  for name in init['params']:
    assert (jax.tree.map(np.shape, jax.device_get(init['params'][name]))
            == jax.tree.map(np.shape, fresh['params'][name]))

  config.head_init = 'random'
  dataset = datasets.from_config(encoder.config)
  assert set(finetune.initial_variables(config, encoder, dataset, mesh)['params']) == {'backbone'}
