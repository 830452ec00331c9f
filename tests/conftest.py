"""Test set-up: 8 fake CPU devices and the offline CIFAR-10 TFDS dir.

XLA_FLAGS must be set before JAX initialises its backend, hence at import time
here. Single-device references use a 1-device mesh of the same process.
"""

import atexit
import hashlib
import os
import pathlib
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# One persistent compilation cache for the session, in this process and every
# subprocess it starts (they inherit the environment): most tests compile the
# same tiny train step, and a cache hit costs a fraction of a second instead of
# a compile. Compiled programs are keyed by their HLO, devices and flags, so a
# hit is the same program; no test measures compile time.
_CACHE_DIR = tempfile.mkdtemp(prefix='barlow_jax_test_cache_')
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import pytest  # noqa: E402

from barlow_jax import config_files  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# ../shared/tfds beside the checkout holds the real CIFAR-10 (no download in tests).
DATA_DIR = os.environ.get('BARLOW_JAX_TEST_DATA_DIR', str(REPO.parent / 'shared' / 'tfds'))
needs_cifar10 = pytest.mark.skipif(
    not (pathlib.Path(DATA_DIR) / 'cifar10').is_dir(),
    reason=f'offline CIFAR-10 TFDS dir not found at {DATA_DIR} '
           '(set BARLOW_JAX_TEST_DATA_DIR); tests never download.')


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
  model = factory.create_model(config, axis_name=mesh_lib.DATA_AXIS)
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
  fn = fn or predict.make_predict_fn(config, model, view, outputs=('features',))
  out = predict.predict_split(config, fn, variables, split, batch_size, mesh, seed=seed)
  return out['features'], out['label']
