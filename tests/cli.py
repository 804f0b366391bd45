"""Running the commands as a user does, for the bad-input tests: a subprocess on one CPU device, and
the checks every bad input must pass (one `error:` line last, a non-zero exit, files untouched)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.tiny import small_model_flags

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TOK = DATA / "ko_sp1024.model"
# configs/pretrain_tiny.py made tiny: 2 steps of 2 x 16 tokens, a checkpoint every step, no eval.
TINY = ["--config=configs/pretrain_tiny.py", "--config.train.steps=2", "--config.train.global_batch=2",
        "--config.train.seq_len=16", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.progress_bar=False", "--config.checkpoint.save_every=1",
        "--config.checkpoint.export_hf=False", *small_model_flags(num_layers=2),
        "--config.train.loss_chunk=16", "--config.optimizer.warmup_steps=1", "--config.data.eval.paths="]


def cli_env(devices: int = 1) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def cli(module: str, *args, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"gemma2_jax.{module}", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, env=cli_env(devices), timeout=timeout)


def train(workdir, *extra) -> subprocess.CompletedProcess:
  return cli("train", f"--workdir={workdir}", *TINY, *extra)


def assert_one_error(proc: subprocess.CompletedProcess, *fragments: str, rc: int = 1) -> str:
  """Exit code `rc`, no traceback, and the last line of stderr is the only `error:` line."""
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == rc, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
  assert sum(ln.startswith("error: ") for ln in lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[-1], lines[-1]
  return lines[-1]


def snapshot(*roots) -> dict[str, bytes]:
  """Every file under `roots` (files or directories) with its bytes."""
  out = {}
  for root in map(Path, roots):
    for p in [root] if root.is_file() else sorted(root.rglob("*")):
      if p.is_file():
        out[str(p)] = p.read_bytes()
  return out
