"""Joining a multi-process job, and stopping within seconds, with one clear line, when a process of it
is lost.

jax.distributed reacts to a dead peer only after its heartbeat timeout (100 s by default), and to a
dead coordinator at once, by aborting with a C++ stack trace as the last words; the client's own
callback for it cannot be used from Python in jax 0.10 (the status it passes has no Python type).
So:
- each process runs a small watchdog over the runtime's key-value store: it publishes a beat every
  second and its exit status when it ends; a peer whose beat stops for `LOST_AFTER_S`, or that ended
  with an error, stops this process with `error: lost process N ...` and exit code `EXIT_LOST` (the
  runtime's own heartbeat timeout is set longer, so the watchdog speaks first);
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
  forwarded line by line so that its tail can explain an abort of the runtime.
  """
  if os.environ.get(_CHILD_ENV):
    return None

  def die_with_parent():  # a SIGKILL of the launched process must take the job process with it
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

  child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env={**os.environ, _CHILD_ENV: "1"},
                           stderr=subprocess.PIPE, text=True, errors="replace",
                           preexec_fn=die_with_parent)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: child.send_signal(signum))
  tail: collections.deque = collections.deque(maxlen=200)
  for line in child.stderr:
    tail.append(line)
    sys.stderr.write(line)
    sys.stderr.flush()
  rc = child.wait()
  if rc >= 0:
    return rc
  text = "".join(tail)
  if "coordination service" in text or "leader task" in text:
    who, why = 0, "the coordinator (process 0) is unreachable"
  else:
    tasks = re.findall(r"[Tt]ask[: ](\d+)", text)
    who = int(tasks[-1]) if tasks else "?"
    why = f"the runtime stopped this process with {signal.Signals(-rc).name}"
  print(lost_message(who, why), file=sys.stderr, flush=True)
  return EXIT_LOST


def finished(error: str | None = None):
  """Tells the other processes this one ends: cleanly (None) or with the given error line."""
  if _watchdog is not None:
    _watchdog.finish(error)


def collective_failed(exc: BaseException):
  """A collective raised (a peer's connection broke): name the lost process and exit; never returns.

  Waits for the watchdog to identify the peer; if none is found in time, reports `exc` itself.
  """
  deadline = time.monotonic() + LOST_AFTER_S + 3 * BEAT_S
  while _watchdog is not None and time.monotonic() < deadline:
    time.sleep(BEAT_S / 2)  # the watchdog exits the process once it knows who was lost
  _exit(f"error: a collective of this {jax.process_count()}-process job failed "
        f"({' '.join(str(exc).split())[:200]}); re-run the same command on every host: training "
        "resumes from the last complete checkpoint")


def lost_message(process: int, why: str) -> str:
  return (f"error: lost process {process} of this job ({why}); "
          "re-run the same command on every host: training resumes from the last complete "
          "checkpoint")


def _exit(line: str):
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  os._exit(EXIT_LOST)


class _Watchdog(threading.Thread):
  def __init__(self):
    super().__init__(name="gemma2_jax-watchdog", daemon=True)
    from jax._src import distributed as dist

    self._client = dist.global_state.client
    self._me = jax.process_index()
    self._n = jax.process_count()
    self._stop = threading.Event()

  def finish(self, error: str | None):
    self._stop.set()
    try:
      self._client.key_value_set(f"{_PREFIX}exit/{self._me}", error or "ok", allow_overwrite=True)
    except Exception:  # the coordinator may be gone already; nothing left to tell
      pass

  def run(self):
    seen: dict[int, tuple[str, float]] = {}
    beat = 0
    unreachable_since = None
    while not self._stop.wait(BEAT_S):
      now = time.monotonic()
      try:
        beat += 1
        self._client.key_value_set(f"{_PREFIX}beat/{self._me}", str(beat), allow_overwrite=True)
        beats = dict(self._client.key_value_dir_get(f"{_PREFIX}beat/"))
        exits = dict(self._client.key_value_dir_get(f"{_PREFIX}exit/"))
        unreachable_since = None
      except Exception as e:  # the coordination service (on process 0) is unreachable
        unreachable_since = unreachable_since or now
        if now - unreachable_since > LOST_AFTER_S and not self._stop.is_set():
          _exit(lost_message(0, f"the coordinator is unreachable: {' '.join(str(e).split())[:120]}"))
        continue
      if self._stop.is_set():
        return
      for p in range(self._n):
        if p == self._me:
          continue
        status = exits.get(f"{_PREFIX}exit/{p}")
        if status is not None:
          if status != "ok":
            _exit(lost_message(p, f"it stopped with {status!r}"))
          continue
        value = beats.get(f"{_PREFIX}beat/{p}")
        if value is None:
          seen.setdefault(p, ("", now))
        elif seen.get(p, ("",))[0] != value:
          seen[p] = (value, now)
        if now - seen[p][1] > LOST_AFTER_S:
          _exit(lost_message(p, f"no sign of life for {now - seen[p][1]:.0f} s"))
