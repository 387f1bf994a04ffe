"""A local Cloud Storage for tests: real ``gs://`` URLs, no network, nothing written outside /tmp.

``local_gcs()`` starts a child process holding an in-memory ``gcp-storage-emulator`` (plain HTTP)
and an HTTPS proxy, creates the bucket, and yields the environment that routes every client to
them. TensorFlow's GCS endpoints are fixed (``https://www.googleapis.com``,
``https://storage.googleapis.com``), so its libcurl reaches them through ``HTTPS_PROXY``: the proxy
answers ``CONNECT *.googleapis.com:443``, terminates TLS with a certificate of a throw-away CA
(trusted through ``CURL_CA_BUNDLE``) and relays the plain HTTP to the emulator. tensorstore (orbax's
array data) and google-cloud-storage (orbax's bucket check) talk to the emulator directly.

    with local_gcs() as gcs:                 # bucket 'dtf-test'
      subprocess.run([...], env=gcs.child_env(), check=True)   # uses gs://dtf-test/...
      assert gcs.object_names('ckpt/') and gcs.read('run/config.json') == b'...'

Give the environment to child processes (``child_env()``), or set it in this process with
``set_env=True`` (restored on exit) before TensorFlow or tensorstore first touch ``gs://``: they
read their cache and retry settings then.
"""

import asyncio
import contextlib
import dataclasses
import functools
import http.server
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from typing import Dict, Iterator, List, Optional, Tuple

_log = logging.getLogger(__name__)
_GOOGLE_SUFFIX = '.googleapis.com'  # TensorFlow's hosts: www. (JSON API), storage. (reads)
_AGENT = 'local-gcs'  # User-Agent of this module's own requests (not recorded)
_UNSET_VARS = ('GOOGLE_APPLICATION_CREDENTIALS', 'ALL_PROXY', 'all_proxy', 'HTTP_PROXY',
               'http_proxy', 'TENSORSTORE_CA_BUNDLE')


def _gcs_env(emulator_port: int, proxy_port: int, ca_file: str, cfg_dir: str) -> Dict[str, str]:
  """The environment that routes TensorFlow's, tensorstore's and google-cloud-storage's clients."""
  proxy = f'http://127.0.0.1:{proxy_port}'
  return {
      # TensorFlow (libcurl): fixed https endpoints, reached through the proxy.
      'HTTPS_PROXY': proxy,
      'https_proxy': proxy,
      'NO_PROXY': '127.0.0.1,localhost',
      'no_proxy': '127.0.0.1,localhost',
      'CURL_CA_BUNDLE': ca_file,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'local-gcs-fake-token',  # TensorFlow and tensorstore
      'NO_GCE_CHECK': 'true',
      'GCE_METADATA_HOST': '127.0.0.1:9',  # never probe a real metadata server
      'GCE_METADATA_ROOT': '127.0.0.1:9',
      'CLOUDSDK_CONFIG': cfg_dir,  # ignore any real gcloud credentials
      # No caching in TensorFlow's GCS filesystem: every write is seen at once.
      'GCS_STAT_CACHE_MAX_AGE': '0',
      'GCS_MATCHING_PATHS_CACHE_MAX_AGE': '0',
      'GCS_READ_CACHE_MAX_SIZE_MB': '0',
      # Fail in about a second instead of minutes of exponential backoff.
      'GCS_RETRY_CONFIG_MAX_RETRIES': '2',
      'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '10000',
      'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '100000',
      # tensorstore: plain HTTP straight to the emulator.
      'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{emulator_port}',
      # google-cloud-storage: direct, anonymous credentials.
      'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{emulator_port}',
  }


# The emulator, fixed. Mixins and wrappers only: the emulator is imported in the child process.


class _RequestMixin:
  """Absolute URLs (resumable-upload ``Location``, ``mediaLink``) over https for googleapis hosts.

  The emulator builds them from ``http://<Host>``; behind the proxy the client must come back over
  https, i.e. through the proxy again.
  """

  def __init__(self, request_handler, method):
    super().__init__(request_handler, method)
    host = request_handler.headers.get('Host') or ''
    if host.split(':')[0].endswith(_GOOGLE_SUFFIX):
      self._base_url = 'https://' + host
      self._full_url = self._base_url + self._path
      self._parsed_url = urllib.parse.urlparse(self._full_url)


