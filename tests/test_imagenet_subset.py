"""ImageNet's semi-supervised protocol (1% / 10% of the labels) on a fake imagenet2012_subset.

TFDS's own imagenet2012_subset builder prepares the dataset here from fake
ImageNet tars (a few small JPEGs in the layout of ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar) and a fake SimCLR list; its one download (the list)
is patched to the local file, as conftest's fake CIFAR-10. The expected labels
come from TFDS's ImageNet label files, read here directly.
"""

import io
import tarfile
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import matplotlib.image

from barlow_jax import config_files
from barlow_jax import plots
from barlow_jax import trainer
from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
from barlow_jax.stages import finetune
from barlow_jax.stages import supervised
from conftest import pretraining_workdir, tiny_config

SUBSET = 'imagenet2012_subset/1pct'
PER_CLASS, LISTED, NUM_VAL = 5, (0, 2, 4), 10


def _jpeg(rng, height: int, width: int) -> bytes:
  out = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(out, format='JPEG')
  return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _tfds_lines(name: str) -> list[str]:
  return tfds.core.tfds_path(f'datasets/imagenet2012/{name}').read_text().split()


def prepare_fake_subset(data_dir, manual_dir) -> dict:
  """imagenet2012_subset/1pct prepared by TFDS from fake tars; returns what it must hold.

  The training classes are those of the first validation images, 5 images
  each, 3 of which are in the list. Returns {'train': sorted listed file
  names, 'validation': the validation labels (indices into labels.txt)}.
  """
  rng = np.random.default_rng(0)
  val_synsets = _tfds_lines('validation_labels.txt')[:NUM_VAL]
  synsets = sorted(set(val_synsets))[:3]
  with tarfile.open(manual_dir / 'ILSVRC2012_img_train.tar', 'w') as train:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as tar:
        for i in range(PER_CLASS):
          _add(tar, f'{synset}_{i}.JPEG', _jpeg(rng, 40 + 3 * i, 56 - 2 * i))
      _add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(manual_dir / 'ILSVRC2012_img_val.tar', 'w') as val:
    for i in range(NUM_VAL):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng, 48, 36 + i))
  listed = sorted(f'{s}_{i}.JPEG' for s in synsets for i in LISTED)
  (manual_dir / '1percent.txt').write_text('\n'.join(listed) + '\n')
  with mock.patch.object(tfds.download.DownloadManager, 'download',
                         return_value=str(manual_dir / '1percent.txt')):
    tfds.builder(SUBSET, data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  names = _tfds_lines('labels.txt')
  return {'train': listed, 'validation': [names.index(s) for s in val_synsets]}


@pytest.fixture(scope='module')
def fake_subset(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  expected = prepare_fake_subset(data_dir, tmp_path_factory.mktemp('manual'))
  return str(data_dir), expected


def test_the_subset_resolves_to_the_listed_images_and_imagenets_validation(fake_subset):
  data_dir, expected = fake_subset
  dataset = datasets.resolve(SUBSET, data_dir=data_dir, download=False, crop_size=32)
  spec = dataset.spec
  assert (spec.num_classes, spec.test_split, spec.fixed_size) == (1000, 'validation', False)
  # Variable-size images at the network's side: the crop, and Resize(crop * 256/224).
  assert (spec.image_size, spec.eval_resize) == (32, 37)
  assert (spec.mean, spec.std) == (datasets.DATASETS['imagenet2012'].mean,
                                   datasets.DATASETS['imagenet2012'].std)
  assert dataset.class_names == _tfds_lines('labels.txt')
  train = list(dataset.builder.as_dataset(split='train').as_numpy_iterator())
  assert sorted(e['file_name'].decode() for e in train) == expected['train']
  val = dataset.builder.as_dataset(split='validation', shuffle_files=False)
  labels = {e['file_name'].decode(): int(e['label']) for e in val.as_numpy_iterator()}
  assert [labels[f'ILSVRC2012_val_{i + 1:08d}.JPEG'] for i in range(NUM_VAL)] == \
      expected['validation']


def test_finetuning_reads_the_subset_with_the_protocol_config(fake_subset, tmp_path, monkeypatch,
                                                            small_resnet):
  """configs/imagenet_finetune.py as shipped: the stage hands the supervised run the subset
  (the listed images to train on, validation to test on, ImageNet's 1000 classes), standardised
  with the encoder's (CIFAR-10) statistics; the training stream cuts the protocol's crops.

  The supervised run itself is recorded, not run: its step is every supervised run's
  (tests/test_supervised_e2e.py fine-tunes on CIFAR-10); a run on this fake subset costs
  ~2 minutes of compiling for a 1000-class head on the loaded test machine.
  """
  data_dir, expected = fake_subset
  pretraining = tiny_config()
  pretraining.model.encoder = small_resnet  # The other fine-tuning tests' encoder: one compile.
  pretraining_workdir(tmp_path / 'bt', pretraining, step=2)
  config = config_files.load('imagenet_finetune')
  assert config.dataset == SUBSET and config.label_fraction == 1.0
  config.pretrained_workdir, config.data_dir, config.batch_size = str(tmp_path / 'bt'), data_dir, 8
  calls = []
  monkeypatch.setattr(supervised, 'run', lambda *args, **kwargs: calls.append((args, kwargs)))
  finetune.run(config, str(tmp_path / 'ft'))
  (run_config, _), kwargs = calls[0]
  dataset = kwargs['dataset']
  assert run_config.dataset == dataset.name == SUBSET
  assert (dataset.spec.num_classes, dataset.spec.image_size) == (1000, 32)
  cifar10 = datasets.DATASETS['cifar10']
  assert (dataset.spec.mean, dataset.spec.std) == (cifar10.mean, cifar10.std)
  datasets.record_stats(run_config, dataset)  # What supervised.run puts in config.json.
  assert run_config.data_stats.to_dict() == {'mean': list(cifar10.mean), 'std': list(cifar10.std),
                                             'num_classes': 1000}
  assert kwargs['extra_results']['label_fraction'] == 1.0

  data = supervised.load_data(run_config, dataset)  # Also checks eval.test_split exists.
  assert data.num_global == len(expected['train']) and run_config.eval.test_split == 'validation'
  crops = host_crop.HostCrops(32, trainer.views_of(run_config, 1))
  batch = next(pipeline.train_dataset(data, 8, seed=0, crops=crops).as_numpy_iterator())
  assert batch['image'].shape == (8, 1, 32, 32, 3)
  train_labels = {_tfds_lines('labels.txt').index(f.split('_')[0]) for f in expected['train']}
  assert set(batch['label'].tolist()) <= train_labels


def test_a_1000_class_confusion_matrix_is_drawn_at_a_readable_size(tmp_path):
  confusion = 5 * np.eye(1000, dtype=int)  # Every row's rate 1 on the diagonal.
  plots.confusion_matrix_png(confusion, _tfds_lines('labels.txt'), str(tmp_path / 'c.png'))
  pixels = matplotlib.image.imread(str(tmp_path / 'c.png'))[..., :3]
  assert max(pixels.shape[:2]) <= 1200, pixels.shape
  assert (pixels[..., 0] < 0.3).sum() > 500  # The diagonal is drawn, dark blue, ~800 px long.
