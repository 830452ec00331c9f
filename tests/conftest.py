"""Test set-up: 8 fake CPU devices and the offline CIFAR-10 TFDS dir.

XLA_FLAGS must be set before JAX initialises its backend, hence at import time
here. Single-device references use a 1-device mesh of the same process.
"""

import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` is a top-level folder, not part of the package.

# ../shared/tfds beside the checkout holds the real CIFAR-10 (no download in tests).
DATA_DIR = os.environ.get('BARLOW_JAX_TEST_DATA_DIR', str(REPO.parent / 'shared' / 'tfds'))
needs_cifar10 = pytest.mark.skipif(
    not (pathlib.Path(DATA_DIR) / 'cifar10').is_dir(),
    reason=f'offline CIFAR-10 TFDS dir not found at {DATA_DIR} '
           '(set BARLOW_JAX_TEST_DATA_DIR); tests never download.')


def tiny_config():
  """cifar_bt_cpu shrunk until one step compiles and runs in seconds."""
  from configs import cifar_bt_cpu
  config = cifar_bt_cpu.get_config()
  config.data_dir = DATA_DIR
  config.download = False
  config.fraction = 1.0
  config.model.width = 4
  config.model.projector = '32-32'
  config.batch_size = 16
  config.num_steps = 4
  config.log_every = 2
  config.checkpoint.every_steps = 2
  config.optimizer.warmup_epochs = 0.0
  return config
