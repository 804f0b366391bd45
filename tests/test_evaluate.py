"""`python -m gemma2_jax.evaluate` reports what the trainer's own eval reports on the same data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_FILE = REPO / "tests" / "data" / "ko" / "1809899.txt"
TINY = ["--config.train.steps=3", "--config.train.eval_every=3", "--config.train.eval_batches=2",
        "--config.train.log_every=1", "--config.checkpoint.save_every=3",
]


def _run(module, *args, rc=0):
  proc = subprocess.run([sys.executable, "-m", f"gemma2_jax.{module}", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == rc, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("run")
  _run("train", "--config=configs/pretrain_tiny.py", f"--workdir={path}", *TINY)
  return path


def test_evaluate_cli_equals_the_trainers_eval(workdir, tmp_path):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  trainer_eval = next(r for r in reversed(rows) if "eval_loss" in r)
  out = tmp_path / "eval.json"
  proc = _run("evaluate", "--checkpoint", workdir, "--data", EVAL_FILE, "--format", "text",
              "--seq_len", 128, "--batch", 8, "--max_batches", 2, "--output", out, "--no_progress")
  got = json.loads(out.read_text())
  assert got["eval_loss"] == pytest.approx(trainer_eval["eval_loss"], rel=1e-5)
  assert got["eval_bits_per_byte"] == pytest.approx(trainer_eval["eval_bits_per_byte"], rel=1e-5)
  assert got["eval_tokens"] == trainer_eval["eval_tokens"] > 0
  assert proc.stdout.startswith("eval: loss=")


def test_evaluate_bad_data_is_one_line(workdir, tmp_path):
  proc = _run("evaluate", "--checkpoint", workdir, "--data", tmp_path / "missing*.txt", rc=1)
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "missing*.txt" in last, proc.stderr[-2000:]
