"""Running barlow_jax.main (or the local launcher) in subprocesses, and reading what they wrote.

Shared by the multi-process, preemption and bad-input tests. Every subprocess
runs in its own session with a timeout, and its whole process group is killed
afterwards, so a failing test leaves no process behind.
"""

import contextlib
import glob
import os
import signal
import socket
import subprocess
import re
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from barlow_jax.data import datasets
from barlow_jax import config_files
from barlow_jax import optim
from barlow_jax.models import factory
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from conftest import REPO, TEST_XLA_FLAGS

BASE_CONFIG = 'configs/cifar_bt_cpu.py'


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def overrides(config) -> list[str]:
  """``--config.key=value`` for every value where ``config`` differs from BASE_CONFIG."""
  base = _flatten(config_files.load(BASE_CONFIG).to_dict())
  changed = {k: v for k, v in _flatten(config.to_dict()).items() if k not in base or base[k] != v}
  def flag_value(v) -> str:
    if isinstance(v, tuple):  # ml_collections parses '(a,b)' back into a tuple.
      return '(' + ','.join(flag_value(x) for x in v) + ')'
    assert not isinstance(v, list), f'{v}: only scalars and tuples are supported'
    return repr(v) if isinstance(v, float) else str(v)

  return [f'--config.{k}={flag_value(v)}' for k, v in changed.items()]


def env(devices: int = 1, **extra: str) -> dict:
  """A subprocess environment with ``devices`` CPU devices per process.

  The test process itself runs with XLA_FLAGS asking for 8 devices
  (conftest.py); subprocesses get their own count instead, and the tests'
  compile-time flags (conftest.TEST_XLA_FLAGS).
  """
  out = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS='cpu',
             JAX_NUM_CPU_DEVICES=str(devices), TF_CPP_MIN_LOG_LEVEL='2', PYTHON=sys.executable)
  # os.environ carries conftest's persistent compilation cache: runs of the same
  # config on the same devices compile once (a restart costs seconds, not the
  # 10-30 s of compiling the train step again).
  out.update(extra)
  return out


def main_cmd(workdir, config, *extra: str) -> list[str]:
  return [sys.executable, '-m', 'barlow_jax.main', f'--config={BASE_CONFIG}',
          f'--workdir={workdir}', *overrides(config), *extra]


def launcher_cmd(num_processes: int, devices: int, workdir, config) -> list[str]:
  return ['bash', 'launch/local_multiprocess.sh', str(num_processes),
          f'--devices_per_process={devices}', '--', f'--config={BASE_CONFIG}',
          f'--workdir={workdir}', *overrides(config)]


def kill_group(proc: subprocess.Popen) -> None:
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signal.SIGKILL)


def start(cmd: list[str], environ: dict) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(cmd: list[str], environ: dict, timeout: float) -> subprocess.CompletedProcess:
  """Runs ``cmd`` to completion; fails the test (and kills everything) on timeout."""
  proc = start(cmd, environ)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    kill_group(proc)
    out, err = proc.communicate()
    raise AssertionError(f'Timed out after {timeout} s: {" ".join(cmd)}\n{err[-4000:]}')
  finally:
    kill_group(proc)  # Stragglers, e.g. processes of the launcher.
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for a JAX coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(script: str, args: list[list[str]], environ: dict,
                  timeout: float) -> list[tuple[str, str]]:
  """Runs ``tests/<script> <args[i]...>`` as len(args) processes at once; (stdout, stderr) of each.

  Fails the test when one exits non-zero or is still running after ``timeout``
  (a process waiting for another at a barrier); kills them all either way.
  """
  procs = [start([sys.executable, str(REPO / 'tests' / script), *a], environ) for a in args]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=timeout)
      assert proc.returncode == 0, err[-3000:]
      outputs.append((out, err))
  except subprocess.TimeoutExpired:
    raise AssertionError(f'{script}: a process still running after {timeout} s') from None
  finally:
    for proc in procs:
      kill_group(proc)
  return outputs


class StreamingRun:
  """A subprocess whose stderr is read by a thread, tracking the step process 0 logged."""

  def __init__(self, cmd: list[str], environ: dict):
    self.proc = start(cmd, environ)
    self.lines = []
    self.step = 0  # Last step logged (with config.log_every = 1: every step).
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.lines.append(line)
      if match := re.search(r'\] step (\d+)/', line):
        self.step = int(match.group(1))

  def wait_for_step(self, step: int, timeout: float) -> None:
    """Until the run logged ``step`` (or exited)."""
    end = time.time() + timeout
    while self.step < step and self.proc.poll() is None:
      assert time.time() < end, ''.join(self.lines)[-4000:]
      time.sleep(0.002)

  def finish(self, timeout: float) -> tuple[int, str]:
    """(exit status, stderr); kills the process group on timeout or failure."""
    try:
      self.proc.wait(timeout)
    finally:
      kill_group(self.proc)
      self.proc.wait()
      self.reader.join(10)
    return self.proc.returncode, ''.join(self.lines)


def child_with_arg(parent_pid: int, arg: str) -> int:
  """The pid of the child of ``parent_pid`` whose command line holds ``arg``."""
  with open(f'/proc/{parent_pid}/task/{parent_pid}/children') as f:
    children = [int(p) for p in f.read().split()]
  for pid in children:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      if arg.encode() in f.read().split(b'\0'):
        return pid
  raise LookupError(f'no child of {parent_pid} with {arg}')


def latest_step(workdir) -> Optional[int]:
  steps = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()] \
      if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []
  return max(steps, default=None)


def abstract_state(config, devices=None):
  """The TrainState structure of ``config``, replicated over ``devices``."""
  mesh = mesh_lib.make_mesh(devices)
  model = factory.create_model(config, datasets.num_classes(config), axis_name=mesh_lib.DATA_AXIS)
  tx, _ = optim.create_optimizer(config, steps_per_epoch=1, total_steps=2)
  abstract = jax.eval_shape(lambda: state_lib.create_train_state(
      model, tx, mesh, config.seed, config.augment.crop_size))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      abstract)


def load_state(workdir, config, step: Optional[int] = None, devices=None):
  """A checkpoint of ``workdir`` restored onto ``devices`` (default all), as numpy."""
  manager = checkpoint.manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract_state(config, devices)))
    return jax.device_get(restored)
  finally:
    manager.close()


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_states_equal(a, b) -> None:
  """Bit-identical TrainStates: step, params, batch_stats, optimiser state and rng."""
  assert int(a.step) == int(b.step)
  for name in ('params', 'batch_stats', 'opt_state', 'rng'):
    jax.tree.map(np.testing.assert_array_equal, getattr(a, name), getattr(b, name))


def read_scalars(workdir, tag: str) -> dict[int, float]:
  """{step: value} of a TensorBoard scalar written by the run's clu writer."""
  import tensorflow as tf  # Only for reading event files.
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values
