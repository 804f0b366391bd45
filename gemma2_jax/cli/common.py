"""Shared by the `python -m gemma2_jax.*` entry points: argument errors are one line, not usage."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_with_overrides(parser: ArgumentParser, argv) -> tuple[argparse.Namespace, dict[str, str]]:
  """parse_known_args, then every leftover must be a `--config.a.b=value` override."""
  args, rest = parser.parse_known_args(argv)
  overrides = {}
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      parser.error(f"unexpected argument {item!r}; overrides look like --config.train.steps=100")
    key, value = item[len("--config."):].split("=", 1)
    overrides[key] = value
  return args, overrides


def dtype_flag(*, auto: bool = False):
  """An argparse `type` for dtype flags: a float dtype or its alias (`model.config.float_dtype`), or
  `auto` when `auto`; anything else is the parser's one error line."""
  def parse(value: str) -> str:
    from gemma2_jax.errors import UserError
    from gemma2_jax.model.config import float_dtype

    if auto and value == "auto":
      return value
    try:
      return float_dtype(value)
    except UserError as e:
      raise argparse.ArgumentTypeError(str(e) + (" or auto" if auto else "")) from None

  parse.__name__ = "dtype"
  return parse


def add_distributed_flags(parser: ArgumentParser):
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (TPU pods / SLURM auto-detect, or "
                           "with --coordinator_address/--num_processes/--process_id)")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)


# The persistent compilation cache: a restarted or repeated command reuses its compiled programs
# instead of compiling them again (minutes for a big model). The directory is
# $GEMMA2_JAX_COMPILATION_CACHE if set ('' turns the cache off), else JAX's own
# $JAX_COMPILATION_CACHE_DIR / jax_compilation_cache_dir if set, else ~/.cache/gemma2_jax/jax_cache
# (under $XDG_CACHE_HOME when set). It may be a gs:// path, shared by the hosts of a pod.
COMPILATION_CACHE_ENV = "GEMMA2_JAX_COMPILATION_CACHE"
# Programs that compile in at least this long are cached (JAX's default, 1 s, skips small ones).
CACHE_MIN_COMPILE_SECS = 0.1
CACHE_MAX_BYTES = 16 << 30  # a local cache's bound (least recently used entries go first)


def default_compilation_cache_dir() -> str:
  import os

  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "gemma2_jax", "jax_cache")


def enable_compilation_cache() -> str:
  """Turns JAX's persistent compilation cache on (see COMPILATION_CACHE_ENV); returns its directory,
  '' when off. Called by every command before it compiles anything."""
  import importlib.util
  import os

  import jax

  chosen = os.environ.get(COMPILATION_CACHE_ENV)
  if chosen is None:
    chosen = jax.config.jax_compilation_cache_dir or default_compilation_cache_dir()
  if not chosen:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  if "://" not in chosen:
    chosen = os.path.abspath(os.path.expanduser(chosen))
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", chosen)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if "://" not in chosen and importlib.util.find_spec("filelock") is not None:
    # A local cache is pruned least-recently-used first beyond this (its eviction needs filelock).
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return chosen


def run_job(args: argparse.Namespace, body) -> int:
  """Runs `body() -> exit code` as one process of a (possibly multi-process) job.

  With distributed flags the command is re-run as a supervised child, which joins the job. Known bad
  input (a UserError, an OSError) is one `error: ...` line and exit 1; with several processes any
  failure is published so the others stop naming it, and a broken collective names the lost process
  (see gemma2_jax.parallel.distributed).
  """
  import gc
  import inspect
  import logging
  import sys
  import threading
  import traceback

  from gemma2_jax.parallel import distributed

  several = bool(getattr(args, "distributed", False) or getattr(args, "coordinator_address", None))
  if several:
    rc = distributed.supervise()  # before the heavy imports: the parent only watches the child
    if rc is not None:
      return rc
  import jax

  from gemma2_jax.errors import UserError

  if several:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  enable_compilation_cache()
  error = None
  # Coroutines abandoned by a failed Orbax read report their copies of the error when collected
  # (Python's "Exception ignored in: <coroutine ...>" traceback), possibly before the one error line
  # or after it; the error itself is reported below.
  # Their tasks' unretrieved exceptions are logged by asyncio likewise, and callbacks they scheduled
  # on its closed event loop raise "Event loop is closed" (from an unraisable context or a thread).
  def abandoned(obj, exc) -> bool:
    return inspect.iscoroutine(obj) or (isinstance(exc, RuntimeError)
                                        and "Event loop is closed" in str(exc))

  unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: None if abandoned(u.object, u.exc_value) else unraisable_hook(u)
  threading.excepthook = lambda a: None if abandoned(None, a.exc_value) else thread_hook(a)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  try:
    rc = body()
  except UserError as e:
    error = f"error: {' '.join(str(e).split())}"
  except OSError as e:  # e.g. a workdir that cannot be created or written
    error = f"error: {e.strerror or e}: {e.filename or ''} (check the output and data paths)"
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      error = (f"error: out of device memory ({' '.join(str(e).split())[:300]}); check the config "
               "first with python -m gemma2_jax.aot, or lower the batch per step")
    elif jax.process_count() > 1:
      distributed.collective_failed(e)  # a lost peer: one line naming it, then exit
    else:
      raise
  except BaseException as e:
    if jax.process_count() > 1:  # tell the other processes, or they would wait in a collective
      traceback.print_exc()
      distributed.fail(f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (traceback "
                       "above)")
    raise
  if error:
    # Work abandoned by the failure (e.g. Orbax's other reads of an unreadable checkpoint, pending
    # coroutines holding their own errors) would print tracebacks when collected, after our line:
    # collect it now and keep later stragglers quiet; the one error line is the report.
    sys.unraisablehook = lambda unraisable: None
    gc.collect()
    if jax.process_count() > 1:
      distributed.fail(error)
    print(error, file=sys.stderr)
    return 1
  distributed.finished()
  return rc
