"""A pretraining run on a gs:// workdir saves its checkpoints in a GCS emulator and resumes from them.

Offline: gcp-storage-emulator (the GCS JSON API, in memory, a thread of this
process on a free port of 127.0.0.1) stands in for Cloud Storage, and both
clients the run uses for a bucket are pointed at it:

- Orbax's arrays go through tensorstore's own GCS driver, which reads
  TENSORSTORE_GCS_HTTP_URL (its documented test endpoint) and takes
  GOOGLE_AUTH_TOKEN_FOR_TESTING instead of credentials;
- every other file (config.json, the lease, Orbax's metadata and
  commit_success.txt) goes through etils.epath; with its TensorFlow backend
  off, epath uses fsspec's gcsfs, which reads STORAGE_EMULATOR_HOST.

TensorBoard is not on the bucket here: clu writes it with tf.summary, through
TensorFlow's own GCS filesystem, whose endpoint is a compile-time constant
(``https://www.googleapis.com/storage/v1/``, tsl gcs_file_system.cc; no
environment variable moves it), so offline it cannot be created at all. This
test gives the run a local TensorBoard directory instead.
"""

import logging
import os
import threading

# Before gcsfs is imported (it reads this once): the plain JSON-API client,
# not the one that first asks the Storage Control gRPC API for the bucket's
# layout (no such API in the emulator).
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'

from clu import metric_writers  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402
from etils.epath import gpath  # noqa: E402
import fsspec  # noqa: E402
import gcsfs  # noqa: E402
from gcp_storage_emulator.handlers import objects as emulator_objects  # noqa: E402
from gcp_storage_emulator.server import create_server  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

import cli_runs  # noqa: E402
from conftest import needs_cifar10, tiny_config  # noqa: E402

from barlow_jax import main  # noqa: E402
from barlow_jax import trainer  # noqa: E402
from barlow_jax.data import pipeline  # noqa: E402
from barlow_jax.runtime import checkpoint  # noqa: E402
from barlow_jax.runtime import distributed  # noqa: E402

BUCKET = 'bkt'


def _with_generation_header(download):
  """The emulator's media download, adding the object's generation as GCS does.

  Cloud Storage answers every object read with ``x-goog-generation``;
  tensorstore reads the generation from it (OCDBT's manifest is written
  conditionally on it) and fails with "Malformed StorageGeneration" without
  it. gcp-storage-emulator 2026.7.19 leaves it out.
  """
  def wrapped(request, response, storage, *args, **kwargs):
    try:
      response['x-goog-generation'] = storage.get_file_obj(
          request.params['bucket_name'], request.params['object_id'])['generation']
    except Exception:  # pylint: disable=broad-except  # A missing object: the 404 below.
      pass
    return download(request, response, storage, *args, **kwargs)
  return wrapped


def _forget_gcs_clients():
  """gcsfs instances (cached by fsspec and by epath) keep the endpoint they were made with."""
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope='module')
def gcs():
  """The emulator with bucket BUCKET, and this process's GCS clients pointed at it.

  Module-scoped: tensorstore reads TENSORSTORE_GCS_HTTP_URL once per process.
  Yields epath's gcsfs client, to look into the bucket directly.
  """
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(emulator_objects, 'download', _with_generation_header(emulator_objects.download))
    server = create_server('127.0.0.1', 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = 'http://127.0.0.1:%d' % server._api._httpd.server_address[1]  # pylint: disable=protected-access
    for name, value in (('TENSORSTORE_GCS_HTTP_URL', url), ('STORAGE_EMULATOR_HOST', url),
                        ('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'offline')):
      patch.setenv(name, value)
    patch.setattr(gpath, '_is_tf_installed', lambda: False)  # epath's gs:// through gcsfs.
    # No listing cache: tensorstore writes into the same directories behind gcsfs's back.
    patch.setitem(fsspec.config.conf, 'gs', {'cache_timeout': 0})
    # The emulator logs each request and a traceback for each connection its client closed early.
    patch.setattr(logging.getLogger('gcp_storage_emulator'), 'disabled', True)
    _forget_gcs_clients()
    try:
      yield fsspec.filesystem('gs')
    finally:
      _forget_gcs_clients()
      server.stop()
      api_thread = server._api  # pylint: disable=protected-access
      threading.Thread.join(api_thread, 5)  # Its own join() only shuts the HTTP server down.
      assert not api_thread.is_alive()


def _raise_exit(status):
  raise SystemExit(status)  # Instead of os._exit (distributed.exit_now): a failure is reported.


class SimulatedCrash(Exception):
  pass


def _crash_after(batches: int, monkeypatch):
  real_prefetch = pipeline.prefetch_to_mesh

  def crashing(iterator, sharding, size=2):
    for i, batch in enumerate(real_prefetch(iterator, sharding, size)):
      if i == batches:
        raise SimulatedCrash()
      yield batch
  monkeypatch.setattr(pipeline, 'prefetch_to_mesh', crashing)
  return lambda: monkeypatch.setattr(pipeline, 'prefetch_to_mesh', real_prefetch)


@needs_cifar10
def test_pretraining_on_a_bucket_saves_there_and_resumes_to_identical_parameters(
    gcs, tmp_path, monkeypatch, small_resnet, caplog):
  monkeypatch.setattr(os, '_exit', _raise_exit)
  config = tiny_config()  # 4 steps, a checkpoint every 2.
  config.model.encoder = small_resnet
  real_writer = metric_writers.create_default_writer
  monkeypatch.setattr(trainer.metric_writers, 'create_default_writer',  # Module docstring.
                      lambda workdir, **kwargs: real_writer(str(tmp_path / 'tensorboard'), **kwargs))
  straight_dir = str(tmp_path / 'straight')
  main.run(config, straight_dir)  # Uninterrupted, on the local disk.

  workdir = f'gs://{BUCKET}/run'
  run = f'{BUCKET}/run'
  restore_prefetch = _crash_after(2, monkeypatch)
  with pytest.raises(SimulatedCrash):
    main.run(config, workdir)
  restore_prefetch()
  assert checkpoint.complete_steps(f'{workdir}/checkpoints') == [2]
  saved = gcs.find(f'{run}/checkpoints/2')
  # The arrays (OCDBT data files, written by tensorstore) and Orbax's commit mark are in the bucket.
  assert any('/ocdbt.process_0/d/' in p for p in saved), saved
  assert f'{run}/checkpoints/2/{checkpoint.COMMIT_FILE}' in saved
  assert not gcs.exists(f'{run}/{distributed.LEASE_FILE}')  # Released by the crash too.
  # What a run killed while saving step 4 leaves: the step's objects, no commit mark.
  gcs.pipe(f'{run}/checkpoints/4/default/manifest.ocdbt', b'half written')

  caplog.set_level(logging.INFO)
  main.run(config, workdir)
  assert 'Resuming from checkpoint step 2 in gs://bkt/run/checkpoints' in caplog.text
  assert checkpoint.complete_steps(f'{workdir}/checkpoints') == [2, 4]
  assert gcs.cat(f'{run}/checkpoints/4/default/manifest.ocdbt') != b'half written'
  assert gcs.exists(f'{run}/config.json') and not gcs.exists(f'{run}/{distributed.LEASE_FILE}')
  assert not os.path.exists('gs:') and not (tmp_path / 'gs:').exists()

  resumed = cli_runs.load_state(workdir, config, devices=jax.devices()[:1])
  assert int(resumed.step) == config.num_steps
  cli_runs.assert_states_equal(
      resumed, cli_runs.load_state(straight_dir, config, devices=jax.devices()[:1]))
