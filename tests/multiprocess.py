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
from collections.abc import Callable
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


def launch(cmd: list[str] | Callable[[int], list[str]], num_processes: int, devices: int = 1, *,
           cli: bool = True, extra_env: dict | None = None) -> list[subprocess.Popen]:
  """Starts `cmd` (or `cmd(process_id)`) as processes 0..N-1 of one job (stdout/stderr piped)."""
  port = free_port()
  procs = []
  for pid in range(num_processes):
    argv = cmd(pid) if callable(cmd) else cmd
    flags = [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
             f"--process_id={pid}"] if cli else []
    e = env(devices, MP_COORDINATOR=f"localhost:{port}", MP_NUM_PROCESSES=str(num_processes),
            MP_PROCESS_ID=str(pid), **(extra_env or {}))
    procs.append(subprocess.Popen([*argv, *flags], cwd=ROOT, env=e, stdout=subprocess.PIPE,
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


def losses(workdir) -> dict[int, float]:
  """step -> training loss from metrics.jsonl (a re-run step overwrites a killed run's value)."""
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def reference_losses(workdir, devices: int, data_groups: int, *overrides: str) -> dict[int, float]:
  """The same training run in ONE process on `devices` fake devices (the same global mesh).

  A multi-process run whose batch rows come from `data_groups` data shards is compared against this
  process feeding the rows of all those shards itself, in group order: the same global batches.
  """
  cmd = [sys.executable, "-m", "tests.multiprocess", str(data_groups), f"--workdir={workdir}",
         *TINY_TRAIN, *overrides]
  r = subprocess.run(cmd, cwd=ROOT, env=env(devices), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return losses(workdir)


class _Groups:
  """Concatenates the rows of several data shards' iterators (the reference's global batch)."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np

    batches = [next(it) for it in self.iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return [it.get_state() for it in self.iterators]

  def set_state(self, state):
    for it, s in zip(self.iterators, state, strict=True):
      it.set_state(s)


def _reference_main(argv):
  import jax

  from gemma2_jax.cli.train import parse_args
  from gemma2_jax.data.pipeline import make_train_iterator
  from gemma2_jax.training.experiment import apply_overrides, from_config, load_config_file
  from gemma2_jax.training.loop import Trainer

  groups = int(argv[0])
  args, overrides = parse_args(argv[1:])
  exp = from_config(apply_overrides(load_config_file(args.config), overrides),
                    num_devices=jax.device_count())
  trainer = Trainer(exp, args.workdir)
  trainer.train_iter = _Groups([make_train_iterator(exp.data_train, process_index=g,
                                                    process_count=groups, **trainer.data_kw)
                                for g in range(groups)])
  trainer.run()


def worker_init():
  """In a script started by `launch(..., cli=False)`: join the job described by the environment."""
  import jax

  jax.distributed.initialize(os.environ["MP_COORDINATOR"], int(os.environ["MP_NUM_PROCESSES"]),
                             int(os.environ["MP_PROCESS_ID"]))


if __name__ == "__main__":
  _reference_main(sys.argv[1:])
