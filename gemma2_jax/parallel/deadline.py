"""Bounded waits on storage: a run whose bucket stops answering ends with one line, not silence.

A storage server that accepts connections but never answers leaves gcsfs, TensorStore and Orbax's
save finalize waiting forever (their per-request retries have no overall bound), and a Python thread
blocked in a socket call cannot be interrupted. So every storage operation of a run goes inside
`deadline(operation, path)` (a background one, such as an async checkpoint's finalize, is `watch`ed
until it reports done), and one watcher thread ends the process when any of them outlives its bound:
one `error: storage did not answer ...` line naming the operation and the path, published to the
other processes of a job first (`distributed.fail`: a key-value store RPC to the coordinator, no
storage involved), exit code 1. Checkpoints finalized before stay usable: the re-run resumes from the
newest one (an unfinished save is never picked, see gemma2_jax.checkpoint.manager).

The bound is per operation (a whole checkpoint save, one file's upload), not per request: see
`DEFAULT_TIMEOUT_S`. A run sets it from `checkpoint.storage_timeout_s` (`set_timeout`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from gemma2_jax.parallel import distributed

# Orbax's own bound on an async save (AsyncOptions.timeout_secs): a save it would let finish is
# never cut short here, while a stalled bucket stops the run after 20 minutes instead of never.
DEFAULT_TIMEOUT_S = 1200.0
POLL_S = 0.5  # how often a watched background operation is asked whether it is done

_timeout_s = DEFAULT_TIMEOUT_S


def set_timeout(seconds: float):
  """The bound of every later `deadline` / `watch` that names none (checkpoint.storage_timeout_s)."""
  global _timeout_s
  _timeout_s = float(seconds)


class Deadline:
  """One bounded operation; `cancel()` when it is over (done or failed: its error is reported then)."""

  def __init__(self, operation: str, path, seconds: float | None, until: Callable[[], bool] | None):
    self.operation, self.path = operation, os.fspath(path)
    self.seconds = _timeout_s if seconds is None else seconds
    self.expires = time.monotonic() + self.seconds
    self.until = until
    _watcher().add(self)

  def cancel(self):
    _watcher().remove(self)

  def line(self) -> str:
    return (f"error: storage did not answer within {self.seconds:g} s while {self.operation} at "
            f"{self.path}; the run stopped (checkpoints finalized before are kept: re-running the "
            "same command resumes from the newest). Check the bucket and the network, or raise "
            "checkpoint.storage_timeout_s if the storage is only slow")


@contextlib.contextmanager
def deadline(operation: str, path, seconds: float | None = None):
  """The block (a blocking storage call) must end within `seconds` (default: `set_timeout`'s), or the
  process ends with one line naming `operation` ("saving checkpoint step 3") and `path`."""
  d = Deadline(operation, path, seconds, None)
  try:
    yield d
  finally:
    d.cancel()


def watch(operation: str, path, until: Callable[[], bool], seconds: float | None = None) -> Deadline:
  """A background operation (e.g. Orbax's async finalize): `until()` must turn true in time. It is
  polled every POLL_S from the watcher thread, so it must be quick and never block."""
  return Deadline(operation, path, seconds, until)


def bounded(items: Iterable, operation: str, path) -> Iterator:
  """`items`, each `next` under its own deadline (data reads that block the training loop)."""
  it = iter(items)
  done = object()
  while True:
    with deadline(operation, path):
      item = next(it, done)
    if item is done:
      return
    yield item


class _Watcher(threading.Thread):
  """Sleeps until the earliest deadline (or POLL_S while a background operation is watched); ends
  the process at the first expired one. A single thread: one error line, however many expire."""

  def __init__(self):
    super().__init__(name="gemma2_jax-storage-deadline", daemon=True)
    self.lock = threading.Lock()
    self.active: set[Deadline] = set()
    self.changed = threading.Event()

  def add(self, d: Deadline):
    with self.lock:
      self.active.add(d)
    self.changed.set()

  def remove(self, d: Deadline):
    with self.lock:
      self.active.discard(d)

  def holds(self, d: Deadline) -> bool:
    with self.lock:
      return d in self.active

  def run(self):
    while True:
      with self.lock:
        pending = list(self.active)
      now = time.monotonic()
      for d in sorted(pending, key=lambda d: d.expires):
        if d.until is not None and _done(d.until):
          d.cancel()
        elif now >= d.expires and self.holds(d):  # (not one that ended just now)
          distributed.fail(d.line())  # never returns
      waits = [d.expires - now for d in pending] + [POLL_S for d in pending if d.until is not None]
      self.changed.wait(min(waits) if waits else None)
      self.changed.clear()


def _done(until: Callable[[], bool]) -> bool:
  try:
    return bool(until())
  except Exception:  # the operation failed: whoever waits for it reports its error
    return True


_watcher_thread: _Watcher | None = None
_start_lock = threading.Lock()


def _watcher() -> _Watcher:
  global _watcher_thread
  with _start_lock:
    if _watcher_thread is None:
      _watcher_thread = _Watcher()
      _watcher_thread.start()
    return _watcher_thread
