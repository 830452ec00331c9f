r"""Command line: ``python -m barlow_jax.main --config=configs/cifar_bt.py --workdir=runs/bt``.

Override any config value with ``--config.key=value`` (e.g.
``--config.batch_size=256 --config.model.encoder=resnet18``); unknown keys are
rejected. A bad config exits with status 2 before anything is compiled.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from barlow_jax import config_validation
from barlow_jax import finetune
from barlow_jax import linear_eval
from barlow_jax import supervised
from barlow_jax import train

# config.mode -> the stage's entry point, all with the signature (config, workdir).
STAGES = {
    'pretrain': train.train_and_evaluate,
    'linear': linear_eval.run,
    'supervised': supervised.run,
    'finetune': finetune.run,
}

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.')
config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.data only: keep TensorFlow off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], 'GPU')
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  mode = FLAGS.config.get('mode', 'pretrain')
  try:
    if mode not in STAGES:
      raise config_validation.ConfigError(f'config.mode={mode!r} is not one of {sorted(STAGES)}.')
    STAGES[mode](FLAGS.config, FLAGS.workdir)
  except config_validation.ConfigError as e:
    logging.error('Invalid config: %s', e)
    print(f'Invalid config: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
