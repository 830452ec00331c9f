"""gs:// workdirs: the workdir files and the lease, through epath, on a fake bucket (offline).

The fake bucket: ``etils.epath.testing.mock_epath`` with every backend
function re-pointed from ``gs://<bucket>/...`` to a local directory, and the
TensorFlow (gfile) backend epath prefers for gs:// turned off, so the code
under test takes its remote branch (``'://'`` in the path) and every epath
call it makes lands in the fake bucket. The bucket ``gs://readonly`` refuses
writes, like a bucket without write permission.
"""

import json
import os
import socket
import subprocess
import threading
import time

from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
import ml_collections
import pytest

from conftest import REPO

from barlow_jax import main
from barlow_jax import plots
from barlow_jax.errors import WorkdirError
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import distributed
from barlow_jax.runtime import workdir as workdir_lib


_FNS = ('copy', 'exists', 'glob', 'isdir', 'listdir', 'makedirs', 'mkdir', 'open', 'remove',
        'rename', 'replace', 'rmtree', 'stat', 'walk')
_WRITES = ('makedirs', 'mkdir', 'remove', 'rename', 'replace', 'rmtree', 'copy')


def _redirect(root, name):
  """A mock of backend function ``name``: gs:// paths (and a 2nd path argument) under ``root``."""
  local = lambda p: os.path.join(root, str(p)[len('gs://'):]) if str(p).startswith('gs://') else p

  def fn(original, path, *args, **kwargs):
    if str(path).startswith('gs://readonly') and (name in _WRITES or (
        name == 'open' and any(c in args[0] for c in 'wa'))):
      raise PermissionError(f'403 Forbidden: {path}')
    args = tuple(local(a) if name in ('rename', 'replace', 'copy') and i == 0 else a
                 for i, a in enumerate(args))
    return original(local(path), *args, **kwargs)
  return fn


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory behind gs://; every epath gs:// call lands there."""
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  with epath_testing.mock_epath(**{n: _redirect(str(tmp_path), n) for n in _FNS}):
    yield tmp_path


def _config():
  return ml_collections.ConfigDict({'mode': 'pretrain', 'lr': 0.1, 'log_every': 5})


def test_workdir_files_round_trip_on_the_bucket(bucket):
  workdir = 'gs://b/run'
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  workdir_lib.record_start(workdir, _config(), None, [])
  assert json.loads((bucket / 'b/run/config.json').read_text())['lr'] == 0.1
  assert workdir_lib.read_config(workdir).lr == 0.1
  # A resumption with another learning rate is refused, then recorded when allowed.
  changed = _config()
  changed.lr = 0.2
  with pytest.raises(Exception, match='lr: 0.1 -> 0.2'):
    workdir_lib.check_resume(workdir, changed, 4, allow_change=False)
  diffs = workdir_lib.check_resume(workdir, changed, 4, allow_change=True)
  workdir_lib.record_start(workdir, changed, 4, diffs)
  assert workdir_lib.read_config(workdir).lr == 0.2
  assert json.loads((bucket / 'b/run/config_changes.json').read_text())[0]['step'] == 4
  assert workdir_lib.finished_results(workdir, changed, False) is None
  workdir_lib.write_results(workdir, {'acc': 0.5}, '# done\n')
  assert workdir_lib.finished_results(workdir, changed, False) == {'acc': 0.5}
  assert (bucket / 'b/run/results.md').read_text() == '# done\n'
  plots.cross_correlation_png([[1.0, 0.0], [0.0, 1.0]], f'{workdir}/c.png')
  assert (bucket / 'b/run/c.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # Written in one upload each: no aside (.tmp) object is left, nothing was renamed.
  assert sorted(p.name for p in (bucket / 'b/run').iterdir()) == [
      'c.png', 'config.json', 'config_changes.json', 'results.json', 'results.md']


def _write_lease(bucket, host, pid, age_s):
  path = bucket / 'b/run' / distributed.LEASE_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({'host': host, 'pid': pid, 'started': '2026-12-04T10:00:00',
                              'heartbeat': time.time() - age_s}))
  return path


def test_a_live_lease_refuses_the_run_with_exit_2_naming_the_holder(bucket, capsys):
  lease = _write_lease(bucket, 'tpu-host-7', 4242, age_s=30)
  before = lease.read_text()
  with pytest.raises(SystemExit) as exit_info:
    main.run(_config(), 'gs://b/run')
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert 'pid 4242 on tpu-host-7' in err and 'heartbeat 30 s ago' in err, err
  assert lease.read_text() == before  # The holder's lease is untouched.