class _HandlerMixin:
  """HTTP/1.1, one request per connection, a request log and ``/_local_gcs/`` introspection.

  HTTP/1.1 makes ``Expect: 100-continue`` get its 100 at once (libcurl otherwise waits about 1 s
  per upload); ``Connection: close`` because the emulator does not always drain request bodies.
  """

  protocol_version = 'HTTP/1.1'
  timeout = 120  # one stuck client must not wedge the single-threaded server
  recorded: List[Tuple[str, str, str, str]] = []  # replaced per server

  def do_GET(self):
    if self.path.startswith('/_local_gcs/'):
      return self._control()
    return super().do_GET()

  def _control(self):
    """``/_local_gcs/requests``, ``/_local_gcs/objects/<bucket>``."""
    if self.path == '/_local_gcs/requests':
      body = self.recorded
    elif self.path.startswith('/_local_gcs/objects/'):
      body = sorted(self.storage.objects.get(self.path.rsplit('/', 1)[1], {}))
    else:
      return self.send_error(404)
    data = json.dumps(body).encode()
    self.send_response(200)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def parse_request(self):
    ok = super().parse_request()
    if ok and 'chunked' in (self.headers.get('Transfer-Encoding') or '').lower():
      # TensorFlow's resumable-upload PUT sends both; chunked wins (RFC 9112 6.3), but the
      # emulator reads Content-Length first and would store the raw chunk framing.
      del self.headers['Content-Length']
    agent = ok and (self.headers.get('User-Agent') or '-').split('/')[0].split()[0]
    if ok and agent != _AGENT and not self.path.startswith('/_local_gcs/'):
      host = (self.headers.get('Host') or '').split(':')[0]
      via = 'proxy' if host.endswith(_GOOGLE_SUFFIX) else 'direct'
      self.recorded.append((via, self.command, self.path, agent))
    return ok

  def end_headers(self):
    self.send_header('Connection', 'close')
    super().end_headers()

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    _log.debug(format, *args)


def _query(request, key):
  values = request.query.get(key)
  return values[0] if values else None


def _generation(request, storage, name):
  obj = storage.objects.get(request.params['bucket_name'], {}).get(name) if name else None
  return None if obj is None else str(obj['generation'])


def _precondition_failed(response, not_modified=False):
  if not_modified:
    response.status = HTTPStatus.NOT_MODIFIED
  else:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})


def _with_preconditions(handler, *, name_from_query=False):
  """Adds ``ifGenerationMatch`` / ``ifGenerationNotMatch``, empty media uploads, suffix ranges and
  the ``x-goog-generation`` / ``x-goog-metageneration`` headers tensorstore stamps reads with."""

  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    name = _query(request, 'name') if name_from_query else request.params.get('object_id')
    gen = _generation(request, storage, name)
    match, not_match = _query(request, 'ifGenerationMatch'), _query(request, 'ifGenerationNotMatch')
    if match is not None and (gen or '0') != match:  # 0: must not exist yet
      return _precondition_failed(response)
    if not_match is not None and gen is not None and gen == not_match:
      return _precondition_failed(response, not_modified=request.method == 'GET')
    if name_from_query and _query(request, 'uploadType') == 'media' and request.data is None:
      request._data = b''  # empty object (a directory marker): the emulator would do len(None)
    suffix = re.fullmatch(r'\s*bytes=-(\d+)\s*', request.get_header('Range') or '')
    if suffix and gen is not None:
      # 'The last N bytes': the emulator would return the whole object with 200.
      size = int(storage.objects[request.params['bucket_name']][name]['size'])
      headers = request._request_handler.headers
      del headers['Range']
      headers['Range'] = f'bytes={max(0, size - int(suffix[1]))}-'
    result = handler(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT) and name:
      obj = storage.objects.get(request.params['bucket_name'], {}).get(name)
      if obj is not None:
        response['x-goog-generation'] = str(obj['generation'])
        response['x-goog-metageneration'] = str(obj.get('metageneration', 1))
    return result

  return wrapped


def _with_list_offsets(handler):
  """objects.list honouring ``startOffset`` / ``endOffset``: tensorstore lists key ranges with
  them, and a name outside the range makes it abort the process."""

  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    result = handler(request, response, storage, *args, **kwargs)
    start, end = _query(request, 'startOffset'), _query(request, 'endOffset')
    if response.status == HTTPStatus.OK and (start or end):
      def keep(name):
        return (not start or name >= start) and (not end or name < end)

      body = json.loads(response._content)
      body['items'] = [o for o in body.get('items') or [] if keep(o['name'])]
      body['prefixes'] = [p for p in body.get('prefixes') or [] if keep(p)]
      response.json(body)
    return result

  return wrapped


# Throw-away CA and server certificate; the HTTPS proxy.


