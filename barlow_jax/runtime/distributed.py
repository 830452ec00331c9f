"""Running as one of many processes, and stopping safely: start-up, preemption, the workdir lock.

* ``initialize`` starts JAX's multi-controller runtime
  (``jax.distributed.initialize``) when the run spans several processes: with
  JAX's own cluster detection on Cloud TPU VMs and under SLURM (the launch/
  scripts pass ``--distributed``), or with an explicit coordinator, process
  count and process id (launch/local_multiprocess.sh). Everything after that
  is the same code for one process or many: each process reads its own TFDS
  split, batches become global arrays, Orbax saves and restores collectively.
* Preemption: SIGTERM, SIGINT and SIGHUP ask the training loop to save a
  checkpoint and stop (``preemption_requested``, ``errors.Preempted``). Several
  processes must save at the same step; JAX's preemption sync manager (started
  by ``jax.distributed.initialize``, listening for SIGTERM) agrees on that
  step. A single process without the distributed runtime uses its own SIGTERM
  handler instead. Where no training loop will look at the request again the
  signal acts at once: outside a loop (start-up, compilation of the first
  step, evaluation, writing results, between the runs of a sweep) the process
  ends with 75; after the loop's last check (the last step, the final save)
  the loop completes that save and raises Preempted (``training_loop_ended``
  and the signal handler decide under one lock, so no signal falls between
  them). SIGHUP (the terminal or ssh session closed) is handled like SIGTERM,
  unless the run was started with it ignored (``nohup``), which is kept.
* ``workdir_lock``: an exclusive ``fcntl.flock`` on ``<workdir>/.lock`` held
  for the whole run, so a second run cannot write into a workdir a live run
  holds. The kernel releases it when the process dies (even on ``kill -9``),
  so a stale lock file after a crash never blocks the next run. Object stores
  (``gs://``) have no flock: there process 0 holds a *lease* instead,
  ``<workdir>/.lease.json`` (host, pid, start time, heartbeat time) whose
  heartbeat a daemon thread rewrites every ``LEASE_HEARTBEAT_S``. A new run
  refuses a lease whose heartbeat is younger than ``LEASE_STALE_S`` (3
  heartbeats), naming the holder and the heartbeat's age; it takes over an
  older one (its holder died without releasing it) and removes its own at exit.
  flock stays for local paths: the kernel releases it the moment the holder
  dies, with no waiting for a stale lease and no read-then-write race (two
  runs starting within the same second on one bucket could both take a lease;
  GCS's generation preconditions would close that, epath does not expose them).
"""

import contextlib
import fcntl
import datetime
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from barlow_jax import console
from barlow_jax.errors import BadInput
from barlow_jax.errors import EXIT_PREEMPTED
from barlow_jax.errors import WorkdirError

LOCK_FILE = '.lock'
LEASE_FILE = '.lease.json'  # The lock of a remote (gs://) workdir.
LEASE_HEARTBEAT_S = 60.0  # How often the holder rewrites its lease.
LEASE_STALE_S = 3 * LEASE_HEARTBEAT_S  # A lease not rewritten for this long is a dead run's.

_stop = threading.Event()  # A stop signal arrived; polled by the training loop.
_loop_running = False  # A training loop is polling preemption_requested.
_signal_lock = threading.Lock()  # _on_signal against training_loop_ended: no signal between.
_barriers = itertools.count()
_SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT', signal.SIGHUP: 'SIGHUP'}
# Tests only: '<phase>=<path>' makes pause_point(<phase>) block until <path> exists.
PAUSE_ENV = 'BARLOW_JAX_TEST_PAUSE'
_stop_signal = 'SIGTERM'  # The first signal that asked the loop to stop.
_release_lock: Optional[Callable[[], None]] = None  # Of the workdir lock this process holds.


def _ignore(signum, frame) -> None:
  """The Python-level handler: the watcher thread acts (see _watch); no KeyboardInterrupt."""
  del signum, frame


