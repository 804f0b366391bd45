"""Joining a multi-process job, and stopping within seconds, with one clear line, when a process of it
is lost or fails.

jax.distributed reacts to a dead peer only after its heartbeat timeout (100 s by default), and to a
dead coordinator at once, by aborting with a C++ stack trace as the last words; the client's own
callback for it cannot be used from Python in jax 0.10 (the status it passes has no Python type).
So:
- each process runs a small watchdog over the runtime's key-value store: it publishes a beat every
  second and watches one neighbour (process i watches i + 1, a ring: O(1) requests per process); a
  neighbour whose beat stops for `LOST_AFTER_S`, or that ended with an error, is published as lost,
  and every process that sees that stops with `error: lost process N ...` and exit code `EXIT_LOST`
  (the runtime's own heartbeat timeout is longer, so the watchdog speaks first);
- a process that fails publishes its error line first (`fail`), so the others name it and its error;
- the CLI runs the job in a child process (`supervise`) that forwards signals and dies with its
  parent; when the runtime aborts the child anyway (a lost coordinator), the parent prints the line.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax

EXIT_LOST = 3
BEAT_S = 1.0
LOST_AFTER_S = 12.0
RUNTIME_HEARTBEAT_S = 60
_PREFIX = "gemma2_jax/"
_LOST = _PREFIX + "lost"
_CHILD_ENV = "GEMMA2_JAX_SUPERVISED"

_watchdog: _Watchdog | None = None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None):
  """jax.distributed.initialize (explicit, or auto-detected on TPU pods / SLURM) plus the watchdog."""
  global _watchdog
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=RUNTIME_HEARTBEAT_S)
  if jax.process_count() > 1:
    _watchdog = _Watchdog()
    _watchdog.start()


def supervise() -> int | None:
  """In the launched process: re-runs this command as a supervised child and returns its exit code.

  Returns None in the child itself (the caller goes on with the job). stdout is shared; stderr is
  forwarded as it comes (progress bars included) and its tail explains an abort of the runtime.
  """
  if os.environ.get(_CHILD_ENV):
    return None

  def die_with_parent():  # a SIGKILL of the launched process must take the job process with it
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

  forwarded: list[int] = []
  handlers = {sig: signal.signal(sig, lambda signum, frame: forwarded.append(signum))
              for sig in (signal.SIGTERM, signal.SIGINT)}
  child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env={**os.environ, _CHILD_ENV: "1"},
                           stderr=subprocess.PIPE, preexec_fn=die_with_parent)

  def forward(signum, frame=None):
    child.send_signal(signum)

  for sig in handlers:
    signal.signal(sig, forward)
  for signum in forwarded:  # arrived while the child was being started
    forward(signum)
  tail: collections.deque = collections.deque(maxlen=64)
  fd = child.stderr.fileno()
  while chunk := os.read(fd, 1 << 16):
    tail.append(chunk)
    sys.stderr.buffer.write(chunk)
    sys.stderr.flush()
  rc = child.wait()
  if rc >= 0:
    return rc
  if rc == -signal.SIGKILL:
    print(f"error: this process (process {os.environ.get('JAX_PROCESS_ID', 'of the job')}) was killed "
          "with SIGKILL (out of host memory?); re-run the same command on every host: training "
          "resumes from the last complete checkpoint", file=sys.stderr, flush=True)
    return EXIT_LOST
  text = b"".join(tail).decode(errors="replace")
  if "Failed to send RPC to coordination service" in text or "leader task" in text:
    who, why = 0, "the coordinator (process 0) is unreachable"
  else:
    tasks = re.findall(r"[Tt]ask[: ](\d+)", text)
    who = int(tasks[-1]) if tasks else "?"
    why = f"the distributed runtime stopped this process with {signal.Signals(-rc).name}"
  print(lost_message(who, why), file=sys.stderr, flush=True)
  return EXIT_LOST


def finished():
  """This process ends cleanly: its peers stop watching it."""
  if _watchdog is not None:
    _watchdog.publish_exit("ok")


def fail(line: str, code: int = 1):
  """Ends this process of a multi-process job with `line` (an `error: ...` line); never returns.

  The error is published first, so the peers stop naming this process and its error instead of
  hanging in a collective or in the runtime's shutdown barrier.
  """
  if _watchdog is not None:
    _watchdog.publish_exit(line)
    _linger_if_coordinator()
  _exit(line, code)


def _linger_if_coordinator():
  """Process 0 hosts the key-value store: once it exits, the runtime aborts every other process at
  once. It stays a few beats so that they read what was published and stop with the right line."""
  if jax.process_index() == 0:
    time.sleep(3 * BEAT_S)


def collective_failed(exc: BaseException):
  """A collective raised (a peer's connection broke): name the lost process and exit; never returns.

  Waits for the watchdog to identify the peer; if none is found in time, reports `exc` itself.
  """
  deadline = time.monotonic() + LOST_AFTER_S + 3 * BEAT_S
  while _watchdog is not None and time.monotonic() < deadline:
    time.sleep(BEAT_S / 2)  # the watchdog exits the process once it knows who was lost
  _exit(f"error: a collective of this {jax.process_count()}-process job failed "
        f"({' '.join(str(exc).split())[:200]}); re-run the same command on every host: training "
        "resumes from the last complete checkpoint", EXIT_LOST)


def barrier(name: str, timeout_s: float):
  """All processes wait here (e.g. while process 0 writes an export), not in a collective."""
  if _watchdog is not None:
    _watchdog.client.wait_at_barrier(_PREFIX + name, int(timeout_s * 1000))


def lost_message(process, why: str) -> str:
  return (f"error: lost process {process} of this job ({why}); re-run the same command on every "
          "host: training resumes from the last complete checkpoint")


def _exit(line: str, code: int = EXIT_LOST):
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  os._exit(code)


class _Watchdog(threading.Thread):
  def __init__(self):
    super().__init__(name="gemma2_jax-watchdog", daemon=True)
    from jax._src import distributed as dist

    self.client = dist.global_state.client
    self._me = jax.process_index()
    self._peer = (self._me + 1) % jax.process_count()
    self._stop = threading.Event()

  def publish_exit(self, status: str):
    self._stop.set()
    try:
      self.client.key_value_set(f"{_PREFIX}exit/{self._me}", status, allow_overwrite=True)
    except Exception:  # the coordinator may be gone already; nothing left to tell
      pass

  def _declare_lost(self, line: str):
    try:
      self.client.key_value_set(_LOST, line, allow_overwrite=True)
    except Exception:
      pass
    _linger_if_coordinator()
    _exit(line)

  def run(self):
    beat, last_value, last_change, unreachable_since = 0, None, time.monotonic(), None
    while not self._stop.wait(BEAT_S):
      began = time.monotonic()
      try:
        beat += 1
        self.client.key_value_set(f"{_PREFIX}beat/{self._me}", str(beat), allow_overwrite=True)
        lost = _try_get(self.client, _LOST)
        status = _try_get(self.client, f"{_PREFIX}exit/{self._peer}")
        value = _try_get(self.client, f"{_PREFIX}beat/{self._peer}")
        unreachable_since = None
      except Exception as e:  # the coordination service (on process 0) is unreachable
        unreachable_since = unreachable_since or began
        if time.monotonic() - unreachable_since > LOST_AFTER_S and not self._stop.is_set():
          _exit(lost_message(0, f"the coordinator is unreachable: {' '.join(str(e).split())[:120]}"))
        continue
      now = time.monotonic()
      if self._stop.is_set():
        return
      if lost is not None:
        _linger_if_coordinator()
        _exit(lost)
      if status is not None:
        if status != "ok":
          self._declare_lost(lost_message(self._peer, f"it stopped with: {status}"))
        continue  # a neighbour that finished cleanly is not watched any more
      if now - began > 2 * BEAT_S or value != last_value:
        # A slow round says nothing about the neighbour: staleness counts from after it.
        last_value, last_change = value, now
      elif now - last_change > LOST_AFTER_S:
        self._declare_lost(lost_message(self._peer, f"no sign of life for {now - last_change:.0f} s"))


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # a key not set yet; anything else means the service is unreachable
    if "NOT_FOUND" in str(e):
      return None
    raise
