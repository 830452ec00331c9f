"""Downloading a TFDS dataset that is missing: fail fast offline, leave the data dir as it was.

TFDS retries a failed connection 10 times with exponential backoff and no
timeout (about 200 s offline, longer where connections hang) and then raises
a raw ``requests`` error, leaving empty ``downloads/`` and dataset directories
behind. ``prepare`` first probes every download host (or the proxy to it)
with a short TCP connect, and raises ``DatasetDownloadError`` (exit status 2)
before anything is written if one is unreachable; if the download fails
anyway, it removes what the attempt added to the data dir, and nothing else.
"""

import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.parse

from absl import logging
from etils import epath
import requests  # What TFDS downloads with.
import tensorflow_datasets as tfds

from barlow_jax.errors import DatasetDownloadError

# Connect timeout of the reachability probe; name resolution plus connect get
# twice this in all. A TCP handshake with a reachable host takes well under 1 s.
_PROBE_TIMEOUT_S = 5.0
_DEFAULT_PORTS = {'http': 80, 'https': 443, 'ftp': 21, 'socks4': 1080, 'socks4a': 1080,
                  'socks5': 1080, 'socks5h': 1080}


def _download_endpoints(builder) -> dict[tuple[str, int], str]:
  """(host, port) TFDS will first connect to -> the URL it is for.

  That is the URL's host, or the proxy ``requests`` takes from the
  environment (HTTPS_PROXY, ALL_PROXY, ... and NO_PROXY). Empty when the
  builder lists no http(s)/ftp URLs or its data comes from a manual dir.
  """
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    return {}
  endpoints = {}
  for url in sorted(builder.url_infos or {}):
    target = url
    if urllib.parse.urlsplit(url).scheme in ('http', 'https', 'ftp'):
      proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
      if proxy:
        target = proxy if '://' in proxy else 'http://' + proxy
    parts = urllib.parse.urlsplit(target)
    if parts.scheme in _DEFAULT_PORTS and parts.hostname:
      endpoints.setdefault((parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme]),
                           url if target == url else f'{url} via proxy {target}')
  return endpoints


def _unreachable(endpoints) -> dict[tuple[str, int], str]:
  """The (host, port)s a TCP connection to fails within the probe's time, with the reason."""
  outcome = {}

  def connect(endpoint):
    try:
      socket.create_connection(endpoint, timeout=_PROBE_TIMEOUT_S).close()
      outcome[endpoint] = None
    except OSError as e:
      outcome[endpoint] = str(e) or type(e).__name__

  # Threads bound name resolution too, which has no timeout of its own; one
  # that hangs is left behind (daemon) and counts as unreachable.
  threads = [threading.Thread(target=connect, args=(e,), daemon=True, name=f'probe {e}')
             for e in endpoints]
  deadline = time.monotonic() + 2 * _PROBE_TIMEOUT_S
  for t in threads:
    t.start()
  for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
  late = f'no answer within {2 * _PROBE_TIMEOUT_S:g} s'
  return {e: outcome.get(e, late) for e in endpoints if outcome.get(e, late) is not None}


def _how_to_get_it(name: str) -> str:
  return (f'To run offline, point config.data_dir at a TFDS data dir that already holds {name!r} '
          f'(--config.data_dir=/path/to/tfds, or set TFDS_DATA_DIR and leave config.data_dir '
          f'unset), e.g. one prepared with tfds.builder({name!r}, data_dir=...)'
          '.download_and_prepare() on a machine with network; or rerun where the download host '
          'is reachable (a proxy in HTTPS_PROXY/HTTP_PROXY is honoured). '
          'With --config.download=False a dataset missing from the data dir is an immediate '
          'error and nothing is downloaded.')


def _check_download_reachable(builder, name: str) -> None:
  """Raises DatasetDownloadError, having written nothing, if a download host is unreachable.

  TFDS itself would retry a failed connection 10 times with exponential backoff
  (about 200 s offline, longer if connections hang) before a raw traceback.
  """
  endpoints = _download_endpoints(builder)
  failed = [f'{host}:{port} ({why}) for {endpoints[host, port]}'
            for (host, port), why in sorted(_unreachable(endpoints).items())]
  if failed:
    raise DatasetDownloadError(
        f'Dataset {name!r} is not prepared in data_dir={os.fspath(builder.data_dir_root)!r} '
        f'and config.download=True, but its download host is unreachable: {"; ".join(failed)}. '
        f'Nothing was downloaded or written. {_how_to_get_it(name)}')


def _watched_dirs(builder) -> list[epath.Path]:
  """The data dir and every directory under it that download_and_prepare writes into.

  Each one's parent is in the list too (but for the data dir's), so any new
  file or directory the attempt makes is a new entry of a listed directory
  that existed before.
  """
  root = epath.Path(builder.data_dir_root)
  downloads = root / 'downloads'  # TFDS's default download_dir; get_builder passes none.
  dirs = [root, downloads, downloads / 'extracted', downloads / 'manual',
          downloads / builder.name]
  rel = epath.Path(builder.data_path).relative_to(root)
  dirs += [root.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts) + 1)]
  return dirs


@contextlib.contextmanager
def _undo_on_failure(builder):
  """Removes, if the body raises, what it added to the data dir, and nothing else.

  A failed download_and_prepare leaves empty dataset and download directories
  (and incomplete.* ones if killed); entries that were there before are kept.
  """
  root = epath.Path(builder.data_dir_root)
  root_existed = root.exists()
  before = {d: {p.name for p in d.iterdir()} for d in _watched_dirs(builder) if d.is_dir()}
  try:
    yield
  except BaseException:
    try:
      if not root_existed:
        if root.exists():
          root.rmtree()
      else:
        for d, names in before.items():  # Parents first: a removed dir is not revisited.
          if d.is_dir():
            for p in d.iterdir():
              if p.name in names:
                continue
              if p.is_dir():
                p.rmtree()
              else:
                p.unlink()
    except OSError as cleanup_error:
      logging.warning('Could not remove what the failed download added to %s: %s',
                      os.fspath(root), cleanup_error)
    raise


def _network_errors() -> tuple[type[BaseException], ...]:
  return (requests.exceptions.RequestException, urllib.error.URLError, tfds.download.DownloadError,
          ConnectionError, TimeoutError, socket.gaierror)


def prepare(builder, name: str) -> None:
  """``builder.download_and_prepare()``, failing fast and cleanly without network.

  Raises:
    DatasetDownloadError: a download host is unreachable (nothing written), or
      the download failed (what it had written is removed).
  """
  _check_download_reachable(builder, name)
  try:
    with _undo_on_failure(builder):
      builder.download_and_prepare()
  except _network_errors() as e:
    raise DatasetDownloadError(
        f'Downloading dataset {name!r} into data_dir={os.fspath(builder.data_dir_root)!r} '
        f'failed: {type(e).__name__}: {e}. What the attempt had written was removed. '
        f'{_how_to_get_it(name)}') from e
