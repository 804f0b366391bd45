"""A real 2-process run (jax.distributed + gloo on CPU): sharded data, checkpoints, resume rules."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config=configs/pretrain_tiny.py", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.progress_bar=False", "--config.checkpoint.save_every=2",
        "--config.checkpoint.export_hf=False", "--config.train.seq_len=64",
        "--config.model.num_layers=2", "--config.train.eval_batches=1"]


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(workdir, steps):
  port = _free_port()
  procs = [subprocess.Popen(
    [sys.executable, "-m", "gemma2_jax.train", f"--workdir={workdir}", *ARGS,
     f"--config.train.steps={steps}", f"--coordinator_address=localhost:{port}",
     "--num_processes=2", f"--process_id={pid}"], cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
    stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  return outs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
  run_two_processes(tmp_path, 4)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # written by process 0 only
  data = sorted(p.name for p in (tmp_path / "checkpoints" / "4" / "data").iterdir()
                if p.suffix == ".json")
  assert data == ["process_0-of-2.json", "process_1-of-2.json"]
  run_two_processes(tmp_path, 6)
  assert json.loads((tmp_path / "summary.json").read_text())["start_step"] == 4
  # One process cannot take over two processes' data streams silently.
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.train", f"--workdir={tmp_path}", *ARGS,
                      "--config.train.steps=8"], cwd=ROOT, env=_env(4), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 1
  assert "data-iterator state of 2 processes but this run has 1" in r.stderr
  assert "checkpoint.restore_data=False" in r.stderr