def exit_now(status: int, message: str) -> None:
  """Prints ``message``, flushes the logs and ends the process with ``status`` at once.

  No interpreter teardown: no atexit handlers, no joining of tf.data, prefetch
  or Orbax threads (tens of seconds after a preemption save). Call it only
  with every checkpoint complete, or with nothing to save.
  """
  if _release_lock is not None:  # os._exit skips workdir_lock's finally: free the lease now.
    _release_lock()
  console.report(message)
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(status)  # pylint: disable=protected-access


def leave() -> None:
  """Leaves the multi-process runtime together (a barrier), before ``exit_now``; else nothing.

  Process 0 hosts the coordination service: ending it while another process
  still waits in a barrier would fail that process instead of letting it exit 75.
  """
  if jax.distributed.is_initialized():
    with contextlib.suppress(Exception):  # Already leaving: the exit status matters more.
      jax.distributed.shutdown()


def _on_signal(signum: int) -> None:
  """A stop signal: save and stop inside a training loop, else stop at once with 75."""
  name = _SIGNALS.get(signum, str(signum))
  global _stop_signal
  with _signal_lock:  # Not between training_loop_ended's look at _stop and its end.
    if not _loop_running:
      exit_now(EXIT_PREEMPTED, f'Stopped by {name} outside a training loop (start-up, '
               'compiling, evaluation, writing results or between runs): nothing new to save; '
               'run the same command again to resume from the last complete checkpoint.')
    if not _stop.is_set():
      _stop_signal = name
      logging.warning('%s: saving a checkpoint after the current step, then stopping.', name)
    _stop.set()
  if jax.distributed.is_initialized() and signum != signal.SIGTERM:
    # JAX's preemption sync manager listens for SIGTERM only; it makes every
    # process save at the same step.
    os.kill(os.getpid(), signal.SIGTERM)


def _watch(read_fd: int) -> None:
  """Acts on each signal as it arrives (the C-level handler writes it to ``read_fd``).

  Python runs signal handlers in the main thread between bytecodes only, so
  not during a compilation or a long XLA call; this thread is woken at once.
  """
  while True:
    try:
      data = os.read(read_fd, 64)
    except InterruptedError:
      continue
    for signum in data:
      if signum in _SIGNALS:
        _on_signal(signum)


def _install_signal_handlers() -> None:
  """SIGINT and SIGHUP unless ignored at start (nohup), SIGTERM unless JAX's preemption sync
  manager handles it; one watcher."""
  signums = [s for s in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
  if not jax.distributed.is_initialized():
    # No distributed runtime, hence no preemption sync manager: one process
    # needs no agreement on the step, a flag is enough.
    signums.append(signal.SIGTERM)
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  for signum in signums:
    signal.signal(signum, _ignore)
  threading.Thread(target=_watch, args=(read_fd,), name='signal_watcher', daemon=True).start()


def initialize(auto: bool = False, coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None) -> None:
  """Starts the multi-process runtime if asked to, and preemption handling.

  Must run before anything touches a JAX device (jax.devices(), any array).

  Args:
    auto: call ``jax.distributed.initialize()`` and let JAX detect the cluster
      (Cloud TPU VM pod slice, SLURM, Open MPI).
    coordinator_address: ``host:port`` of process 0, for an explicit set-up
      (with num_processes and process_id); implies the distributed runtime.
    num_processes: number of processes of the run.
    process_id: this process's index in [0, num_processes).
  """
  if auto or coordinator_address is not None:
    # Arguments left as None are filled in by JAX's cluster detection.
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  _install_signal_handlers()


def preemption_requested(step: int) -> bool:
  """Whether to save at ``step`` and stop; the same answer on every process.

  Call it after every step with the step count, on every process (JAX's
  preemption sync point needs all processes to report every step), and
  ``training_loop_ended`` when the loop is done.
  """
  global _loop_running
  _loop_running = True
  if jax.distributed.is_initialized():
    return multihost_utils.reached_preemption_sync_point(step)
  return _stop.is_set()


def stop_signal() -> str:
  """The name of the signal that stopped the training loop ('SIGTERM' for JAX's sync manager)."""
  return _stop_signal


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process gets here; a no-op for a single process.

  A barrier of the coordination service, not a device collective: on CPU the
  first run of each program sets up its gloo collectives with a fixed 30 s
  rendezvous, which a process still compiling (or importing) would miss.

  Args:
    name: what is being waited for, for error messages; made unique here.
    timeout_s: give up (with an error) after this long.
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f'barlow_jax/{name}/{next(_barriers)}',
                                        timeout_ms=timeout_s * 1000)


