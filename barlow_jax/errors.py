"""The errors a user can act on, and the exit status each one gives on the command line.

Every mistake of the user's (a config value, a path, a dataset that is not
there, a checkpoint of another run, a workdir of another run or kind, a busy
workdir) raises a subclass of
``BadInput``: the command line prints its message and exits with status 2,
before anything is compiled and with the workdir untouched. The other
statuses are for runs that started well and stopped: 3 when the loss became
non-finite (the last good checkpoint is kept), 74 when a checkpoint could not
be written (disk full, permissions: the partial one is removed, the message
names the directory and the last complete checkpoint), 75 when SIGTERM,
SIGINT or SIGHUP stopped the run: inside a training loop after a complete
save, outside one (start-up, compiling, evaluation, writing results, between
the runs of a sweep) at once with nothing to save (run the same command again
to resume). docs/operations.md lists every fault and signal.
"""

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
# EX_IOERR of sysexits.h: a checkpoint could not be written (disk full, permissions).
EXIT_SAVE_FAILED = 74
# EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to
# retry"): not 0, so a scheduler can tell a preempted run from a finished one;
# launch/slurm_gpu.sbatch requeues the job on it.
EXIT_PREEMPTED = 75


class BadInput(Exception):
  """Fix the command, the config or the workdir; exit status 2."""


class ConfigError(BadInput, ValueError):
  """An invalid config value; the message names the key."""


class DatasetNotFoundError(BadInput, FileNotFoundError):
  """The dataset is not prepared in the data dir and cannot be downloaded."""


class DatasetDownloadError(DatasetNotFoundError):
  """The dataset is missing and its download failed or its host is unreachable."""


class DatasetCorruptError(BadInput, OSError):
  """A file of the prepared dataset is missing, truncated or unreadable; prepare it again."""


class ConfigChangedError(BadInput, ValueError):
  """The workdir holds a run recorded with another config; the message lists the differing keys."""


class CheckpointError(BadInput, ValueError):
  """A checkpoint is missing, unreadable, or of another architecture than the config's."""


class WorkdirError(BadInput, OSError):
  """The workdir cannot be used: not writable, of another kind, or held by a live run."""


class Preempted(Exception):
  """The run saved a checkpoint and stopped because of SIGTERM, SIGINT or SIGHUP; rerun to resume."""


class CheckpointSaveError(Exception):
  """Writing a checkpoint failed (disk full, permissions); exit status 74.

  Not bad input: the run started well. The partial checkpoint is removed and
  the message names the directory and the last complete checkpoint.
  """
