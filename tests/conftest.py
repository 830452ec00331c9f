"""Test set-up: 8 fake CPU devices and a CIFAR-10 TFDS dir, real or tiny and fake.

XLA_FLAGS must be set before JAX initialises its backend, hence at import time
here. Single-device references use a 1-device mesh of the same process.
"""

import atexit
import hashlib
import os
import pathlib
import shutil
import tempfile
from unittest import mock

# Tests compile far more than they run: a tiny train step takes tens of seconds
# to compile and well under one to run its few steps. LLVM's optimisation
# passes are off for them (for this process and, through cli_runs.env and
# test_cli, for every CLI run): compiles take about half the time, steps
# longer, the same program. Numbers of speed are never taken in tests.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {TEST_XLA_FLAGS}'
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# One persistent compilation cache for the session, in this process and every
# subprocess it starts (they inherit the environment): most tests compile the
# same tiny train step, and a cache hit costs a fraction of a second instead of
# a compile. Compiled programs are keyed by their HLO, devices and flags, so a
# hit is the same program; no test measures compile time.
# pytest-xdist's workers inherit the controller's environment: one cache for all.
_CACHE_DIR = os.environ.get('BARLOW_JAX_TEST_CACHE_DIR')
if not _CACHE_DIR:
  _CACHE_DIR = tempfile.mkdtemp(prefix='barlow_jax_test_cache_')
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.update(BARLOW_JAX_TEST_CACHE_DIR=_CACHE_DIR, JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import barlow_jax  # noqa: E402,F401  (before TensorFlow loads: the package's GCS setting)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from barlow_jax.data import datasets
from barlow_jax import config_files  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# The real CIFAR-10 (TFDS format, offline) where there is one: tests never
# download. Elsewhere (a fresh clone) DATA_DIR is an empty dir that the
# cifar10_data_dir fixture fills once per session with a tiny fake CIFAR-10
# prepared by TFDS's own builder. Subprocesses inherit DATA_DIR via the env.
_REAL_DATA_DIR = os.environ.get('BARLOW_JAX_TEST_DATA_DIR', str(REPO.parent / 'shared' / 'tfds'))
FAKE_CIFAR10 = not (pathlib.Path(_REAL_DATA_DIR) / 'cifar10').is_dir()
if FAKE_CIFAR10:
  DATA_DIR = tempfile.mkdtemp(prefix='barlow_jax_test_tfds_')
  atexit.register(shutil.rmtree, DATA_DIR, ignore_errors=True)
  os.environ['BARLOW_JAX_TEST_DATA_DIR'] = DATA_DIR
else:
  DATA_DIR = _REAL_DATA_DIR

# Fake split sizes: train[:10000] at fraction 0.1 (100 per class) and
# test[:1003] must exist; 5 batch files of 2048 as the real 5 of 10000.
_FAKE_TRAIN_BATCH, _FAKE_TEST = 2048, 1024
# The fraction of fake images drawn in their label's colour; the others take
# a random class's colour, so no classifier exceeds ~0.46 top-1 (the real
# data's pixel baselines stay below 0.6 too) and any that learns beats 0.1.
_FAKE_SIGNAL = 0.4


def _fake_cifar10_records(n: int, rng) -> bytes:
  """n records of the CIFAR-10 binary layout: a label byte, then R, G, B planes of 32x32."""
  labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
  shown = np.where(rng.random(n) < _FAKE_SIGNAL, labels, rng.integers(0, 10, n))
  colours = np.random.default_rng(1).integers(40, 216, (10, 3))  # One colour per class.
  noise = rng.integers(-40, 41, (n, 3, 32, 32))
  planes = np.clip(colours[shown][:, :, None, None] + noise, 0, 255).astype(np.uint8)
  return np.concatenate([labels[:, None], planes.reshape(n, -1)], axis=1).tobytes()


def write_fake_cifar10_binary(root) -> None:
  """cifar-10-batches-bin/ as in cifar-10-binary.tar.gz, with few, fake images."""
  folder = pathlib.Path(root) / 'cifar-10-batches-bin'
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(1, 6):
    (folder / f'data_batch_{i}.bin').write_bytes(_fake_cifar10_records(_FAKE_TRAIN_BATCH, rng))
  (folder / 'test_batch.bin').write_bytes(_fake_cifar10_records(_FAKE_TEST, rng))
  (folder / 'batches.meta.txt').write_text('\n'.join(f'class_{i}' for i in range(10)) + '\n\n')


def prepare_fake_cifar10(data_dir, download_dir) -> None:
  """TFDS's cifar10 builder prepares ``data_dir`` from fake files in ``download_dir``."""
  write_fake_cifar10_binary(download_dir)
  # The builder's only network access; everything after it is TFDS's own code.
  with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         return_value=str(download_dir)):
    tfds.builder('cifar10', data_dir=str(data_dir)).download_and_prepare()


@pytest.fixture(scope='session')
def cifar10_data_dir(tmp_path_factory):
  """DATA_DIR, holding cifar10 (prepared here when fake). Fails, never skips, if it cannot."""
  if FAKE_CIFAR10 and not (pathlib.Path(DATA_DIR) / 'cifar10').is_dir():
    prepare_fake_cifar10(DATA_DIR, tmp_path_factory.mktemp('cifar10_download'))
  return DATA_DIR


needs_cifar10 = pytest.mark.usefixtures('cifar10_data_dir')


