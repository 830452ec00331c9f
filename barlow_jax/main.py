r"""Command line: ``python -m barlow_jax.main --config=configs/cifar_bt.py --workdir=runs/bt``.

Override any config value with ``--config.key=value`` (e.g.
``--config.batch_size=256 --config.model.encoder=resnet18``); unknown keys are
rejected. A bad config exits with status 2 before anything is compiled.

Exit status: 0 done; 2 bad input (unknown flag or config key, invalid value,
dataset missing, corrupt or incompatible checkpoint, unusable or busy
workdir), before anything is compiled and with the workdir untouched; 3 a
non-finite loss (the last good checkpoint is kept); 75 stopped by SIGTERM
after saving a checkpoint (run the same command again to resume).

Several processes (TPU pod, GPU cluster, or launch/local_multiprocess.sh):
``--distributed`` (JAX detects TPU VMs and SLURM) or ``--coordinator_address``
with ``--num_processes`` and ``--process_id``; nothing changes in the config.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from barlow_jax import baselines
from barlow_jax import config_validation
from barlow_jax import distributed
from barlow_jax import evaluate
from barlow_jax import finetune
from barlow_jax import input_pipeline
from barlow_jax import linear_eval
from barlow_jax import supervised
from barlow_jax import train

# config.mode -> the stage's entry point, all with the signature (config, workdir).
STAGES = {
    'pretrain': train.train_and_evaluate,
    'linear': linear_eval.run,
    'baselines': baselines.run,
    'supervised': supervised.run,
    'finetune': finetune.run,
}

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.')
config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
flags.DEFINE_bool('distributed', False, 'Start JAX\'s multi-process runtime with its cluster '
                  'detection (Cloud TPU VMs, SLURM, Open MPI); the launch/ scripts set it.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process '
                    'run JAX cannot detect (launch/local_multiprocess.sh).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')

# Errors that mean "fix the command or the workdir", reported with exit status 2.
BAD_INPUT = (config_validation.ConfigError, input_pipeline.DatasetNotFoundError,
             train.CheckpointError, evaluate.CheckpointMismatchError, distributed.WorkdirError)


def _fail(status: int, message: str, log: bool = True) -> None:
  if log:  # Goes to the log file too, when absl logs to one.
    logging.error('%s', message)
  print(message, file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, exiting with status 2 (a usage error) instead of 1 or a traceback."""
  hint = '\nPass --helpshort or --helpfull to see help on flags.'
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # ml_collections defers config-file errors to the first access.
    return argv
  except flags.Error as e:
    _fail(2, f'FATAL Flags parsing error: {e}{hint}', log=False)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for --config.<key> when the config has no such key.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    _fail(2, f'FATAL Flags parsing error: unknown config key {e.args[0] if e.args else e}{hint}',
          log=False)
  except Exception as e:  # pylint: disable=broad-except
    # Loading the config file or converting an override value: still the command line's fault.
    _fail(2, f'FATAL Flags parsing error: {type(e).__name__}: {e}{hint}', log=False)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}', exitcode=2)
  # Before anything touches a device: the runtime decides which devices exist.
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Console and metrics from process 0 only.
  # tf.data only: keep TensorFlow off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], 'GPU')
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  mode = FLAGS.config.get('mode', 'pretrain')
  try:
    if mode not in STAGES:
      raise config_validation.ConfigError(f'config.mode={mode!r} is not one of {sorted(STAGES)}.')
    with distributed.workdir_lock(FLAGS.workdir):
      STAGES[mode](FLAGS.config, FLAGS.workdir)
  except config_validation.ConfigError as e:
    _fail(2, f'Invalid config: {e}')
  except BAD_INPUT as e:
    _fail(2, f'{type(e).__name__}: {e}')
  except FloatingPointError as e:
    _fail(3, f'Training diverged: {e}')
  except distributed.Preempted as e:
    _fail(distributed.PREEMPTED_EXIT_CODE, str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
