"""Preemption: kill -9 at random moments and SIGTERM never cost more than the last checkpoint.

One workdir is interrupted again and again (kill -9 at four random points of
the training, one kill -9 aimed at an asynchronous Orbax save in flight, one
SIGTERM), each time resumed by the same command; the finished run's state
must be bit-identical to an uninterrupted run's. Each resumed run must start
from the newest complete checkpoint. The data order after a resume is part of
what bit-identical parameters prove: a batch repeated or skipped would change
them (the stream is also checked directly, across epoch boundaries, in
test_input_pipeline.py).

All runs are subprocesses with 1 CPU device sharing a persistent compilation
cache (cli_runs.env), so after the first two only tracing is paid again.
"""

import os
import random
import re
import signal
import time

import cli_runs
from barlow_jax import errors
from conftest import needs_cifar10, tiny_config

_SEED = 20261122  # Fixed, so that a failure replays with the same kill points.
_DEADLINE_S = 600  # All runs together: a hang fails the test instead of blocking CI.


def _tmp_dirs(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return [d for d in os.listdir(path) if 'orbax-checkpoint-tmp' in d] if os.path.isdir(path) else []


@needs_cifar10
def test_kill9_and_sigterm_at_random_points_resume_to_identical_parameters(tmp_path):
  config = tiny_config()
  config.num_steps = 24
  config.log_every = 1
  config.checkpoint.every_steps = 1  # A save (or a deletion) is in flight most of the time.
  config.checkpoint.max_to_keep = 2
  environ = cli_runs.env()
  rng = random.Random(_SEED)
  deadline = time.time() + _DEADLINE_S

  # The uninterrupted run goes alongside the first interrupted one (2 cores).
  straight_dir = tmp_path / 'straight'
  straight = cli_runs.StreamingRun(cli_runs.main_cmd(straight_dir, config), environ)

  workdir = tmp_path / 'interrupted'
  # Five kills (four at random steps, one the moment a save is in flight) and a SIGTERM.
  plan = ['kill -9'] * 4 + ['kill -9 during save', 'SIGTERM']
  rng.shuffle(plan)
  report = []
  for i, kind in enumerate(plan):
    before = cli_runs.latest_step(workdir) or 0
    run = cli_runs.StreamingRun(cli_runs.main_cmd(workdir, config), environ)
    if kind == 'kill -9 during save':
      run.wait_for_step(before + 1, timeout=max(1, deadline - time.time()))
      while not _tmp_dirs(workdir) and run.proc.poll() is None:
        time.sleep(0.0005)
      run.proc.send_signal(signal.SIGKILL)
      target = None
    else:
      # A random step of this run's share of what is left, then a random
      # moment within that step (or the save it starts).
      share = max(1, (config.num_steps - 2 - before) // (len(plan) - i))
      target = before + rng.randint(1, share)
      run.wait_for_step(target, timeout=max(1, deadline - time.time()))
      time.sleep(rng.uniform(0.0, 0.3))
      run.proc.send_signal(signal.SIGKILL if kind == 'kill -9' else signal.SIGTERM)
    saving = bool(_tmp_dirs(workdir))  # A save was in flight at the signal.
    code, log = run.finish(timeout=120)
    after = cli_runs.latest_step(workdir) or 0

    resumed_from = re.search(r'Resuming from checkpoint step (\d+)', log)
    assert (int(resumed_from.group(1)) if resumed_from else 0) == before, log[-4000:]
    assert after >= before
    if kind == 'SIGTERM':
      assert code == errors.EXIT_PREEMPTED, (code, log[-4000:])
      saved = int(re.search(r'Preempted \(SIGTERM\): saved checkpoint step (\d+)', log).group(1))
      assert saved == after >= target and not _tmp_dirs(workdir), (saved, after, target)
      assert 'Traceback' not in log
    else:
      assert code == -signal.SIGKILL, (code, log[-4000:])
    report.append(dict(kind=kind, target=target, before=before, after=after, exit=code,
                       save_in_flight=saving))

  code, log = straight.finish(timeout=max(1, deadline - time.time()))
  assert code == 0, log[-4000:]
  final = cli_runs.StreamingRun(cli_runs.main_cmd(workdir, config), environ)
  code, log = final.finish(timeout=max(1, deadline - time.time()))
  assert code == 0, log[-4000:]
  assert f'Resuming from checkpoint step {report[-1]["after"]}' in log

  kills = [r for r in report if r['kind'].startswith('kill')]
  print('\n' + '\n'.join(str(r) for r in report))
  print(f'kills tried: {len(kills)}, of which during a save: '
        f'{sum(r["save_in_flight"] for r in kills)}; SIGTERM: 1')
  assert len(kills) >= 5
  assert next(r for r in kills if r['kind'] == 'kill -9 during save')['save_in_flight'], report

  resumed = cli_runs.load_state(workdir, config)
  assert int(resumed.step) == config.num_steps
  cli_runs.assert_states_equal(resumed, cli_runs.load_state(straight_dir, config))
  print(f'final state after {len(report)} interruptions: bit-identical to the uninterrupted run')
