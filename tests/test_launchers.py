"""The launch/ scripts' own logic, with fake srun/scontrol/python on PATH (no JAX, no SLURM).

Each fake logs its arguments (and the environment the launcher gave it) to a
file and exits with the status the test chooses, so what is checked is the
script: which command it starts, when it requeues, which status it returns.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# srun as the script calls it: logs its arguments and JAX_LOCAL_DEVICE_IDS, exits $SRUN_STATUS.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$LOG_DIR/srun"
echo "${JAX_LOCAL_DEVICE_IDS:-unset}" >> "$LOG_DIR/srun_env"
exit "$SRUN_STATUS"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$LOG_DIR/scontrol"
"""


def _fake_bin(tmp_path, **scripts) -> pathlib.Path:
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir


def _run_sbatch(tmp_path, srun_status: int, **env) -> tuple[subprocess.CompletedProcess, dict]:
  bin_dir = _fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
  environ = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', LOG_DIR=str(tmp_path),
                 SRUN_STATUS=str(srun_status), SLURM_JOB_ID='4242', **env)
  proc = subprocess.run(['bash', 'launch/slurm_gpu.sbatch', '--config=configs/imagenet_bt.py',
                         '--workdir=/shared/bt'], cwd=REPO, env=environ, capture_output=True,
                        text=True, timeout=30)
  logs = {name: (tmp_path / name).read_text().splitlines() if (tmp_path / name).exists() else []
          for name in ('srun', 'srun_env', 'scontrol')}
  return proc, logs


@pytest.mark.parametrize('status, requeued', [(75, True), (2, False), (3, False), (0, False)])
def test_slurm_requeues_only_on_status_75(tmp_path, status, requeued):
  proc, logs = _run_sbatch(tmp_path, status)
  assert proc.returncode == status, proc.stderr
  assert logs['srun'] == [
      '--kill-on-bad-exit=0 --wait=60 python -m barlow_jax.main --distributed '
      '--config=configs/imagenet_bt.py --workdir=/shared/bt']
  assert logs['scontrol'] == (['requeue 4242'] if requeued else [])


def test_slurm_does_not_kill_the_step_when_one_task_exits_75(tmp_path):
  """kill-on-bad-exit would turn a clean 75 of one task into SIGKILLs (137) of the others."""
  proc, logs = _run_sbatch(tmp_path, 0)
  assert proc.returncode == 0
  (args,) = logs['srun']
  assert '--kill-on-bad-exit=0' in args.split()
  assert not any(a.startswith('--kill-on-bad-exit=1') or a == '-K' for a in args.split())


@pytest.mark.parametrize('env, device_ids', [
    ({}, 'unset'),
    ({'PER_NODE': '1', 'SLURM_GPUS_ON_NODE': '4'}, '0,1,2,3'),
])
def test_slurm_per_node_gives_each_process_all_gpus_of_its_node(tmp_path, env, device_ids):
  proc, logs = _run_sbatch(tmp_path, 0, **env)
  assert proc.returncode == 0, proc.stderr
  assert logs['srun_env'] == [device_ids]


# python as local_multiprocess.sh calls it: the port probe (-c) runs the real
# interpreter; a "process" logs its arguments and device count, then exits with
# STATUS_<process_id> ('hang': waits for a signal; TERM makes it exit 75 as
# barlow_jax.main does on preemption).
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then exec {sys.executable} "$@"; fi
for a in "$@"; do [[ $a == --process_id=* ]] && i=${{a#*=}}; done
echo "$i JAX_NUM_CPU_DEVICES=$JAX_NUM_CPU_DEVICES $*" >> "$LOG_DIR/python"
status_var=STATUS_$i
status=${{!status_var}}
if [[ $status == hang ]]; then
  trap 'echo "$i got TERM" >> "$LOG_DIR/signals"; exit 75' TERM
  while :; do sleep 0.1; done
fi
exit "$status"
"""


def _local_env(tmp_path, statuses) -> dict:
  bin_dir = _fake_bin(tmp_path, python=FAKE_PYTHON)
  env = dict(os.environ, PYTHON=str(bin_dir / 'python'), LOG_DIR=str(tmp_path), GRACE_SECONDS='1')
  env.update({f'STATUS_{i}': str(s) for i, s in enumerate(statuses)})
  return env


def _local_cmd(num_processes: int) -> list[str]:
  return ['bash', 'launch/local_multiprocess.sh', str(num_processes), '--devices_per_process=4',
          '--', '--config=configs/cifar_bt_cpu.py', '--workdir=runs/mp']


@pytest.mark.parametrize('statuses, expected', [
    ((0, 0, 0), 0),
    ((75, 75, 75), 75),
    ((0, 3, 0), 3),        # The first non-zero status, not the last one.
    ((3, 'hang', 0), 3),   # A process blocked in a collective is stopped after the grace period.
])
def test_local_multiprocess_status(tmp_path, statuses, expected):
  start = time.monotonic()
  proc = subprocess.run(_local_cmd(len(statuses)), cwd=REPO, env=_local_env(tmp_path, statuses),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == expected, proc.stderr
  assert time.monotonic() - start < 20
  lines = sorted((tmp_path / 'python').read_text().splitlines())
  assert len(lines) == len(statuses)
  ports = set()
  for i, line in enumerate(lines):
    words = line.split()
    assert words[:4] == [str(i), 'JAX_NUM_CPU_DEVICES=4', '-m', 'barlow_jax.main'], line
    assert words[5:] == [f'--num_processes={len(statuses)}', f'--process_id={i}',
                         '--config=configs/cifar_bt_cpu.py', '--workdir=runs/mp'], line
    assert words[4].startswith('--coordinator_address=127.0.0.1:'), line
    ports.add(words[4])
  assert len(ports) == 1  # One coordinator for all.
  if 'hang' in statuses:
    assert 'stopping the others' in proc.stderr


def test_local_multiprocess_forwards_sigterm(tmp_path):
  """SIGTERM to the launcher reaches every process; their 75 is its status."""
  proc = subprocess.Popen(_local_cmd(2), cwd=REPO, env=_local_env(tmp_path, ('hang', 'hang')),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 20
    log = tmp_path / 'python'
    while not (log.exists() and len(log.read_text().splitlines()) == 2):
      assert time.monotonic() < deadline, 'the processes did not start'
      time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 75
  finally:
    if proc.poll() is None:
      proc.kill()
  assert sorted((tmp_path / 'signals').read_text().splitlines()) == ['0 got TERM', '1 got TERM']
