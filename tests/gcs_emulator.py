"""A Cloud Storage emulator on 127.0.0.1 that the run's three GCS clients reach, offline.

A gs:// workdir is read and written by three clients: tensorstore's GCS
driver (Orbax's arrays), TensorFlow's GCS filesystem (etils.epath, which
prefers it, and clu's TensorBoard writer), and google-cloud-storage (Orbax
asks it whether the bucket has a hierarchical namespace before listing
steps). ``Emulator`` starts gcp-storage-emulator (the GCS JSON API, in
memory, in a process of its own on a free port of 127.0.0.1) and sets the
environment that points all three at it:

- tensorstore: TENSORSTORE_GCS_HTTP_URL, its documented test endpoint, and
  GOOGLE_AUTH_TOKEN_FOR_TESTING instead of credentials (tensorstore and
  TensorFlow both take it).
- google-cloud-storage: STORAGE_EMULATOR_HOST (anonymous credentials).
- TensorFlow: its endpoints are compile-time constants
  (``https://www.googleapis.com/storage/v1/``, ``storage.googleapis.com``;
  tsl gcs_file_system.cc), so the only way in is libcurl's own: https_proxy
  names a local proxy that answers CONNECT, speaks TLS with a certificate
  for those hosts signed by a throwaway CA (CURL_CA_BUNDLE, which TensorFlow
  passes to curl), and forwards each request to the emulator.

The test itself looks into the bucket through the emulator's JSON API
(``objects``, ``read``, ``write``), not through the clients under test.
"""

import datetime
import http.client
import http.server
import json
import logging
import os
import socketserver
import ssl
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gcp_storage_emulator.handlers import objects as emulator_objects
from gcp_storage_emulator.server import create_server

GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def _certificate(subject: str, issuer: x509.Name, public_key, signing_key, ca: bool,
                 hosts=()) -> x509.Certificate:
  now = datetime.datetime.now(datetime.timezone.utc)
  builder = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(public_key)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
  if hosts:
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
  return builder.sign(signing_key, hashes.SHA256())


def write_certificates(directory: str) -> tuple[str, str]:
  """A throwaway CA and a certificate (with key) for GOOGLE_HOSTS: (ca.pem, server.pem)."""
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca = _certificate('barlow_jax test CA', x509.Name([
      x509.NameAttribute(NameOID.COMMON_NAME, 'barlow_jax test CA')]), ca_key.public_key(),
                    ca_key, ca=True)
  server = _certificate(GOOGLE_HOSTS[0], ca.subject, key.public_key(), ca_key, ca=False,
                        hosts=GOOGLE_HOSTS)
  pem = serialization.Encoding.PEM
  ca_path, server_path = os.path.join(directory, 'ca.pem'), os.path.join(directory, 'server.pem')
  with open(ca_path, 'wb') as f:
    f.write(ca.public_bytes(pem))
  with open(server_path, 'wb') as f:
    f.write(server.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
  return ca_path, server_path


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
  """The request body, de-chunked: curl's chunked uploads also carry a Content-Length."""
  if (handler.headers.get('Transfer-Encoding') or '').lower() != 'chunked':
    return handler.rfile.read(int(handler.headers.get('Content-Length') or 0))
  body = b''
  while size := int(handler.rfile.readline().strip() or b'0', 16):
    body += handler.rfile.read(size)
    handler.rfile.readline()
  handler.rfile.readline()
  return body


class _SendAll:
  """Unbuffered, whole writes: the interim '100 Continue' curl waits for (1 s) goes out at once."""

  def __init__(self, sock):
    self._sock = sock

  def write(self, data: bytes) -> int:
    self._sock.sendall(data)
    return len(data)

  def flush(self) -> None:
    pass

  closed = False  # socketserver's finish() asks.

  def close(self) -> None:
    pass


def _proxy_handler(tls: ssl.SSLContext, emulator_port: int):
  """Requests handler: CONNECT becomes TLS with ``tls``; each request inside goes to the emulator."""
  emulator_url = f'http://127.0.0.1:{emulator_port}'

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # Keep-alive, as curl expects inside the tunnel.
    disable_nagle_algorithm = True  # Headers and body go in two writes: no 40 ms delayed ACK.

    def log_message(self, *args):
      pass

    def do_CONNECT(self):  # pylint: disable=invalid-name
      self.send_response(200, 'Connection established')
      self.end_headers()
      self.connection = tls.wrap_socket(self.connection, server_side=True)
      self.rfile = self.connection.makefile('rb')
      self.wfile = _SendAll(self.connection)
      self.close_connection = False

    def forward(self):
      body = _read_body(self)
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in ('host', 'transfer-encoding', 'content-length')}
      connection = http.client.HTTPConnection('127.0.0.1', emulator_port, timeout=60)
      try:
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
      finally:
        connection.close()
      self.send_response(response.status, response.reason)
      for name, value in response.getheaders():
        if name.lower() == 'location':  # A resumable upload's URL: back through the tunnel.
          value = value.replace(emulator_url, f'https://{GOOGLE_HOSTS[0]}')
        if name.lower() not in ('content-length', 'transfer-encoding', 'connection'):
          self.send_header(name, value)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)
      self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = forward  # noqa: N815

  return Handler


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True