def conv_backends() -> list[str]:
  """The CPU convolutions to test (config.model.conv): XLA's, and oneDNN's where its wheels are.

  With the wheels installed ([onednn], part of [dev]) oneDNN is tested even
  if it fails to build, so that a broken build fails the tests.
  """
  from barlow_jax.models import conv
  reason = conv.onednn_unavailable_reason()
  return ['xla'] + ([] if reason and 'wheel is not installed' in reason else ['onednn'])


def cifar10_split_sizes() -> dict:
  """{split: number of examples} of the CIFAR-10 in DATA_DIR (real: 50000 and 10000)."""
  info = tfds.builder('cifar10', data_dir=DATA_DIR).info
  return {name: split.num_examples for name, split in info.splits.items()}


def config_module(name: str):
  """The config file configs/<name>.py as a module, found as barlow_jax.main finds it."""
  return config_files.load_module(config_files.resolve(name))


def tiny_config():
  """cifar_bt_cpu shrunk until one step compiles and runs in seconds."""
  config = config_files.load('cifar_bt_cpu')
  config.data_dir = DATA_DIR
  config.download = False
  config.fraction = 1.0
  # A small split: the shuffle buffer of a run holds the whole split, and
  # filling it with all 50k images would cost every tiny run seconds.
  config.train_split = 'train[:2048]'
  config.model.width = 4
  config.model.projector = '32-32'
  # The views the tests were written and calibrated for (32 px, scale 0.2-1),
  # independent of the quick start's tuning; its own 24-px crops of scale
  # 0.35-1 run in test_cli.py.
  config.augment.crop_size = 32
  for view in (config.augment.view1, config.augment.view2):
    view.crop_scale = (0.2, 1.0)
  config.batch_size = 16
  config.num_steps = 4
  config.log_every = 2
  config.checkpoint.every_steps = 2
  config.optimizer.warmup_epochs = 0.0
  config.knn_monitor.every_epochs = 0.0  # Off: tests/test_knn_monitor.py turns it on.
  return config


def pretraining_workdir(path, config, step: int = 2):
  """A pretraining workdir as stages.pretrain.run leaves it, without training.

  Holds ``config.json`` and the initial state of ``config`` saved as
  checkpoint ``step`` (1 device): enough for every stage that restores a
  pretrained encoder, for a fraction of the cost of compiling a train step.

  Returns:
    ``path`` as a pathlib.Path.
  """
  import jax
  import orbax.checkpoint as ocp
  from barlow_jax import optim
  from barlow_jax.models import factory
  from barlow_jax.runtime import checkpoint, mesh as mesh_lib, state as state_lib
  path = pathlib.Path(path)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  model = factory.create_model(config, datasets.num_classes(config), axis_name=mesh_lib.DATA_AXIS)
  tx, _ = optim.create_optimizer(config, steps_per_epoch=1, total_steps=2)
  manager = checkpoint.manager(str(path), config.checkpoint.max_to_keep)
  state = state_lib.create_train_state(model, tx, mesh, config.seed, config.augment.crop_size)
  state = state.replace(step=jax.numpy.int32(step))
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return path


def snapshot(workdir) -> dict:
  """{relative path: sha256} of every file of ``workdir``; the lock file is the one a run may add."""
  workdir = pathlib.Path(workdir)
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob('*')) if p.is_file() and p.name != '.lock'}


def tiny_supervised_config(arg: str = ''):
  """configs/cifar_supervised_bt.py shrunk like tiny_config, with small eval splits."""
  config = config_files.load('cifar_supervised_bt', arg)
  config.data_dir = DATA_DIR
  config.download = False
  config.model.width = 4
  config.model.feature_dim = 32
  config.model.embedding = '32-16'
  config.gamma = 0.01
  config.batch_size = 16
  config.num_steps = 4
  config.log_every = 2
  config.checkpoint.every_steps = 2
  config.eval.train_split = 'train[:64]'
  config.eval.test_split = 'test[:72]'  # Not a multiple of the eval batch: padding is exercised.
  config.eval.batch_size = 32
  config.plots.num_examples = 48
  return config


def assert_png_not_blank(path) -> None:
  """A readable PNG with something drawn on it (not one flat colour)."""
  import matplotlib.image
  import numpy as np
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
  pixels = matplotlib.image.imread(str(path))[..., :3]
  assert pixels.shape[0] > 50 and pixels.shape[1] > 50, pixels.shape
  background = (pixels > 0.98).all(-1)
  assert background.mean() < 0.97, f'{path} is (almost) blank'
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f'{path} has too few colours'


@pytest.fixture(scope='module')
def small_resnet():
  """Registers encoders.ENCODERS['resnet_small'] (2 stages of 1 block) for a test module.

  Steps that do not depend on the encoder compile several times faster with
  it than with ResNet-18; the registration is undone after the module.
  """
  import functools
  from barlow_jax.models import encoders
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(encoders.ENCODERS, 'resnet_small', functools.partial(
        encoders.ResNet, stage_sizes=(1, 1), block_cls=encoders.BasicBlock))
    yield 'resnet_small'


def features(config, model, variables, split: str, batch_size: int, mesh=None, view=None,
             seed: int = 0, fn=None):
  """(features, labels) of ``split`` through predict.predict_split, as the stages get them.

  ``fn`` (from predict.make_predict_fn) saves a compile when called repeatedly.
  """
  from barlow_jax.evaluators import predict
  dataset = datasets.from_config(config)
  fn = fn or predict.make_predict_fn(config, model, view, outputs=('features',), spec=dataset.spec)
  out = predict.predict_split(dataset, fn, variables, split, batch_size, mesh, seed=seed)
  return out['features'], out['label']
