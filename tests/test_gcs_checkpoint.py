"""A pretraining run on a gs:// workdir: checkpoints, TensorBoard and the lease in a GCS emulator.

Offline: tests/gcs_emulator.py runs gcp-storage-emulator on 127.0.0.1 and
points the run's own GCS clients at it, unchanged: tensorstore (Orbax's
arrays) by its test endpoint, google-cloud-storage (Orbax's bucket lookup)
by STORAGE_EMULATOR_HOST, TensorFlow's GCS filesystem (etils.epath's backend
for gs://, and clu's TensorBoard writer) through a local TLS proxy. Nothing
in barlow_jax, epath, Orbax or clu is patched.
"""

import logging
import os
import pathlib

import jax
import pytest

import cli_runs
import gcs_emulator
from conftest import needs_cifar10, tiny_config

from barlow_jax import main
from barlow_jax.data import pipeline
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import distributed

BUCKET = 'bkt'


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator, with bucket BUCKET; this process's GCS clients pointed at it.

  Module-scoped: tensorstore reads TENSORSTORE_GCS_HTTP_URL once per process.
  """
  with pytest.MonkeyPatch.context() as patch:
    emulator = gcs_emulator.Emulator(BUCKET, str(tmp_path_factory.mktemp('gcs_tls')), patch)
    try:
      yield emulator
    finally:
      emulator.close()


def _raise_exit(status):
  raise SystemExit(status)  # Instead of os._exit (distributed.exit_now): a failure is reported.


class SimulatedCrash(Exception):
  pass


def _crash_after(batches: int, monkeypatch):
  """Makes the next run raise SimulatedCrash after ``batches`` batches; returns the undo."""
  real_prefetch = pipeline.prefetch_to_mesh

  def crashing(iterator, sharding, size=2):
    for i, batch in enumerate(real_prefetch(iterator, sharding, size)):
      if i == batches:
        raise SimulatedCrash()
      yield batch
  monkeypatch.setattr(pipeline, 'prefetch_to_mesh', crashing)
  return lambda: monkeypatch.setattr(pipeline, 'prefetch_to_mesh', real_prefetch)


def _download_events(gcs, run: str, directory: pathlib.Path) -> pathlib.Path:
  """The run's TensorBoard event files, copied from the bucket into ``directory``."""
  directory.mkdir()
  for name in gcs.objects(f'{run}/events.out.tfevents'):
    (directory / name.rsplit('/', 1)[1]).write_bytes(gcs.read(name))
  return directory


@needs_cifar10
def test_pretraining_on_a_bucket_resumes_there_to_identical_parameters(
    gcs, tmp_path, monkeypatch, small_resnet, caplog):
  monkeypatch.setattr(os, '_exit', _raise_exit)
  config = tiny_config()  # 4 steps, a checkpoint every 2.
  config.model.encoder = small_resnet
  straight_dir = str(tmp_path / 'straight')
  main.run(config, straight_dir)  # Uninterrupted, on the local disk.

  workdir, run = f'gs://{BUCKET}/run', 'run'
  restore_prefetch = _crash_after(2, monkeypatch)
  with pytest.raises(SimulatedCrash):
    main.run(config, workdir)
  restore_prefetch()
  saved = gcs.objects(f'{run}/checkpoints/')
  # Step 2 complete in the bucket: its arrays (OCDBT files, written by tensorstore) and Orbax's
  # commit mark (written through epath); nothing of step 4.
  assert any(n.startswith(f'{run}/checkpoints/2/default/ocdbt.process_0/d/') for n in saved), saved
  assert f'{run}/checkpoints/2/{checkpoint.COMMIT_FILE}' in saved
  assert not any(n.startswith(f'{run}/checkpoints/4/') for n in saved), saved
  assert f'{run}/{distributed.LEASE_FILE}' not in gcs.objects(run)  # Released by the crash too.
  # What a run killed while saving step 4 leaves on a bucket: its objects, no commit mark. The
  # resume removes it and saves step 4 again seconds later, which worked only with TensorFlow's
  # GCS stat cache off (barlow_jax/__init__.py sets GCS_STAT_CACHE_MAX_AGE=0 before TF loads).
  gcs.write(f'{run}/checkpoints/4/default/manifest.ocdbt', b'half written')

  caplog.set_level(logging.INFO)
  main.run(config, workdir)
  assert 'Resuming from checkpoint step 2 in gs://bkt/run/checkpoints' in caplog.text
  assert checkpoint.complete_steps(f'{workdir}/checkpoints') == [2, 4]
  names = gcs.objects(run)
  assert gcs.read(f'{run}/checkpoints/4/default/manifest.ocdbt') != b'half written'  # Re-saved.
  assert f'{run}/config.json' in names and f'{run}/{distributed.LEASE_FILE}' not in names
  assert not (pathlib.Path.cwd() / 'gs:').exists()  # Nothing went to a local 'gs:' directory.

  one_device = jax.devices()[:1]
  resumed = cli_runs.load_state(workdir, config, devices=one_device)
  assert int(resumed.step) == config.num_steps
  cli_runs.assert_states_equal(resumed, cli_runs.load_state(straight_dir, config,
                                                            devices=one_device))
  # TensorBoard: the crashed run logged step 2, the resumed one step 4, as the straight run did.
  events = _download_events(gcs, run, tmp_path / 'events')
  bucket_losses = cli_runs.read_scalars(events, 'train/bt_loss')
  assert sorted(bucket_losses) == [2, 4]
  assert bucket_losses == cli_runs.read_scalars(straight_dir, 'train/bt_loss')
