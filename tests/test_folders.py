"""Datasets beyond the four tuned ones: image folders (folder:/root) and any TFDS dataset by name.

The folders are written here with PIL (mixed sizes, PNG and JPEG, grayscale,
RGBA and palette images, a corrupt file, a stray text file); the TFDS dataset
is a tiny GeneratorBasedBuilder defined here. Nothing is downloaded.
"""

import json
import logging
import os
import re

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from barlow_jax import config_files
from barlow_jax import config_validation
from barlow_jax import main
from barlow_jax import errors
from barlow_jax.data import datasets
from barlow_jax.data import folders
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
from barlow_jax.data import augment
from barlow_jax.stages import linear
import cli_runs
from conftest import pretraining_workdir, snapshot, tiny_config

CLASSES = ('cat', 'dog')
# Per class: 20 train images, 8 test; sizes differ; every third one PNG.
TRAIN_PER_CLASS, TEST_PER_CLASS = 20, 8


def _write(path, image: Image.Image) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def _random_rgb(rng, height: int, width: int, tint: int) -> Image.Image:
  """A smooth random gradient whose colour differs by class (``tint``), with mild noise."""
  y, x = np.mgrid[:height, :width] / max(height, width)
  a, b, c = rng.uniform(0, 100, 3)
  base = a * y[..., None] + b * x[..., None] + c + rng.normal(0, 1, (height, width, 3))
  base[..., tint % 3] += 120
  return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_folder(root, unlabelled: int = 0) -> dict:
  """The test layout under ``root``; returns {split: [(path, label)]} of the decodable images."""
  rng = np.random.default_rng(0)
  files = {'train': [], 'test': []}
  for split, count in (('train', TRAIN_PER_CLASS), ('test', TEST_PER_CLASS)):
    for label, name in enumerate(CLASSES):
      for i in range(count):
        ext = 'png' if i % 3 == 0 else 'jpg'
        path = os.path.join(root, split, name, f'{i:03d}.{ext}')
        _write(path, _random_rgb(rng, 24 + i, 36 - i // 2, label))
        files[split].append((path, label))
  odd = os.path.join(root, 'train', 'cat')
  gray = _random_rgb(rng, 30, 30, 0).convert('L')
  _write(os.path.join(odd, 'gray.png'), gray)
  rgba = _random_rgb(rng, 31, 29, 0)
  rgba.putalpha(Image.fromarray(rng.integers(0, 255, (31, 29), np.uint8)))  # Alpha is dropped.
  _write(os.path.join(odd, 'nested', 'rgba.png'), rgba)  # Deeper inside a class folder.
  palette = _random_rgb(rng, 26, 26, 1).convert('P', palette=Image.Palette.ADAPTIVE, colors=64)
  _write(os.path.join(root, 'train', 'dog', 'palette.png'), palette)
  files['train'] += [(os.path.join(odd, 'gray.png'), 0),
                     (os.path.join(odd, 'nested', 'rgba.png'), 0),
                     (os.path.join(root, 'train', 'dog', 'palette.png'), 1)]
  with open(os.path.join(root, 'train', 'dog', 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8 not a JPEG')
  with open(os.path.join(root, 'train', 'README.txt'), 'w') as f:
    f.write('not an image')
  for i in range(unlabelled):  # Directly under the split: unlabelled.
    path = os.path.join(root, 'train', f'loose_{i}.jpg')
    _write(path, _random_rgb(rng, 28, 28, 2))
    files['train'].append((path, -1))
  return files


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  files = write_folder(str(root))
  data_dir = str(tmp_path_factory.mktemp('data_dir'))
  dataset = datasets.resolve(f'folder:{root}', data_dir=data_dir, download=False, crop_size=32)
  return root, files, data_dir, dataset


def _all_examples(builder, split: str):
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return list(ds.as_numpy_iterator())


def test_folder_is_prepared_with_labels_by_folder_name_rgb_images_and_the_bad_file_left_out(
    folder):
  root, files, _, dataset = folder
  assert dataset.class_names == list(CLASSES)
  assert dataset.spec.num_classes == 2 and not dataset.spec.fixed_size
  assert (dataset.spec.image_size, dataset.spec.eval_resize) == (32, 37)
  assert dataset.spec.test_split == 'test'
  examples = _all_examples(dataset.builder, 'train')
  # Every decodable image once (broken.jpg and README.txt are not).
  assert len(examples) == len(files['train']) == 2 * TRAIN_PER_CLASS + 3
  assert sorted(int(e['label']) for e in examples) == sorted(l for _, l in files['train'])
  # Each stored image is its file as RGB (PIL's convert), within a few levels:
  # JPEG decoders differ, and non-JPEG files are re-encoded at quality 95.
  by_shape_and_label = {}
  for path, label in files['train']:
    with Image.open(path) as im:
      rgb = np.asarray(im.convert('RGB'), np.float32)
    by_shape_and_label.setdefault((rgb.shape, label), []).append(rgb)
  for e in examples:
    assert e['image'].shape[-1] == 3
    candidates = by_shape_and_label[(e['image'].shape, int(e['label']))]
    error = min(np.abs(c - e['image']).mean() for c in candidates)
    assert error < 2.0, (e["image"].shape, error)
  # RGB JPEG files are stored byte for byte.
  raw = dataset.builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  stored = {e['image'] for e in raw.as_numpy_iterator()}
  jpegs = [p for p, _ in files['train'] if p.endswith('.jpg')]
  assert len(jpegs) > 20 and all(open(p, 'rb').read() in stored for p in jpegs)
  root, data_dir = str(root), folder[2]
  copy = folders.copy_dir(root, folders.scan(root).fingerprint, data_dir)
  with open(os.path.join(copy, 'barlow_jax_folder.json')) as f:
    info = json.load(f)
  assert info['skipped'] == [os.path.join('train', 'dog', 'broken.jpg')]
  assert info['ignored'] == 1


def test_channel_statistics_are_those_of_the_training_images(folder):
  _, files, _, dataset = folder
  pixels = []
  for path, _ in files['train']:
    with Image.open(path) as im:
      pixels.append(np.asarray(im.convert('RGB'), np.float64).reshape(-1, 3) / 255)
  pixels = np.concatenate(pixels)
  # The copy is JPEG: its statistics are the originals' up to compression noise.
  np.testing.assert_allclose(dataset.spec.mean, pixels.mean(0), atol=0.01)
  np.testing.assert_allclose(dataset.spec.std, pixels.std(0), atol=0.01)


def test_a_changed_folder_is_prepared_again_and_an_unchanged_one_reused(tmp_path):
  root = tmp_path / 'images'
  write_folder(str(root))
  data_dir = str(tmp_path / 'data')
  first = datasets.resolve(f'folder:{root}', data_dir=data_dir, download=False, crop_size=32)
  records = first.builder.info.splits['train'].file_instructions[0].filename
  stamp = os.stat(records).st_mtime_ns
  again = datasets.resolve(f'folder:{root}', data_dir=data_dir, download=False, crop_size=32)
  assert again.builder.data_dir == first.builder.data_dir
  assert os.stat(records).st_mtime_ns == stamp  # Read, not written again.
  _write(str(root / 'train' / 'cat' / 'new.png'), Image.new('RGB', (20, 20), (9, 9, 9)))
  changed = datasets.resolve(f'folder:{root}', data_dir=data_dir, download=False, crop_size=32)
  assert changed.builder.data_dir != first.builder.data_dir
  assert (changed.builder.info.splits['train'].num_examples
          == first.builder.info.splits['train'].num_examples + 1)


def test_unlabelled_images_directly_under_the_split_get_label_minus_one(tmp_path):
  root = tmp_path / 'images'
  files = write_folder(str(root), unlabelled=3)
  dataset = datasets.resolve(f'folder:{root}', data_dir=str(tmp_path / 'd'), download=False,
                             crop_size=32)
  labels = [int(e['label']) for e in _all_examples(dataset.builder, 'train')]
  assert labels.count(-1) == 3 and len(labels) == len(files['train'])
  # An unlabelled-only folder is a pretraining set: one unnamed class, every label -1.
  only = tmp_path / 'only'
  for i in range(4):
    _write(str(only / 'train' / f'{i}.jpg'), Image.new('RGB', (20 + i, 20), (i, 0, 0)))
  unlabelled = datasets.resolve(f'folder:{only}', data_dir=str(tmp_path / 'd'), download=False,
                                crop_size=32)
  assert [int(e['label']) for e in _all_examples(unlabelled.builder, 'train')] == [-1] * 4


def _bad_layouts(tmp_path):
  write_folder(str(tmp_path / 'ok'))
  os.makedirs(tmp_path / 'empty' / 'train')
  (tmp_path / 'empty' / 'train' / 'a.txt').write_text('x')
  for split, names in (('train', ('cat', 'dog', 'fox')), ('test', ('cat', 'dog', 'owl'))):
    for name in names:
      _write(str(tmp_path / 'differ' / split / name / '1.png'), Image.new('RGB', (8, 8)))
  return tmp_path


@pytest.mark.parametrize('name, message', [
    ('missing', r'missing is not a directory'),
    ('empty', r'no image files \(\.jpg, \.jpeg, \.png\) under .*empty'),
    ('differ', r"class folders of 'train' and 'test' differ: only in 'train': \['fox'\]; "
               r"only in 'test': \['owl'\]"),
])
def test_bad_folders_are_config_errors_naming_the_path(tmp_path, name, message):
  root = _bad_layouts(tmp_path)
  with pytest.raises(errors.ConfigError, match=message):
    datasets.resolve(f'folder:{root / name}', data_dir=str(tmp_path / 'd'), download=False,
                     crop_size=32)


def test_an_undecodable_file_is_fatal_when_asked_naming_it(tmp_path):
  write_folder(str(tmp_path / 'ok'))
  with pytest.raises(errors.ConfigError, match=r'not a decodable image: .*broken\.jpg'):
    datasets.resolve(f'folder:{tmp_path / "ok"}', data_dir=str(tmp_path / 'd'), download=False,
                     crop_size=32, bad_images='fatal')
  # Nothing prepared: the next (skipping) resolve prepares afresh.
  assert not list((tmp_path / 'd').rglob('*.tfrecord*'))


def test_a_missing_split_names_the_folder(folder):
  _, _, _, dataset = folder
  with pytest.raises(errors.ConfigError, match=r"config.train_split='val' is not a split of the "
                     r"folder .*images.*'test' \(16\), 'train' \(43\)"):
    pipeline.load_train_data(dataset, 'val')


def test_each_process_reads_a_disjoint_share_of_a_folder(folder, monkeypatch):
  _, files, _, dataset = folder
  shares = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda *_, i=index: i)
    monkeypatch.setattr(jax, 'process_count', lambda *_: 2)
    data = pipeline.load_train_data(dataset, 'train')
    ids = pipeline._scan_labels(data.builder, data.split)[0]
    shares.append(set(ids.tolist()))
  assert not shares[0] & shares[1]
  assert len(shares[0]) + len(shares[1]) == len(files['train'])


def test_two_processes_prepare_a_folder_once_stop_together_and_read_disjoint_shares(tmp_path):
  """Two real JAX processes (tests/folder_process.py) resolve one folder, as every stage does.

  With bad_images='fatal', process 0 stops on the undecodable file while
  preparing, and process 1 stops with it (it used to wait for process 0 at a
  barrier); with 'skip', process 0 prepares the copy and each process reads
  its own half of the training images.
  """
  root = tmp_path / 'images'
  files = write_folder(str(root))
  port = cli_runs.free_port()
  outputs = [[line for line in out.splitlines() if line.startswith(('refused', 'share'))]
             for out, _ in cli_runs.run_processes(
                 'folder_process.py', [[str(port), str(i), str(root), str(tmp_path / 'data_dir')]
                                       for i in range(2)], cli_runs.env(), timeout=180)]
  assert [o[0] for o in outputs] == ['refused ConfigError', 'refused WorkdirError'], outputs
  shares = [set(o[1].split()[1:]) for o in outputs]
  assert shares[0] and shares[1] and not shares[0] & shares[1]
  assert len(shares[0] | shares[1]) == len(files['train'])
  assert abs(len(shares[0]) - len(shares[1])) <= 1


def test_the_folder_stream_resumes_exactly(folder):
  """Batch s depends only on (seed, s), host crops included: what makes a resume exact."""
  _, _, _, dataset = folder
  data = pipeline.load_train_data(dataset, 'train')
  view = augment.view_from_config(tiny_config().augment.view1)
  crops = host_crop.HostCrops(32, (view, view))

  def take(start, n):
    ds = pipeline.train_dataset(data, 8, seed=3, start_step=start, shuffle_buffer=16, crops=crops)
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]

  straight = take(0, 8)  # 64 examples: past the 43-image epoch.
  assert straight[0]['image'].shape == (8, 2, 32, 32, 3)
  for a, b in zip(take(5, 3), straight[5:]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_unknown_tfds_names_exit_with_close_matches():
  with pytest.raises(errors.ConfigError, match=r"config.dataset='cifar01'.*Did you mean.*cifar10"):
    datasets.check_name('cifar01', None)
  with pytest.raises(errors.ConfigError, match=r"config.dataset='mnist' has 1-channel images"):
    datasets.check_name('mnist', None)


class FakeFlowers(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset not in datasets.DATASETS: 3 classes of 16 x 16 PNGs, a 'validation' split."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(16, 16, 3)),
        'label': tfds.features.ClassLabel(names=['rose', 'tulip', 'daisy'])}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(48, 0), 'validation': self._generate_examples(24, 1)}

  def _generate_examples(self, count: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
      image = rng.integers(0, 100, (16, 16, 3)).astype(np.uint8)
      image[..., i % 3] += 150
      yield i, {'image': image, 'label': i % 3}


def test_a_tfds_dataset_outside_the_table_streams_and_probes(tmp_path, small_resnet):
  """Its spec from the builder's info, its statistics recorded, its class names in results.md.

  The training stream is checked batch by batch; the train step itself is the
  one of every fixed-size dataset (its spec's mean/std in, tests/test_train_step.py).
  The probed encoder is an untrained pretraining workdir (conftest.pretraining_workdir)
  of a small encoder.
  """
  data_dir = str(tmp_path / 'tfds')
  FakeFlowers(data_dir=data_dir).download_and_prepare()
  config = tiny_config()
  config.model.encoder = small_resnet
  config.dataset, config.data_dir, config.train_split = 'fake_flowers', data_dir, 'train'
  config.augment.crop_size = 16
  config_validation.validate_pretrain(config)
  dataset = datasets.from_config(config)
  assert (dataset.spec.image_size, dataset.spec.fixed_size, dataset.spec.test_split) == (
      16, True, 'validation')  # No 'test' split.
  train = _all_examples(tfds.builder('fake_flowers', data_dir=data_dir), 'train')
  pixels = np.stack([e['image'] for e in train]).reshape(-1, 3) / 255
  np.testing.assert_allclose(dataset.spec.mean, pixels.mean(0), atol=1e-4)
  np.testing.assert_allclose(dataset.spec.std, pixels.std(0), atol=1e-4)
  data = pipeline.load_train_data(dataset, 'train')
  batches = pipeline.train_dataset(data, 16, seed=0).take(3).as_numpy_iterator()
  seen = np.concatenate([b['image'].reshape(16, -1) for b in batches])
  assert len({row.tobytes() for row in seen}) == 48  # One epoch: every image once.

  datasets.record_stats(config, dataset)
  pretraining_workdir(tmp_path / 'bt', config)
  recorded = json.loads((tmp_path / 'bt' / 'config.json').read_text())
  assert recorded['data_stats'] == {**dataset.stats(), 'num_classes': 3}
  probe = config_files.load('cifar_linear')
  probe.pretrained_workdir = str(tmp_path / 'bt')
  probe.batch_size, probe.probe.batch_size, probe.probe.epochs, probe.knn.k = 8, 8, 2, (5,)
  results = linear.run(probe, str(tmp_path / 'probe'))
  assert results['class_names'] == ['rose', 'tulip', 'daisy']
  assert results['linear']['num_examples'] == 24  # The 'validation' split.
  table = (tmp_path / 'probe' / 'results.md').read_text()
  for name, acc in zip(results['class_names'], results['linear']['per_class_accuracy']):
    assert f'| {name} | {100 * acc:.2f} | 8 |' in table


def test_the_probe_standardises_with_the_statistics_pretraining_recorded(folder, tmp_path):
  root, _, data_dir, dataset = folder
  config = tiny_config()
  config.dataset, config.data_dir = f'folder:{root}', data_dir
  datasets.record_stats(config, dataset)
  assert config.data_stats.to_dict() == dataset.stats()
  config.data_stats.mean = (0.1, 0.2, 0.3)  # As if the folder had changed since.
  again = datasets.from_config(config)
  assert again.spec.mean == (0.1, 0.2, 0.3) and again.spec.std == dataset.spec.std
  assert datasets.num_classes(config) == 2


def test_folder_pretrain_then_probe_by_class_name(tmp_path, small_resnet, caplog):
  """The two commands of docs/data.md, on a folder: pretraining, then the probe by class name.

  In this process through main.run, as the CLI runs them (its flag parsing is
  tested in tests/test_cli.py), with a small encoder: what is checked is the
  folder's path through both stages, not the encoder.
  """
  root = tmp_path / 'images'
  write_folder(str(root))
  config = tiny_config()
  config.dataset, config.data_dir = f'folder:{root}', str(tmp_path / 'd')
  config.train_split = 'train'
  config.model.encoder = small_resnet
  config.num_steps = 2
  caplog.set_level(logging.WARNING)
  main.run(config, str(tmp_path / 'bt'))
  assert '1 undecodable file(s) skipped: train/dog/broken.jpg' in caplog.text
  recorded = json.loads((tmp_path / 'bt' / 'config.json').read_text())
  assert recorded['data_stats']['num_classes'] == 2
  assert recorded['model']['encoder'] == small_resnet
  probe = config_files.load('cifar_linear')
  probe.pretrained_workdir = str(tmp_path / 'bt')
  probe.batch_size, probe.probe.batch_size, probe.probe.epochs, probe.knn.k = 8, 8, 2, (5,)
  main.run(probe, str(tmp_path / 'probe'))
  results = json.loads((tmp_path / 'probe' / 'results.json').read_text())
  assert results['class_names'] == list(CLASSES)
  assert results['linear']['num_examples'] == 2 * TEST_PER_CLASS
  table = (tmp_path / 'probe' / 'results.md').read_text()
  assert f'| cat | {100 * results["linear"]["per_class_accuracy"][0]:.2f} | 8 |' in table


@pytest.mark.parametrize('case, message', [
    ('missing root', r'nowhere is not a directory'),
    ('no images', r'no image files'),
    ('classes differ', r"only in 'train': \['fox'\]; only in 'test': \['owl'\]"),
    ('missing split', r"config.train_split='val' is not a split of the folder"),
    ('bad file fatal', r'not a decodable image: .*broken\.jpg'),
    ('fewer than a batch', r'holds 43 training examples, fewer than one batch of '
                           r'config.batch_size=48'),
])
def test_bad_folder_input_exits_2_writing_nothing(tmp_path, case, message, capsys):
  root = _bad_layouts(tmp_path)
  config = tiny_config()
  config.dataset = {'missing root': f'folder:{root}/nowhere', 'no images': f'folder:{root}/empty',
                    'classes differ': f'folder:{root}/differ'}.get(case, f'folder:{root}/ok')
  config.data_dir = str(tmp_path / 'd')
  config.train_split = 'val' if case == 'missing split' else 'train'
  config.bad_images = 'fatal' if case == 'bad file fatal' else 'skip'
  config.batch_size = 48 if case == 'fewer than a batch' else 16
  with pytest.raises(SystemExit) as exit_:
    main.run(config, str(tmp_path / 'run'))
  assert exit_.value.code == 2
  assert re.search(message, capsys.readouterr().err), case
  assert not snapshot(tmp_path / 'run')  # Nothing written (the lock file aside).
