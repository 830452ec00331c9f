"""config.download=True without network: a quick, clear error and an untouched data dir.

No test reaches the network: sockets are blocked in-process (name resolution
and connect), or the download goes through a "proxy" on a closed local port.
"""

import errno
import os
import socket
import threading
import time

import pytest

from barlow_jax import errors
from barlow_jax.data import datasets
from barlow_jax.data import download
from conftest import DATA_DIR, cifar10_split_sizes, needs_cifar10

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
TIME_LIMIT_S = 30.0


def _tree(path):
  """Every file and directory under path, relative to it."""
  return sorted(os.path.relpath(os.path.join(root, name), path)
                for root, dirs, files in os.walk(path) for name in dirs + files)


def _no_proxies(monkeypatch):
  for var in ('HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'FTP_PROXY', 'NO_PROXY'):
    monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(var.lower(), raising=False)


def _block_network(monkeypatch, how='connect'):
  """Blocks sockets in this process; returns the list of attempted (host, port)s.

  how='dns': name resolution fails; 'connect': names resolve (to a TEST-NET
  address, without asking DNS) but connecting fails with ENETUNREACH.
  """
  attempts = []
  real_getaddrinfo = socket.getaddrinfo

  def getaddrinfo(host, port, *args, **kwargs):
    if host in ('localhost', '127.0.0.1', '::1'):
      return real_getaddrinfo(host, port, *args, **kwargs)
    attempts.append((host, port))
    if how == 'dns':
      raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known (blocked by test)')
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, '', ('192.0.2.1', port))]

  def refuse(*args, **kwargs):
    attempts.append(args[-1] if args else kwargs)
    raise OSError(errno.ENETUNREACH, 'Network is unreachable (blocked by test)')

  _no_proxies(monkeypatch)
  monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket.socket, 'connect_ex', refuse)
  return attempts


def _closed_local_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]  # Nothing listens once it is closed.


def _assert_fails_fast_and_clean(data_dir, before, *expected_in_message):
  start = time.monotonic()
  with pytest.raises(errors.DatasetNotFoundError) as info:
    datasets.get_builder('cifar10', str(data_dir), download=True)
  elapsed = time.monotonic() - start
  message = str(info.value)
  print(f'\nfailed in {elapsed:.2f} s with {type(info.value).__name__}: {message}')
  assert elapsed < TIME_LIMIT_S
  assert isinstance(info.value, errors.DatasetDownloadError)
  for text in (str(data_dir), 'data_dir', '--config.data_dir=', 'TFDS_DATA_DIR',
               '--config.download=False', 'cifar10') + expected_in_message:
    assert text in message
  assert _tree(data_dir) == before
  return message


@pytest.mark.parametrize('how', ['connect', 'dns'])
def test_no_network_fails_fast_and_leaves_empty_data_dir_empty(tmp_path, monkeypatch, how):
  attempts = _block_network(monkeypatch, how)
  _assert_fails_fast_and_clean(tmp_path, [], 'www.cs.toronto.edu:443', CIFAR10_URL)
  assert attempts  # The probe did try.


def test_no_network_keeps_what_was_in_the_data_dir(tmp_path, monkeypatch):
  _block_network(monkeypatch)
  (tmp_path / 'downloads' / 'manual').mkdir(parents=True)
  (tmp_path / 'downloads' / 'manual' / 'mine.tar').write_bytes(b'x')
  (tmp_path / 'cifar10' / '3.0.1').mkdir(parents=True)
  (tmp_path / 'notes.txt').write_text('keep me')
  before = _tree(tmp_path)
  _assert_fails_fast_and_clean(tmp_path, before)


def test_missing_data_dir_is_not_created(tmp_path, monkeypatch):
  _block_network(monkeypatch)
  data_dir = tmp_path / 'tfds'
  with pytest.raises(errors.DatasetDownloadError, match='data_dir'):
    datasets.get_builder('cifar10', str(data_dir), download=True)
  assert not data_dir.exists()


def test_unreachable_proxy_fails_fast(tmp_path, monkeypatch):
  """The probe goes where requests would: to the proxy from the environment."""
  _no_proxies(monkeypatch)
  port = _closed_local_port()
  monkeypatch.setenv('HTTPS_PROXY', f'http://127.0.0.1:{port}')
  _assert_fails_fast_and_clean(tmp_path, [], f'127.0.0.1:{port}', 'via proxy')


def test_reachable_proxy_passes_the_probe(monkeypatch):
  """With a reachable host (here a local listener as the proxy) the probe lets TFDS download."""
  _no_proxies(monkeypatch)
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    monkeypatch.setenv('HTTPS_PROXY', f'127.0.0.1:{server.getsockname()[1]}')
    builder = download.tfds.builder('cifar10', data_dir='/nonexistent/tfds')
    endpoints = download._download_endpoints(builder)
    assert list(endpoints) == [('127.0.0.1', server.getsockname()[1])]
    assert download._unreachable(endpoints) == {}
    monkeypatch.setenv('NO_PROXY', 'www.cs.toronto.edu')  # Bypassed: the URL's own host.
    assert list(download._download_endpoints(builder)) == [('www.cs.toronto.edu', 443)]


def test_hanging_name_resolution_is_bounded(monkeypatch):
  """A resolver that never answers (no timeout of its own) counts as unreachable."""
  release = threading.Event()
  monkeypatch.setattr(download, '_PROBE_TIMEOUT_S', 0.2)
  monkeypatch.setattr(socket, 'getaddrinfo', lambda *a, **k: release.wait(30) and [])
  try:
    start = time.monotonic()
    failed = download._unreachable({('example.invalid', 443): CIFAR10_URL})
    assert time.monotonic() - start < 1.0
    assert failed == {('example.invalid', 443): 'no answer within 0.4 s'}
  finally:
    release.set()


def test_failed_download_after_the_probe_is_cleaned_up(tmp_path, monkeypatch):
  """If the probe passes but TFDS's download fails, what TFDS wrote is removed."""
  from tensorflow_datasets.core.download import downloader
  _block_network(monkeypatch)
  monkeypatch.setattr(download, '_unreachable', lambda endpoints: {})
  monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)  # TFDS's backoff would take ~200 s.
  (tmp_path / 'downloads').mkdir()
  (tmp_path / 'downloads' / 'old.INFO.json').write_text('{}')
  before = _tree(tmp_path)
  message = _assert_fails_fast_and_clean(tmp_path, before, 'ConnectionError', 'removed')
  assert 'www.cs.toronto.edu' in message


@needs_cifar10
def test_prepared_dataset_loads_with_download_on_without_network(monkeypatch):
  attempts = _block_network(monkeypatch)
  builder = datasets.get_builder('cifar10', DATA_DIR, download=True)
  assert builder.info.splits['test'].num_examples == cifar10_split_sizes()['test'] > 0
  assert attempts == []
