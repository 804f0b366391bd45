"""Storage that stops answering (issue 20): a gs:// run whose bucket stalls mid-run ends with one
`error:` line naming the operation and the path, within `checkpoint.storage_timeout_s`, and the
checkpoints finalized before the stall still resume. The stall is a TCP proxy in front of the local
GCS emulator (tests/gcs.py) that, once told to, accepts and reads but never answers."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests import multiprocess
from tests.cli import ROOT, TINY, assert_one_error, cli_env
from tests.gcs import gcs_emulator  # noqa: F401  (the `gcs` fixture)

STEPS = 40
TIMEOUT_S = 3


class StallingProxy:
  """Forwards TCP connections to `port` until `stall()`; then it still accepts connections and reads
  what is sent (on new and existing ones) but sends nothing back and closes nothing: a storage
  server that stopped answering, as far as any client can tell."""

  def __init__(self, port: int):
    self.target = ("127.0.0.1", port)
    self.server = socket.create_server(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
    self.stalled = threading.Event()
    self.sockets = [self.server]
    threading.Thread(target=self._accept, daemon=True).start()

  def stall(self):
    self.stalled.set()

  def close(self):
    for s in self.sockets:
      s.close()

  def _accept(self):
    while True:
      try:
        client, _ = self.server.accept()
      except OSError:
        return
      upstream = None if self.stalled.is_set() else socket.create_connection(self.target)
      self.sockets += [client] + ([upstream] if upstream else [])
      threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
      if upstream is not None:
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

  def _pump(self, src: socket.socket, dst: socket.socket | None):
    while True:
      try:
        data = src.recv(1 << 16)
      except OSError:
        return
      if not data:
        break
      if dst is not None and not self.stalled.is_set():
        try:
          dst.sendall(data)
        except OSError:
          return
    if dst is not None and not self.stalled.is_set():  # a stalled server does not even hang up
      try:
        dst.shutdown(socket.SHUT_WR)
      except OSError:
        pass


def train_command(workdir: str, *extra: str) -> list[str]:
  """tests/cli.py's tiny run for STEPS steps, a checkpoint every step, storage bounded by TIMEOUT_S."""
  return [sys.executable, "-m", "gemma2_jax.train", f"--workdir={workdir}", *TINY,
          f"--config.train.steps={STEPS}", f"--config.checkpoint.storage_timeout_s={TIMEOUT_S}", *extra]


def committed(gcs, run: str) -> list[int]:
  """The finalized checkpoint steps in the bucket (GCS: a step directory with commit_success.txt)."""
  parts = [n.split("/") for n in gcs.list(f"{run}/checkpoints/")]  # stall_run/checkpoints/<step>/...
  return sorted(int(p[2]) for p in parts if p[3:] == ["commit_success.txt"])


def test_stalled_bucket_ends_the_run_with_one_line_and_it_resumes(gcs):
  """The bucket stops answering right after the first checkpoint is finalized: the run stops within
  about TIMEOUT_S with one line naming what it was doing where (exit 1, no traceback); the re-run
  against a working bucket resumes from the newest finalized checkpoint."""
  run = gcs.path("stall_run")
  proxy = StallingProxy(int(gcs.url.rsplit(":", 1)[1]))
  env = cli_env() | {k: v.replace(gcs.url, proxy.url) for k, v in gcs.env.items()}
  began = time.monotonic()
  proc = subprocess.Popen(train_command(run), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    while not committed(gcs, run):  # polled on the emulator itself, not through the proxy
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.monotonic() - began < 60, "no checkpoint was finalized"
      time.sleep(0.05)
    proxy.stall()
    stalled_at = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
  finally:
    proc.kill()
    proxy.close()
  stopped_after = time.monotonic() - stalled_at
  line = assert_one_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr),
                          f"storage did not answer within {TIMEOUT_S} s while ",
                          f" at gs://{gcs.bucket}/stall_run/", "checkpoint.storage_timeout_s")
  assert stopped_after < TIMEOUT_S + 15, (stopped_after, line)
  done = committed(gcs, run)
  assert done and done[-1] < STEPS, (done, line)

  # The bucket answers again: the same command resumes from the newest finalized step.
  r = subprocess.run(train_command(run, "--config.checkpoint.save_every=0"), cwd=ROOT,
                     env=cli_env() | gcs.env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(gcs.read(f"{run}/summary.json"))["start_step"] == done[-1]
  assert STEPS in committed(gcs, run)


@pytest.mark.slow
def test_stalled_bucket_stops_every_process_of_a_job(gcs):
  """Two processes (--coordinator_address: each a supervised child): every one exits non-zero with
  one last `error:` line, its own storage timeout or its peer's, published through the job."""
  run = gcs.path("stall_job")
  proxy = StallingProxy(int(gcs.url.rsplit(":", 1)[1]))
  env = {k: v.replace(gcs.url, proxy.url) for k, v in gcs.env.items()}
  began = time.monotonic()
  procs = multiprocess.launch(train_command(run), 2, extra_env=env)
  try:
    while not committed(gcs, run):
      assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
      assert time.monotonic() - began < 120, "no checkpoint was finalized"
      time.sleep(0.05)
    proxy.stall()
    results = multiprocess.wait(procs, timeout=60)
  finally:
    proxy.close()
  from gemma2_jax.parallel.distributed import EXIT_LOST

  for rc, out, err in results:
    line = assert_one_error(subprocess.CompletedProcess([], rc, out, err), rc=rc)
    assert rc in (1, EXIT_LOST) and "storage did not answer within" in line, line


DEADLINE_SCRIPT = textwrap.dedent("""
  import time
  from gemma2_jax.parallel.deadline import bounded, deadline, watch

  with deadline("reading a file in time", "gs://b/fast", seconds=0.3):
    time.sleep(0.05)
  assert list(bounded(iter([1, 2]), "reading items", "gs://b/items")) == [1, 2]
  flag = []
  watch("finishing in the background", "gs://b/bg", lambda: bool(flag), seconds=0.6)
  flag.append(1)
  time.sleep(1.0)  # past every bound above: none of them may fire
  print("in time", flush=True)
  watch("writing metrics.jsonl", "gs://b/run/metrics.jsonl", lambda: False, seconds=0.7)  # expires 2nd
  with deadline("finalizing checkpoint step 3", "gs://b/run/checkpoints/3", seconds=0.5):
    time.sleep(30)  # a call that never returns
  print("unreachable", flush=True)
""")


def test_deadline_fires_once_with_one_line_and_exits():
  """Bounds that are kept never fire; the first one broken ends the process (exit 1) with its one
  line, though a second one expires too."""
  start = time.monotonic()
  r = subprocess.run([sys.executable, "-c", DEADLINE_SCRIPT], cwd=ROOT, env=cli_env(),
                     capture_output=True, text=True, timeout=60)
  assert r.stdout.split() == ["in", "time"], (r.stdout, r.stderr[-2000:])
  line = assert_one_error(r, "storage did not answer within 0.5 s while finalizing checkpoint step 3 "
                             "at gs://b/run/checkpoints/3;")
  assert re.search(r"raise checkpoint\.storage_timeout_s", line)
  assert time.monotonic() - start < 20
