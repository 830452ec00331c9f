"""Evaluation: kNN vs brute force, scores vs scikit-learn, padded features on 8 devices, restore."""

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from barlow_jax.data import datasets
from barlow_jax import errors
from barlow_jax.data import augment
from barlow_jax.evaluators import knn
from barlow_jax.evaluators import linear_probe
from barlow_jax.evaluators import metrics
from barlow_jax.models import factory
from barlow_jax.models import pretrained
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from conftest import features, needs_cifar10, pretraining_workdir, tiny_config


def brute_force_knn(train_x, train_y, test_x, num_classes, k, t):
  """Loops, float64: cosine similarity, k nearest, votes exp(sim / t)."""
  tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  out = np.zeros((len(test_x), num_classes))
  for i, q in enumerate(test_x):
    sims = tr @ (q / np.linalg.norm(q))
    for j in np.argsort(-sims)[:k]:
      out[i, train_y[j]] += np.exp(sims[j] / t)
  return out


@pytest.mark.parametrize('k', [1, 20])
def test_knn_equals_brute_force(k):
  rng = np.random.default_rng(0)
  train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
  train_y = rng.integers(0, 5, 300)
  got = knn.knn_scores(train_x.astype(np.float32), train_y, test_x.astype(np.float32), 5, k,
                            temperature=0.1, chunk=16)
  expected = brute_force_knn(train_x, train_y, test_x, 5, k, 0.1)
  np.testing.assert_allclose(got, expected, rtol=2e-4)
  np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_micro_macro_match_sklearn():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 7, 400)
  scores = rng.normal(size=(400, 7)) + 2.0 * np.eye(7)[labels] * (rng.uniform(size=400) < 0.5)[:, None]
  m = metrics.classification_metrics(scores, labels, 7)
  pred = scores.argmax(1)
  assert m['micro'] == pytest.approx(skm.accuracy_score(labels, pred))
  assert m['micro'] == pytest.approx(skm.f1_score(labels, pred, average='micro'))
  assert m['macro'] == pytest.approx(skm.f1_score(labels, pred, average='macro'))
  assert m['top1'] == pytest.approx(skm.accuracy_score(labels, pred))
  assert m['top5'] == pytest.approx(skm.top_k_accuracy_score(labels, scores, k=5))
  np.testing.assert_array_equal(m['confusion_matrix'], skm.confusion_matrix(labels, pred))
  assert m['per_class_accuracy'] == pytest.approx(
      skm.recall_score(labels, pred, average=None).tolist())


def test_linear_probe_learns_a_separable_problem():
  rng = np.random.default_rng(2)
  centers = rng.normal(size=(4, 8)) * 3
  y = rng.integers(0, 4, 800)
  x = (centers[y] + rng.normal(size=(800, 8))).astype(np.float32)
  classify = linear_probe.train_linear_probe(
      x[:600], y[:600], 4, linear_probe.ProbeHParams(epochs=20, batch_size=64, lr=0.1,
                                                     weight_decay=0.0))
  assert (classify(x[600:]).argmax(1) == y[600:]).mean() > 0.95


def test_probe_folded_into_a_dense_layer_gives_the_probes_logits():
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(300, 6)) * rng.uniform(0.1, 5, 6) + rng.normal(size=6) * 4).astype(np.float32)
  y = rng.integers(0, 3, 300)
  params, mean, std = linear_probe.fit_linear_probe(
      x, y, 3, linear_probe.ProbeHParams(epochs=5, batch_size=50, lr=0.1, weight_decay=0.0))
  dense = linear_probe.as_dense(params, mean, std)
  # Independent reference: standardise, then the probe's own weights (float64).
  expected = ((x - mean) / std) @ np.asarray(params['w'], np.float64) + np.asarray(params['b'])
  np.testing.assert_allclose(x @ dense['kernel'] + dense['bias'], expected, rtol=1e-4, atol=1e-4)
  assert dense['kernel'].shape == (6, 3) and dense['bias'].shape == (3,)


@needs_cifar10
def test_padded_features_count_every_example_once_on_8_devices(small_resnet):
  config = tiny_config()
  config.model.encoder = small_resnet  # The model and batch of the test below: one compile less.
  model = factory.create_model(config, datasets.num_classes(config))
  variables = state_lib.init_variables(model, 32, jax.random.PRNGKey(0))
  split = 'test[:75]'  # Odd size: 4 full batches of 16 and one of 11, not a multiple of 8.
  f8, y8 = features(config, model, variables, split, 16, mesh_lib.make_mesh())
  f1, y1 = features(config, model, variables, split, 16, mesh_lib.make_mesh(jax.devices()[:1]))
  assert f8.shape == (75, f8.shape[1]) and len(y8) == 75
  np.testing.assert_array_equal(y8, y1)
  np.testing.assert_allclose(f8, f1, rtol=1e-5, atol=1e-6)


@needs_cifar10
def test_restore_with_another_architecture_names_the_mismatch(tmp_path, small_resnet):
  config = tiny_config()
  config.model.encoder = small_resnet
  pretraining_workdir(tmp_path, config, step=1)
  encoder = pretrained.load(str(tmp_path), mesh_lib.make_mesh())
  assert encoder.step == 1 and 'backbone' in encoder.variables['params']
  other = tiny_config()
  other.model.encoder = small_resnet
  other.model.width = 8
  (tmp_path / 'config.json').write_text(other.to_json_best_effort())
  with pytest.raises(errors.CheckpointError,
                     match=r"differing arrays(.|\n)*params\['backbone'\]\['BasicBlock_0'\]"
                           r"\['BatchNorm_0'\]\['bias'\]: checkpoint \(4,\) vs config \(8,\)"):
    pretrained.load(str(tmp_path), mesh_lib.make_mesh())
  assert not (tmp_path / 'checkpoints' / '1.orbax-checkpoint-tmp').exists()


@needs_cifar10
def test_augmented_features_identity_view_and_device_count(small_resnet):
  config = tiny_config()
  config.model.encoder = small_resnet
  model = factory.create_model(config, datasets.num_classes(config))
  variables = state_lib.init_variables(model, 32, jax.random.PRNGKey(0))
  split, eight, one = 'test[:40]', mesh_lib.make_mesh(), mesh_lib.make_mesh(jax.devices()[:1])
  clean, y = features(config, model, variables, split, 16, eight)
  off = augment.ViewAugment(crop=0.0, flip=0.0, jitter=0.0, grayscale=0.0, blur=0.0)
  same, _ = features(config, model, variables, split, 16, eight, off)
  np.testing.assert_allclose(same, clean, rtol=1e-5, atol=1e-6)

  crop_flip = augment.ViewAugment(crop=1.0, flip=0.5, jitter=0.0, grayscale=0.0, blur=0.0)
  aug8, y8 = features(config, model, variables, split, 16, eight, crop_flip, seed=3)
  aug1, _ = features(config, model, variables, split, 16, one, crop_flip, seed=3)
  np.testing.assert_array_equal(y8, y)
  np.testing.assert_allclose(aug8, aug1, rtol=1e-5, atol=1e-6)
  assert np.abs(aug8 - clean).max() > 1e-2  # The views are really augmented.
