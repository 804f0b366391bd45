"""Shared by the resume tests (test_resume, test_ema): a tiny pretraining run as a subprocess, killed
at a chosen point or not, and its losses and checkpointed state read back."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from tests.tiny import small_model_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
COMMON = ["--config=configs/pretrain_tiny.py", f"--config.train.steps={STEPS}",
          "--config.train.global_batch=4", "--config.train.seq_len=32", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.eval_batches=1",
          "--config.train.progress_bar=False", "--config.checkpoint.save_every=3",
          "--config.checkpoint.export_hf=False", *small_model_flags(num_layers=2),
          "--config.train.loss_chunk=16", "--config.optimizer.warmup_steps=2"]


def env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def train(workdir, *extra, devices=1, check=True, common=COMMON):
  cmd = [sys.executable, "-m", "gemma2_jax.train", f"--workdir={workdir}", *common, *extra]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(devices), timeout=600)
  if check:
    assert r.returncode == 0, r.stderr[-3000:]
  return r


def killed(workdir, mode, step, common=COMMON):
  cmd = [sys.executable, str(ROOT / "tests" / "run_with_kill.py"), mode, str(step), "--",
         f"--workdir={workdir}", *common]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(), timeout=600)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]


def losses(workdir) -> dict[int, float]:
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      out[row["step"]] = row["loss"]  # a re-run step overwrites the killed run's value
  return out


def final_state(workdir, step=STEPS):
  path = Path(workdir) / "checkpoints" / str(step) / "state"
  return ocp.StandardCheckpointer().restore(path.absolute())


def assert_same_state(a, b):
  flat_a, flat_b = _flatten(a), _flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}"))
    return out
  if isinstance(tree, list | tuple):
    out = {}
    for i, v in enumerate(tree):
      out.update(_flatten(v, f"{prefix}/{i}"))
    return out
  return {prefix: tree}
