"""Run outputs beside the checkpoints: metrics.jsonl, TensorBoard events and JSON files such as
summary.json, in a local or a gs:// workdir."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import jax

from gemma2_jax.parallel.deadline import deadline
from gemma2_jax.paths import as_path, is_remote

log = logging.getLogger(__name__)


def write_json(path: str | os.PathLike, obj) -> None:
  """Writes `obj` as indented JSON to a local or remote path (one whole-object write on GCS)."""
  path = as_path(path)
  with deadline(f"writing {path.name}", path):
    path.parent.mkdir(parents=True, exist_ok=True)  # a no-op in a bucket
    path.write_text(json.dumps(obj, indent=2) + "\n")


class MetricsWriter:
  """metrics.jsonl (one JSON row per write) + TensorBoard event files in the workdir (process 0 only).

  A local workdir is appended to directly. Objects in a bucket cannot be appended to, so for a
  remote workdir both files are written to a local staging directory (metrics.jsonl starting with
  the rows already in the workdir, so a resumed run keeps them) and copied whole to the workdir by a
  background thread, at most every `sync_every_s` seconds (the first row at once) and at close().
  A run killed without close() (SIGKILL) loses at most the last `sync_every_s` seconds of rows; the
  re-run writes the steps after its checkpoint again.
  """

  def __init__(self, workdir: str | os.PathLike, *, sync_every_s: float = 30.0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter

    self.workdir = as_path(workdir)
    self._remote = is_remote(self.workdir)
    if self._remote:
      self._staging = tempfile.TemporaryDirectory(prefix="gemma2_jax_metrics_")
      self._local = pathlib.Path(self._staging.name)
      existing = self.workdir / "metrics.jsonl"
      with deadline("reading metrics.jsonl", existing):
        if existing.exists():
          (self._local / "metrics.jsonl").write_bytes(existing.read_bytes())
      self._sync_every_s = sync_every_s
      self._last_sync = -math.inf
      self._uploaded: dict[str, int] = {}  # staged file -> bytes of it in the workdir
      self._executor = ThreadPoolExecutor(1, thread_name_prefix="metrics-sync")
      self._pending: Future | None = None
    else:
      self._local = pathlib.Path(self.workdir)
      self._local.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self._local / "metrics.jsonl", "a")
    # Event files are named by the second they are opened in: a unique suffix keeps a quick re-run
    # from overwriting the previous run's file (in the bucket, or truncating it locally).
    self._tb = SummaryWriter(str(self._local / "tensorboard"), filename_suffix=f".{uuid.uuid4().hex[:8]}")

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)
    if self._remote and time.monotonic() - self._last_sync >= self._sync_every_s:
      if self._pending is None or self._pending.done():  # else: the next write tries again
        self._report(self._pending)
        self._pending = self._executor.submit(self._upload, self._snapshot())
        self._last_sync = time.monotonic()

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()
    if self._remote:
      try:
        if self._pending is not None:
          self._pending.exception()  # wait; whatever it missed goes with the final upload
        self._upload(self._snapshot())
      finally:
        self._executor.shutdown()
        self._staging.cleanup()

  def _snapshot(self) -> dict[str, int]:
    """Sizes of the staged files now: whole rows and records, as both are flushed."""
    if not self._jsonl.closed:
      self._tb.flush()  # waits for tensorboardX's writer thread to write the queued events
    return {p.relative_to(self._local).as_posix(): p.stat().st_size
            for p in self._local.rglob("*") if p.is_file()}

  def _upload(self, sizes: dict[str, int]):
    # Only a prefix of `size` bytes is read: later appends by the training thread are not torn.
    for name, size in sizes.items():
      if self._uploaded.get(name) == size:
        continue
      with open(self._local / name, "rb") as f:
        data = f.read(size)
      with deadline(f"writing {name}", self.workdir / name):  # on the sync thread or in close()
        (self.workdir / name).write_bytes(data)
      self._uploaded[name] = size

  def _report(self, done: Future | None):
    if done is not None and done.exception() is not None:
      log.warning("copying metrics to %s failed (retried at the next write): %s", self.workdir,
                  done.exception())
