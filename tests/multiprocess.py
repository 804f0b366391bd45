"""Real multi-process runs on CPU (jax.distributed + gloo): the one helper every such test uses.

`launch` starts N processes of a command, each with its own fake CPU devices, all joined to one
coordinator on localhost. A CLI (`python -m gemma2_jax.train`, ...) gets the distributed flags
appended; a test script calls `worker_init()` first, which reads the same facts from the environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny pre-training run that compiles in seconds; tests add --workdir, steps and mesh overrides.
TINY_TRAIN = ["--config=configs/pretrain_tiny.py", "--config.train.log_every=1",
              "--config.train.eval_every=0", "--config.train.progress_bar=False",
              "--config.checkpoint.save_every=2", "--config.checkpoint.export_hf=False",
              "--config.train.seq_len=64", "--config.model.num_layers=2",
              "--config.train.eval_batches=1"]


def env(devices: int, **extra: str) -> dict:
  base = {k: v for k, v in os.environ.items() if not k.startswith("MP_")}
  return dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **extra)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(cmd: list[str], num_processes: int, devices: int = 1, *, cli: bool = True,
           extra_env: dict | None = None) -> list[subprocess.Popen]:
  """Starts `cmd` as processes 0..N-1 of one job (stdout/stderr piped, text)."""
  port = free_port()
  procs = []
  for pid in range(num_processes):
    flags = [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
             f"--process_id={pid}"] if cli else []
    e = env(devices, MP_COORDINATOR=f"localhost:{port}", MP_NUM_PROCESSES=str(num_processes),
            MP_PROCESS_ID=str(pid), **(extra_env or {}))
    procs.append(subprocess.Popen([*cmd, *flags], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each process; kills all of them if one overruns."""
  deadline = time.monotonic() + timeout
  out = []
  try:
    for p in procs:
      o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      out.append((p.returncode, o, e))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out


def run(cmd: list[str], num_processes: int, devices: int = 1, *, timeout: float = 600,
        check: bool = True, **kw) -> list[tuple[int, str, str]]:
  results = wait(launch(cmd, num_processes, devices, **kw), timeout)
  if check:
    for i, (rc, _, err) in enumerate(results):
      assert rc == 0, f"process {i} exited {rc}:\n{err[-4000:]}"
  return results


def train_cmd(workdir, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "gemma2_jax.train", f"--workdir={workdir}", *TINY_TRAIN, *overrides]


def metrics(workdir) -> list[dict]:
  """Training rows of metrics.jsonl (those with a loss), in order."""
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "loss" in r]


def worker_init():
  """In a script started by `launch(..., cli=False)`: join the job described by the environment."""
  import jax

  jax.distributed.initialize(os.environ["MP_COORDINATOR"], int(os.environ["MP_NUM_PROCESSES"]),
                             int(os.environ["MP_PROCESS_ID"]))
