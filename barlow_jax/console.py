"""What the command line prints: this project's lines, not its libraries' INFO logs.

By default the console shows barlow_jax's own lines (start-up summary,
progress every ``log_every`` steps, the kNN monitor, saves, the end) and every
library's warnings and errors (one line each: their tracebacks are dropped). Orbax, TFDS and clu log their INFO lines through
absl's one Python logger ('absl'), as barlow_jax does, so a logger level cannot
tell them apart: a filter on that logger keeps INFO records whose source file
is in this package. Named Python loggers (JAX's backend probe, TensorFlow)
are set to WARNING, or ERROR for the backend probe ("Unable to initialize
backend 'tpu'" on every machine without one), and the C++ log level of
TensorFlow and XLA (TF_CPP_MIN_LOG_LEVEL, read when they load) to warnings.
Passing absl's own ``--verbosity`` (e.g. ``--verbosity=1``) leaves every
Python level as absl sets it and the C++ level at INFO: all of it comes back.
"""

import logging
import os
import sys
from typing import Sequence

from absl import flags as absl_flags
from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Python loggers that are not absl's, and the least severe level they may show.
LIBRARY_LEVELS = {'jax._src.xla_bridge': logging.ERROR}  # Backend probes on every start.


def verbosity_requested(argv: Sequence[str]) -> bool:
  """Whether the command line sets absl's verbosity (``--verbosity``, ``-v``, ``--v``)."""
  return any(a.split('=')[0] in ('--verbosity', '-v', '--v') for a in argv[1:])


def quiet_native_logs(argv: Sequence[str]) -> None:
  """The C++ INFO lines of TensorFlow and XLA off, unless asked for; call before JAX or TF loads.

  Both read TF_CPP_MIN_LOG_LEVEL once, when they load. Quiet: 2 (warnings
  and errors only: TensorFlow's "oneDNN custom operations are on" and CPU
  feature notices go). With ``--verbosity``: 0, every line, which also keeps
  JAX's own default (1, set on import) from hiding them. A value already in
  the environment is kept either way.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '0' if verbosity_requested(argv) else '2')


def _from_this_package(record: logging.LogRecord) -> bool:
  """Keeps this package's records and every library's warnings and errors, the latter without
  their tracebacks: after a full disk Orbax's and clu's threads logged ~190 lines of them
  before the one message that says what happened and what to do (exit 74)."""
  if record.pathname.startswith(_PACKAGE_DIR):
    return True
  if record.levelno < logging.WARNING:
    return False
  record.exc_info, record.exc_text, record.stack_info = None, None, None
  return True


def _closed_loop(kind, value) -> bool:
  """Whether an error is "RuntimeError: Event loop is closed": TensorStore calling back into
  an asyncio loop Orbax closed after a failed save or restore; no state of ours is involved."""
  return kind is RuntimeError and str(value) == 'Event loop is closed'


def _quiet_closed_loop_errors() -> None:
  """sys.excepthook and sys.unraisablehook (TensorStore's threads report through the latter)
  without _closed_loop's errors, which came by the dozen after a full disk."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, value, traceback):
    if not _closed_loop(kind, value):
      excepthook(kind, value, traceback)

  def quiet_unraisablehook(unraisable):
    if not _closed_loop(unraisable.exc_type, unraisable.exc_value):
      unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def quiet_libraries() -> None:
  """Only this package's INFO lines on the console (and in absl's log file).

  Call after absl has parsed the flags (absl.app.run sets the levels then).
  """
  absl_logger = logging.getLogger('absl')
  absl_logger.setLevel(logging.INFO)  # What absl's default verbosity gives us.
  if _from_this_package not in absl_logger.filters:
    absl_logger.addFilter(_from_this_package)
  logging.root.setLevel(logging.WARNING)  # Every named library logger.
  for name, level in LIBRARY_LEVELS.items():
    logging.getLogger(name).setLevel(level)
  _quiet_closed_loop_errors()


def report(message: str) -> None:
  """Prints ``message`` (an error ending the run) once to stderr, and to absl's log file if any.

  absl writes its records to stderr unless it logs to a file: logging the
  message as well as printing it showed every exit message twice.
  """
  stream = getattr(absl_logging.get_absl_handler().python_handler, 'stream', None)
  flags = absl_flags.FLAGS
  to_stderr = flags.is_parsed() and 'logtostderr' in flags and flags['logtostderr'].value
  if stream not in (None, sys.stderr, sys.__stderr__) and not to_stderr:  # A log file.
    absl_logging.error('%s', message)
  print(message, file=sys.stderr, flush=True)