def _make_certs(workdir: str) -> Tuple[str, str, str]:
  """Returns the paths of the CA certificate, the server certificate and its key."""
  openssl = shutil.which('openssl') or '/usr/bin/openssl'
  ca_key, ca_crt = f'{workdir}/ca.key', f'{workdir}/ca.pem'
  key, csr, crt, ext = (f'{workdir}/srv.{s}' for s in ('key', 'csr', 'pem', 'ext'))
  ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']

  def run(*args):
    subprocess.run([openssl, *args], check=True, capture_output=True)

  run('req', '-x509', *ec, '-keyout', ca_key, '-out', ca_crt, '-days', '2',
      '-subj', '/CN=local-gcs test CA', '-addext', 'basicConstraints=critical,CA:TRUE',
      '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
  run('req', *ec, '-keyout', key, '-out', csr, '-subj', '/CN=www.googleapis.com')
  with open(ext, 'w') as f:
    f.write('basicConstraints=CA:FALSE\n'
            'keyUsage=critical,digitalSignature,keyEncipherment\n'
            'extendedKeyUsage=serverAuth\n'
            'subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com,'
            'DNS:*.googleapis.com\n')
  run('x509', '-req', '-in', csr, '-CA', ca_crt, '-CAkey', ca_key, '-CAcreateserial',
      '-out', crt, '-days', '2', '-extfile', ext)
  return ca_crt, crt, key


class _TlsProxy:
  """Answers ``CONNECT *.googleapis.com:443``, terminates TLS and relays to the emulator."""

  def __init__(self, upstream_port: int, cert: str, key: str):
    self.upstream_port = upstream_port
    self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    self.ctx.load_cert_chain(cert, key)
    self.ctx.set_alpn_protocols(['http/1.1'])
    self.port = None
    self._loop = asyncio.new_event_loop()
    self._ready = threading.Event()
    self._thread = threading.Thread(target=self._run, name='local-gcs-proxy', daemon=True)

  def start(self) -> None:
    self._thread.start()
    if not self._ready.wait(10) or self.port is None:
      raise RuntimeError('HTTPS proxy did not start')

  def stop(self) -> None:
    async def shutdown():
      tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      self._loop.stop()

    asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
    self._thread.join(5)

  def _run(self) -> None:
    asyncio.set_event_loop(self._loop)
    srv = self._loop.run_until_complete(asyncio.start_server(self._on_client, '127.0.0.1', 0))
    self.port = srv.sockets[0].getsockname()[1]
    self._ready.set()
    try:
      self._loop.run_forever()
    finally:
      srv.close()
      self._loop.run_until_complete(srv.wait_closed())
      self._loop.close()

  async def _on_client(self, reader, writer) -> None:
    try:
      head = await reader.readuntil(b'\r\n\r\n')
      method, target, _ = head.split(b'\r\n', 1)[0].decode().split(' ', 2)
      if method != 'CONNECT' or not target.rsplit(':', 1)[0].endswith(_GOOGLE_SUFFIX):
        writer.write(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
        await writer.drain()
        return
      writer.write(b'HTTP/1.1 200 Connection established\r\n\r\n')
      await writer.drain()
      await writer.start_tls(self.ctx)
      up_reader, up_writer = await asyncio.open_connection('127.0.0.1', self.upstream_port)
      await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as e:
      _log.debug('proxy connection ended: %r', e)
    finally:
      with contextlib.suppress(Exception):
        writer.close()

  @staticmethod
  async def _pipe(src, dst) -> None:
    try:
      while data := await src.read(1 << 16):
        dst.write(data)
        await dst.drain()
    except (ConnectionError, ssl.SSLError):
      pass
    finally:
      # The emulator closes after each response: close the client side too (and vice versa);
      # libcurl reconnects through a fresh CONNECT.
      with contextlib.suppress(Exception):
        dst.close()


def _serve(bucket: str, cert: str, key: str) -> None:
  """The child process: emulator and proxy until stdin closes (the parent ended or died).

  Not threads of the test process: TensorFlow holds the GIL during some HTTP calls (the
  ``tf.io.TFRecordWriter`` constructor opens its upload), which would deadlock them.
  """
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import buckets, objects
  from gcp_storage_emulator.storage import Storage
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # every 404 is an ERROR
  server.Request = type('Request', (_RequestMixin, server.Request), {})  # used by Router.handle
  fixed = {objects.get: _with_preconditions(objects.get),  # also alt=media
           objects.download: _with_preconditions(objects.download),  # storage.googleapis.com
           objects.delete: _with_preconditions(objects.delete),
           objects.insert: _with_preconditions(objects.insert, name_from_query=True),
           objects.ls: _with_list_offsets(objects.ls)}
  server.HANDLERS = tuple((regex, {m: fixed.get(h, h) for m, h in methods.items()})
                          for regex, methods in server.HANDLERS)
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  handler = type('Handler', (_HandlerMixin, server.RequestHandler), {'recorded': []})
  httpd = http.server.HTTPServer(('127.0.0.1', 0), functools.partial(handler, storage))
  thread = threading.Thread(target=httpd.serve_forever, name='local-gcs-emulator', daemon=True)
  thread.start()
  proxy = _TlsProxy(httpd.server_address[1], cert, key)
  proxy.start()
  print(json.dumps({'emulator_port': httpd.server_address[1], 'proxy_port': proxy.port}),
        flush=True)
  sys.stdin.read()
  proxy.stop()
  httpd.shutdown()
  httpd.server_close()
  thread.join(5)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


@dataclasses.dataclass
class LocalGcs:
  """A running local Cloud Storage with one bucket."""
  bucket: str
  url: str  # gs://<bucket>
  env: Dict[str, str]  # what routes the clients here; see child_env()
  startup_s: float

  def child_env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``base`` (default ``os.environ``) with real credentials and other proxies removed, and
    ``env`` applied: the environment for a child process that uses ``gs://``."""
    merged = dict(base or os.environ)
    for k in _UNSET_VARS:
      merged.pop(k, None)
    merged.update(self.env)
    return merged

  def _open(self, path: str, data: Optional[bytes] = None):
    req = urllib.request.Request(self.env['STORAGE_EMULATOR_HOST'] + path, data=data,
                                 headers={'User-Agent': _AGENT})
    if data is not None:
      req.add_header('Content-Type', 'application/octet-stream')
    return _DIRECT.open(req, timeout=30)

  def requests(self) -> List[Tuple[str, str, str, str]]:
    """(via, method, path, user agent) of every request so far (not this object's own): via is
    'proxy' (TensorFlow, through the HTTPS proxy) or 'direct' (tensorstore, google-cloud-storage).
    """
    with self._open('/_local_gcs/requests') as r:
      return [tuple(x) for x in json.load(r)]

  def object_names(self, prefix: str = '') -> List[str]:
    """The sorted names of the bucket's objects that start with ``prefix``."""
    with self._open(f'/_local_gcs/objects/{self.bucket}') as r:
      return [n for n in json.load(r) if n.startswith(prefix)]

  def read(self, name: str) -> bytes:
    """The content of object ``name``; FileNotFoundError if there is none."""
    try:
      with self._open(f'/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe="")}'
                      '?alt=media') as r:
        return r.read()
    except urllib.error.HTTPError as e:
      if e.code == 404:
        raise FileNotFoundError(f'{self.url}/{name}') from e
      raise

  def upload(self, name: str, data: bytes) -> None:
    """Writes ``data`` as object ``name``."""
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    self._open(f'/upload/storage/v1/b/{self.bucket}/o?{query}', bytes(data)).close()

  def upload_dir(self, local_dir: str, prefix: str) -> int:
    """Uploads every file under ``local_dir`` to ``prefix/<relative path>``; returns the count."""
    count = 0
    for root, _, files in os.walk(local_dir):
      for f in sorted(files):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, local_dir).replace(os.sep, '/')
        with open(path, 'rb') as fh:
          self.upload(f'{prefix.rstrip("/")}/{rel}' if prefix.strip('/') else rel, fh.read())
        count += 1
    return count


@contextlib.contextmanager
def local_gcs(bucket: str = 'dtf-test', *, set_env: bool = False) -> Iterator[LocalGcs]:
  """Starts the emulator and the proxy (a child process) with ``bucket`` and yields them.

  With ``set_env`` this process's environment is changed as ``child_env()`` would, until exit.
  On exit the child stops and its temporary folder (certificates) is removed.
  """
  t0 = time.perf_counter()
  workdir = tempfile.mkdtemp(prefix='local-gcs-')
  saved = {}
  child = None
  try:
    ca, crt, key = _make_certs(workdir)
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), bucket, crt, key],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=workdir)
    line = child.stdout.readline()
    if not line:
      raise RuntimeError(f'local Cloud Storage failed to start (exit code {child.wait()})')
    ports = json.loads(line)
    cfg_dir = os.path.join(workdir, 'gcloud')
    os.makedirs(cfg_dir)
    gcs = LocalGcs(bucket=bucket, url=f'gs://{bucket}',
                   env=_gcs_env(ports['emulator_port'], ports['proxy_port'], ca, cfg_dir),
                   startup_s=0.0)
    if set_env:
      saved = {k: os.environ.get(k) for k in (*gcs.env, *_UNSET_VARS)}
      for k in _UNSET_VARS:
        os.environ.pop(k, None)
      os.environ.update(gcs.env)
    gcs.startup_s = time.perf_counter() - t0
    yield gcs
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    if child is not None:
      with contextlib.suppress(Exception):
        child.stdin.close()
      try:
        child.wait(10)
      except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  if len(sys.argv) != 4:
    sys.exit(f'usage: {sys.argv[0]} BUCKET CERT KEY (started by local_gcs())')
  _serve(*sys.argv[1:])