@pytest.mark.parametrize('host, pid, age_s', [
    ('tpu-host-7', 4242, distributed.LEASE_STALE_S + 5),  # No heartbeat for 3 periods: dead.
    (socket.gethostname(), 2**22 + 12345, 1),  # Fresh, but its process is gone from this host.
])
def test_a_dead_runs_lease_is_taken_over_refreshed_and_released(bucket, monkeypatch, host, pid,
                                                                 age_s):
  lease = _write_lease(bucket, host, pid, age_s)
  monkeypatch.setattr(distributed, 'LEASE_HEARTBEAT_S', 0.05)
  with distributed.workdir_lock('gs://b/run'):
    held = json.loads(lease.read_text())
    assert (held['host'], held['pid']) == (socket.gethostname(), os.getpid())
    time.sleep(0.3)
    assert json.loads(lease.read_text())['heartbeat'] > held['heartbeat']  # Refreshed.
    # Meanwhile another run is refused, naming this one.
    with pytest.raises(WorkdirError, match=f'pid {os.getpid()} on {socket.gethostname()}'):
      with distributed.workdir_lock('gs://b/run'):
        pass
  assert not lease.exists()
  time.sleep(0.2)  # The heartbeat thread wakes and sees the stop.
  assert not any(t.name == 'workdir_lease' for t in threading.enumerate())


def test_an_unwritable_bucket_exits_2_naming_the_workdir(bucket, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main.run(_config(), 'gs://readonly/run')
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "workdir 'gs://readonly/run' is not writable" in err and '403' in err, err


def test_tpu_pod_script_passes_a_gs_workdir_through_to_every_host(tmp_path):
  """launch/tpu_pod.sh with a fake gcloud on PATH: the command it would run on the hosts."""
  fake = tmp_path / 'bin' / 'gcloud'
  fake.parent.mkdir()
  fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$CAPTURE"\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f'{fake.parent}:{os.environ["PATH"]}',
             CAPTURE=str(tmp_path / 'args'))
  subprocess.run([str(REPO / 'launch' / 'tpu_pod.sh'), '--tpu=bt-v4-32', '--zone=us-central2-b',
                  '--', '--config=configs/imagenet_bt.py', '--workdir=gs://bucket/bt run'],
                 env=env, check=True, cwd=tmp_path)
  args = (tmp_path / 'args').read_text().splitlines()
  assert args[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'bt-v4-32'], args
  assert '--worker=all' in args and '--zone=us-central2-b' in args
  command = next(a[len('--command='):] for a in args if a.startswith('--command='))
  # The remote shell gets the workdir unchanged (quoted), and nothing local was created.
  assert command == ('cd ~/barlow_jax && python3 -m barlow_jax.main --distributed '
                     r'--config=configs/imagenet_bt.py --workdir=gs://bucket/bt\ run'), command
  assert sorted(p.name for p in tmp_path.iterdir()) == ['args', 'bin']


def test_partial_checkpoints_on_a_bucket_are_the_uncommitted_ones(bucket):
  """On gs:// Orbax writes <step>/ in place and commit_success.txt last (no rename)."""
  root = bucket / 'b/run/checkpoints'
  for step, committed in ((3, True), (5, False)):
    (root / str(step) / 'state').mkdir(parents=True)
    if committed:
      (root / str(step) / checkpoint.COMMIT_FILE).write_text('done')
  assert checkpoint.complete_steps('gs://b/run/checkpoints') == [3]
  assert checkpoint.remove_partial('gs://b/run/checkpoints') == ['5']
  assert sorted(p.name for p in root.iterdir()) == ['3']


def test_a_local_workdir_keeps_flock(tmp_path):
  """Locally no lease is written: flock, released by the kernel even on kill -9."""
  with distributed.workdir_lock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=f'pid {os.getpid()} on {socket.gethostname()}'):
      with distributed.workdir_lock(str(tmp_path)):
        pass
  assert sorted(p.name for p in tmp_path.iterdir()) == [distributed.LOCK_FILE]
  with distributed.workdir_lock(str(tmp_path)):  # Released: taken again.
    pass


def test_exit_75_releases_the_lease(bucket, monkeypatch):
  """exit_now (os._exit: no finally runs) removes the lease first, so a resume is not refused."""
  lease = bucket / 'b/run' / distributed.LEASE_FILE
  at_exit = []

  def fake_exit(status):  # What the bucket holds when the process would end.
    at_exit.append((status, lease.exists()))
    raise SystemExit(status)
  monkeypatch.setattr(os, '_exit', fake_exit)
  with pytest.raises(SystemExit):
    with distributed.workdir_lock('gs://b/run'):
      assert lease.exists()
      distributed.exit_now(75, 'stopped')
  assert at_exit == [(75, False)]