def _with_generation_header(download):
  """A media download that also sends ``x-goog-generation``, as Cloud Storage does.

  tensorstore reads an object's generation from it (OCDBT writes its manifest
  conditionally on it) and fails with "Malformed StorageGeneration" without;
  gcp-storage-emulator 2026.7.19 leaves it out.
  """
  def wrapped(request, response, storage, *args, **kwargs):
    try:
      response['x-goog-generation'] = storage.get_file_obj(
          request.params['bucket_name'], request.params['object_id'])['generation']
    except Exception:  # pylint: disable=broad-except  # No such object: download answers 404.
      pass
    return download(request, response, storage, *args, **kwargs)
  return wrapped


def _accepting_empty_objects(media_upload):
  """A media upload that accepts an empty body (TensorFlow's ``dir/`` markers); the emulator's fails."""
  def wrapped(request, response, storage):
    if request.data is None:
      request._data = b''  # pylint: disable=protected-access
    return media_upload(request, response, storage)
  return wrapped


def serve(directory: str, bucket: str) -> None:
  """Runs the emulator (its two gaps patched) and the TLS proxy until stdin closes.

  Prints one JSON line first: the emulator's URL, the proxy's URL and the CA
  file. A process of its own: the emulator answers one request at a time,
  and in the test's process it would wait for the GIL behind JAX.
  """
  emulator_objects.download = _with_generation_header(emulator_objects.download)
  emulator_objects._media_upload = _accepting_empty_objects(emulator_objects._media_upload)  # pylint: disable=protected-access
  # The emulator logs each request, and a traceback for each connection a client closed early.
  logging.getLogger('gcp_storage_emulator').disabled = True
  server = create_server('127.0.0.1', 0, in_memory=True, default_bucket=bucket)
  server.start()
  port = server._api._httpd.server_address[1]  # pylint: disable=protected-access
  ca_path, server_path = write_certificates(directory)
  tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  tls.load_cert_chain(server_path)
  proxy = _ThreadingServer(('127.0.0.1', 0), _proxy_handler(tls, port))
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  print(json.dumps({'url': f'http://127.0.0.1:{port}', 'ca': ca_path,
                    'proxy': 'http://127.0.0.1:%d' % proxy.server_address[1]}), flush=True)
  sys.stdin.read()  # Until the test closes it (or ends).
  proxy.shutdown()
  server.stop()


class Emulator:
  """``serve`` in a subprocess, with ``bucket``; the environment that points the clients at it.

  Args:
    bucket: the bucket to create.
    directory: where the CA and the proxy's certificate go.
    patch: a ``pytest.MonkeyPatch`` that sets the environment (module docstring).
  """

  def __init__(self, bucket: str, directory: str, patch):
    self.bucket = bucket
    self._process = subprocess.Popen([sys.executable, __file__, directory, bucket],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    addresses = json.loads(self._process.stdout.readline())
    self.url = addresses['url']
    for name, value in (('TENSORSTORE_GCS_HTTP_URL', self.url), ('STORAGE_EMULATOR_HOST', self.url),
                        ('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'offline'),
                        ('https_proxy', addresses['proxy']), ('CURL_CA_BUNDLE', addresses['ca'])):
      patch.setenv(name, value)

  def close(self) -> None:
    self._process.stdin.close()
    try:
      self._process.wait(10)
    finally:
      if self._process.poll() is None:
        self._process.kill()
        self._process.wait()

  def _get(self, path: str, **query) -> bytes:
    url = f'{self.url}/storage/v1/b/{self.bucket}/o{path}?{urllib.parse.urlencode(query)}'
    with urllib.request.urlopen(url, timeout=30) as response:
      return response.read()

  def objects(self, prefix: str) -> list[str]:
    """Names of the bucket's objects under ``prefix``."""
    return sorted(item['name'] for item in json.loads(self._get('', prefix=prefix)).get('items', []))

  def read(self, name: str) -> bytes:
    return self._get('/' + urllib.parse.quote(name, safe=''), alt='media')

  def write(self, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    request = urllib.request.Request(f'{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}',
                                     data=data, method='POST')
    with urllib.request.urlopen(request, timeout=30):
      pass


if __name__ == '__main__':
  serve(sys.argv[1], sys.argv[2])
