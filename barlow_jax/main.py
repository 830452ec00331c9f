r"""The command line of every stage: ``python -m barlow_jax.main --config=CONFIG --workdir=DIR``.

``config.mode`` picks what runs: 'pretrain' (Barlow Twins), 'linear' (probe +
kNN of a pretrained encoder), 'transfer' (the same on several datasets, one
table), 'finetune', 'supervised' (cross-entropy with a
Barlow Twins term), 'baselines' (raw pixels), 'sweep' (a γ × seed grid of
supervised runs) or 'reproduce' (the fraction comparison of Ghosh, Ghosh & Das
2022). ``--config`` takes a path or the name of a config of this
installation (``--config=cifar_bt_cpu``); override any value with
``--config.key=value`` (unknown keys are rejected).

Re-running a workdir resumes it, but only under the config it recorded: a
difference in a key that changes what the run computes (anything but where
the data is, how often and where it logs and saves, the kNN monitor) exits 2 listing
the keys, unless ``--allow_config_change`` (the change is then appended to
<workdir>/config_changes.json; config.json is kept).

Exit status, the same for every mode (barlow_jax/errors.py): 0 done; 2 bad
input (unknown flag or config key, invalid value or split, dataset missing,
corrupt or incompatible checkpoint, a config that differs from the one the
workdir recorded, unusable, busy or wrong kind of workdir), before anything
is compiled and with the workdir untouched; 3 a non-finite loss (the last good
checkpoint is kept); 74 a checkpoint could not be written (disk full,
permissions; the message names the directory and the last complete
checkpoint); 75 stopped by SIGTERM, SIGINT (Ctrl-C) or SIGHUP: inside a
training loop after saving a checkpoint of the current step (after the last
step: once its save is complete), outside one (start-up, compiling,
evaluation, writing results, between the runs of a sweep) at once, with
nothing new to save. Run the same command again to resume. docs/operations.md
lists every fault and signal.

Several processes (TPU pod, GPU cluster, or launch/local_multiprocess.sh):
``--distributed`` (JAX detects TPU VMs and SLURM) or ``--coordinator_address``
with ``--num_processes`` and ``--process_id``; nothing changes in the config.
"""

import contextlib
import os
import signal
import sys


def _stop_during_imports(signum, frame) -> None:
  """A stop signal while the modules below load: nothing to save, exit 75 at once."""
  del frame
  print(f'Stopped by {signal.Signals(signum).name} during start-up: nothing to save; run the '
        'same command again to resume.', file=sys.stderr, flush=True)
  os._exit(75)  # pylint: disable=protected-access  # errors.EXIT_PREEMPTED, not imported yet.