def training_loop_ended() -> bool:
  """From now on a stop signal ends the process at once again (nothing polls it).

  Call it with every checkpoint complete.

  Returns:
    Whether a stop signal arrived after the loop's last look at
    ``preemption_requested`` (the last step, the final save): the caller
    stops (Preempted) instead of going on. Always False with several
    processes, whose stop is agreed by JAX's sync points only.
  """
  global _loop_running
  with _signal_lock:
    _loop_running = False
    return _stop.is_set() and not jax.distributed.is_initialized()


def pause_point(phase: str) -> None:
  """Tests only: blocks at ``phase`` while PAUSE_ENV names it, so a signal lands there.

  With ``PAUSE_ENV=<phase>=<path>`` it creates ``<path>.reached`` and waits
  until ``<path>`` exists (signals are handled meanwhile: see _watch).
  Otherwise (every real run) it does nothing.
  """
  spec = os.environ.get(PAUSE_ENV, '')
  name, _, path = spec.partition('=')
  if not path or name != phase:
    return
  with open(f'{path}.reached', 'w'):
    pass
  while not os.path.exists(path):
    time.sleep(0.005)


def _describe_holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors='replace').strip() or 'unknown process'
  except OSError:
    return 'unknown process'


def _acquire(workdir: str) -> tuple[Optional[int], str]:
  """(fd holding the lock, '') or (None, why not)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    return None, f'workdir {workdir!r} is not writable: {e.strerror or e}.'
  if not os.access(workdir, os.W_OK):
    os.close(fd)
    return None, f'workdir {workdir!r} is not writable.'
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _describe_holder(fd)
    os.close(fd)
    return None, (f'workdir {workdir!r} is in use by another run ({holder}); '
                  f'wait for it to finish or use another --workdir (lock file '
                  f'{os.path.join(workdir, LOCK_FILE)}).')
  os.ftruncate(fd, 0)
  os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode())
  return fd, ''


def _lease_record(started: str) -> str:
  return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': started,
                     'heartbeat': time.time()})


def _dead_here(lease: dict) -> bool:
  """Whether the lease is of a process of this host that no longer runs."""
  if lease.get('host') != socket.gethostname():
    return False
  try:
    os.kill(int(lease.get('pid')), 0)
  except ProcessLookupError:
    return True
  except (OSError, TypeError, ValueError):
    return False
  return False


def _lease_holder(path: epath.Path, now: float) -> Optional[str]:
  """Who holds the lease at ``path`` if its heartbeat is recent, else None (none or stale)."""
  try:
    lease = json.loads(path.read_text())
    age = now - float(lease['heartbeat'])
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError):  # Garbled: a dead writer's, treated as stale.
    logging.warning('Unreadable lease %s: taking it over.', path)
    return None
  if age >= LEASE_STALE_S or _dead_here(lease):
    logging.warning('Taking over the lease %s of pid %s on %s (dead, or heartbeat %.0f s ago).',
                    path, lease.get('pid'), lease.get('host'), age)
    return None
  return (f"pid {lease.get('pid')} on {lease.get('host')}, started {lease.get('started')}, "
          f'heartbeat {max(age, 0):.0f} s ago')


def _heartbeat(path: epath.Path, started: str, stop: threading.Event,
               writing: threading.Lock) -> None:
  while not stop.wait(LEASE_HEARTBEAT_S):
    with writing:  # Not while the lease is released: a late write would revive it.
      if stop.is_set():
        return
      try:
        path.write_text(_lease_record(started))
      except Exception as e:  # pylint: disable=broad-except  # A network blip: try again later.
        logging.warning('Could not refresh the lease %s: %s', path, e)


def _acquire_lease(workdir: str) -> tuple[Optional[Callable[[], None]], str]:
  """(release function, '') or (None, why not); process 0 of a remote workdir."""
  path = epath.Path(workdir) / LEASE_FILE
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    holder = _lease_holder(path, time.time())
    if holder:
      return None, (f'workdir {workdir!r} is in use by another run ({holder}; lease {path}). '
                    f'Wait for it to finish, use another --workdir, or delete the lease if that '
                    f'run is dead (a lease without a heartbeat for {LEASE_STALE_S:.0f} s is '
                    'taken over anyway).')
    started = datetime.datetime.now().isoformat(timespec='seconds')
    path.write_text(_lease_record(started))
  except Exception as e:  # pylint: disable=broad-except  # gfile/fsspec raise many types.
    return None, f'workdir {workdir!r} is not writable: {type(e).__name__}: {e}'
  stop, writing = threading.Event(), threading.Lock()
  threading.Thread(target=_heartbeat, args=(path, started, stop, writing), name='workdir_lease',
                   daemon=True).start()

  def release() -> None:
    with writing:
      stop.set()
      with contextlib.suppress(Exception):
        path.unlink()
  return release, ''


def _acquire_lock(workdir: str) -> tuple[Optional[Callable[[], None]], str]:
  """(release function, '') or (None, why not): flock locally, a lease on an object store."""
  if '://' in workdir:
    return _acquire_lease(workdir)
  fd, problem = _acquire(workdir)
  if fd is None:
    return None, problem

  def release() -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
  return release, ''


# agree's outcomes on the processes that did not decide.
_AGREED, _REFUSED, _FAILED = 0, 1, 2


def agree(decide: Callable[[], int], what: str) -> int:
  """``decide()`` run on process 0 only; its answer (or its refusal) on every process.

  Whatever depends on what a shared workdir holds (the lock, the step to resume
  from, whether the recorded config allows resuming) is read once, here.
  Processes that read it themselves see it before or after process 0 changes
  it (creating ``checkpoints/``, writing config.json) depending on timing and
  the filesystem's visibility, take different paths, and meet in different
  collectives (Orbax's ``sync_global_devices name mismatch``).

  Args:
    decide: returns an int32-sized int; may raise.
    what: what is decided (a noun phrase: 'locking workdir x'), for the other
      processes' error message.

  Returns:
    Process 0's answer.

  Raises:
    On process 0, what ``decide`` raised; on the others WorkdirError (exit 2)
    when it was bad input (errors.BadInput), else RuntimeError.
  """
  if jax.process_count() == 1:
    return decide()
  answer, outcome, error = 0, _AGREED, None
  if jax.process_index() == 0:
    try:
      answer = decide()
    except Exception as e:  # pylint: disable=broad-except  # Re-raised below, after telling the others.
      outcome, error = (_REFUSED if isinstance(e, BadInput) else _FAILED), e
  # A barrier of the coordination service first: the broadcast is a device
  # collective whose gloo rendezvous would time out on a process still starting.
  wait_for_all_processes(f'agree/{what}')
  outcome, answer = (int(x) for x in multihost_utils.broadcast_one_to_all(
      np.array([outcome, answer], np.int32)))
  if error is not None:
    raise error
  if outcome == _REFUSED:
    raise WorkdirError(f'process 0 refused the start ({what}); see its message.')
  if outcome == _FAILED:
    raise RuntimeError(f'process 0 failed ({what}); see its message.')
  return answer


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on ``workdir`` for the duration of the block.

  A local workdir is flock-ed, a remote one (``gs://``) leased (module docstring).

  Process 0 takes the lock (processes of a multi-host run share the workdir);
  its answer is agreed (``agree``) so that every process stops if it failed,
  instead of waiting in a collective for a process that has left.

  Args:
    workdir: the run's working directory; created if missing.

  Raises:
    WorkdirError: the workdir cannot be created or written, or another live
      run holds it.
  """
  release = None

  def take() -> int:
    nonlocal release
    release, problem = _acquire_lock(workdir)
    if problem:
      raise WorkdirError(problem)
    return 0

  agree(take, f'locking workdir {workdir!r}')
  global _release_lock
  _release_lock = release
  try:
    yield
  finally:
    _release_lock = None
    if release is not None:
      release()