if __name__ == '__main__':  # The command line only, not an importing test or notebook.
  for _signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    # SIGINT and SIGHUP stay ignored if they are (nohup, a background job): as distributed.py.
    if _signum == signal.SIGTERM or signal.getsignal(_signum) != signal.SIG_IGN:
      signal.signal(_signum, _stop_during_imports)
  # Before TensorFlow loads (it reads its C++ log level once): a quiet console.
  from barlow_jax import console as _console  # pylint: disable=g-import-not-at-top
  _console.quiet_native_logs(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from barlow_jax import config_files
from barlow_jax import console
from barlow_jax import errors
from barlow_jax.experiments import reproduce
from barlow_jax.experiments import sweep
from barlow_jax.data import folders
from barlow_jax.runtime import distributed
from barlow_jax.runtime import writers
from barlow_jax.stages import baselines
from barlow_jax.stages import finetune
from barlow_jax.stages import linear
from barlow_jax.stages import pretrain
from barlow_jax.stages import supervised
from barlow_jax.stages import transfer

# config.mode -> what runs, all with the signature (config, workdir, allow_config_change=...).
MODES = {
    'pretrain': pretrain.run,
    'linear': linear.run,
    'finetune': finetune.run,
    'supervised': supervised.run,
    'baselines': baselines.run,
    'sweep': sweep.run,
    'reproduce': reproduce.run,
    'transfer': transfer.run,
}
# Config keys holding paths; made absolute when a run starts, so that a
# workdir's config.json still finds them from any other directory.
PATH_KEYS = ('data_dir', 'pretrained_workdir')

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.')
config_flags.DEFINE_config_file('config', None, 'A config file, or the name of one in configs/.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
flags.DEFINE_bool('distributed', False, 'Start JAX\'s multi-process runtime with its cluster '
                  'detection (Cloud TPU VMs, SLURM, Open MPI); the launch/ scripts set it.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process '
                    'run JAX cannot detect (launch/local_multiprocess.sh).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
flags.DEFINE_bool('allow_config_change', False, 'Resume a workdir (or redo a finished run of the '
                  'sweep or the fraction comparison) whose recorded config differs from this one '
                  'in keys that change what a run computes, instead of refusing (exit 2); the '
                  'change is appended to <workdir>/config_changes.json.')

_HINT = '\nPass --helpshort or --helpfull to see help on flags.'


def _fail(status: int, message: str) -> None:
  console.report(message)  # Once on the console, and in absl's log file when it writes one.
  sys.exit(status)


def _resolve_config_arg(argv: list[str]) -> list[str]:
  """``--config=NAME`` or a path, in either flag form, replaced by an existing file's path."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config='):
      arg = '--config=' + config_files.resolve(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(argv):
      out.append(arg)
      i += 1
      arg = config_files.resolve(argv[i])
    out.append(arg)
    i += 1
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, exiting with status 2 (a usage error) instead of 1 or a traceback."""
  try:
    argv = FLAGS(_resolve_config_arg(argv))
    FLAGS.config.keys()  # ml_collections defers config-file errors to the first access.
    return argv
  except errors.ConfigError as e:
    _fail(errors.EXIT_BAD_INPUT, f'FATAL Flags parsing error: {e}{_HINT}')
  except flags.Error as e:
    _fail(errors.EXIT_BAD_INPUT, f'FATAL Flags parsing error: {e}{_HINT}')
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for --config.<key> when the config has no such key.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    _fail(errors.EXIT_BAD_INPUT, 'FATAL Flags parsing error: unknown config key '
          f'{e.args[0] if e.args else e}{_HINT}')
  except Exception as e:  # pylint: disable=broad-except
    # Loading the config file or converting an override value: still the command line's fault.
    _fail(errors.EXIT_BAD_INPUT, f'FATAL Flags parsing error: {type(e).__name__}: {e}{_HINT}')


def absolute_paths(config) -> None:
  """Relative paths of ``config`` (and of a sweep's ``run``) made absolute, in place."""
  for c in (config, config.get('run')):
    for key in PATH_KEYS:
      if c is not None and isinstance(c.get(key), str) and c[key] and '://' not in c[key]:
        c[key] = os.path.abspath(c[key])
    # A folder dataset is recorded in config.json: the probe may run from elsewhere.
    if c is not None and c.get('dataset'):
      c.dataset = _absolute_folder(c.dataset)
    if c is not None and c.get('datasets'):  # The transfer table's.
      c.datasets = ','.join(_absolute_folder(n.strip()) for n in c.datasets.split(','))


def _absolute_folder(name: str) -> str:
  """``folder:PATH`` with PATH made absolute; other dataset names unchanged."""
  if not name.startswith(folders.PREFIX):
    return name
  return folders.PREFIX + os.path.abspath(os.path.expanduser(name[len(folders.PREFIX):]))


def _new_dirs(path: str) -> list[str]:
  """``path`` and those of its parents that do not exist yet, deepest first."""
  out = []
  while path and not os.path.lexists(path):
    out.append(path)
    parent = os.path.dirname(path)
    path = parent if parent != path else ''
  return out


def _remove_new_workdir(created: list[str]) -> None:
  """Removes the workdir (and parents) a refused run created, if they hold only its lock file.

  Bad input leaves no trace: the lock is taken (creating the workdir) before
  the mode checks its config.
  """
  if not created or jax.process_index() != 0:
    return
  lock = os.path.join(created[0], distributed.LOCK_FILE)
  with contextlib.suppress(OSError):
    if os.path.isdir(created[0]) and os.listdir(created[0]) == [distributed.LOCK_FILE]:
      os.remove(lock)
    for path in created:
      os.rmdir(path)  # Only if empty: stops at the first directory holding anything.


def run(config, workdir: str, allow_config_change: bool = False) -> None:
  """Runs ``config.mode`` into ``workdir`` under the workdir lock, mapping errors to exit codes."""
  mode = config.get('mode', 'pretrain')
  created = [] if '://' in workdir else _new_dirs(workdir)
  try:
    if mode not in MODES:
      raise errors.ConfigError(f'config.mode={mode!r} is not one of {sorted(MODES)}.')
    absolute_paths(config)
    writers.check(config)  # A missing W&B package or login: exit 2 now, not mid-run.
    with distributed.workdir_lock(workdir):
      MODES[mode](config, workdir, allow_config_change=allow_config_change)
    logging.info('Done: %s into %s.', mode, workdir)
  except errors.ConfigError as e:
    _remove_new_workdir(created)
    _fail(errors.EXIT_BAD_INPUT, f'Invalid config: {e}')
  except errors.BadInput as e:
    _remove_new_workdir(created)
    _fail(errors.EXIT_BAD_INPUT, f'{type(e).__name__}: {e}')
  except FloatingPointError as e:
    _fail(errors.EXIT_DIVERGED, f'Training diverged: {e}')
  except errors.CheckpointSaveError as e:
    # Orbax's threads may still hold the failed write: no teardown either.
    distributed.exit_now(errors.EXIT_SAVE_FAILED, f'{type(e).__name__}: {e}')
  except errors.Preempted as e:
    # The checkpoint is complete: end at once, without the interpreter's
    # teardown (joining tf.data and Orbax threads took tens of seconds).
    distributed.leave()
    distributed.exit_now(errors.EXIT_PREEMPTED, str(e))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}', exitcode=errors.EXIT_BAD_INPUT)
  if not FLAGS['verbosity'].present:  # absl's --verbosity brings the libraries' lines back.
    console.quiet_libraries()  # Before JAX probes its backends.
  # Before anything touches a device: the runtime decides which devices exist.
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Console and metrics from process 0 only.
  # tf.data only: keep TensorFlow off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], 'GPU')
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  workdir = FLAGS.workdir if '://' in FLAGS.workdir else os.path.abspath(FLAGS.workdir)
  try:
    run(FLAGS.config, workdir, FLAGS.allow_config_change)
  except SystemExit as e:
    # The message is printed, every checkpoint complete and the lock released:
    # no teardown, whose Orbax and tf.data threads printed tracebacks ("Event
    # loop is closed") after a failed restore.
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(e.code if isinstance(e.code, int) else 1)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
