"""`python -m gemma2_jax.sample --prompts --output` as a multi-process job (jax.distributed + gloo on
CPU, 2 processes x 2 devices, the batch split over the processes): the output is byte for byte a
one-process run's on the same mesh, a killed run resumes without duplicates, only process 0 writes
and shows progress, and bad input is the same error line on every process (none left waiting)."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gemma2_jax.model.config import tiny
from tests import multiprocess as mp
from tests.hf_utils import random_hf_model

TOKENIZER = Path(__file__).resolve().parent / "data" / "ko_sp1024.model"
# Lengths in two prompt buckets (16 and 32 tokens): batches of one bucket each, a last partial one.
PROMPTS = ["서울은", "a", "부산의 바다", "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고", "헌법"]
# 4 prompts per batch: 2 rows per process, 1 per data shard (tensor=2 inside each process).
FLAGS = ["--max_new_tokens", "10", "--batch_size", "4", "--temperature", "0.8", "--top_k", "50",
         "--seed", "3", "--cache_dtype", "float32"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  path = tmp_path_factory.mktemp("sample_mp")
  model = random_hf_model(tiny(vocab_size=1024, sliding_window=6), seed=1, scale=0.3)
  with torch.no_grad():
    model.model.embed_tokens.weight.mul_(0.2)
  model.save_pretrained(path / "hf")
  shutil.copy(TOKENIZER, path / "hf" / "tokenizer.model")
  prompts = path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS))
  return path / "hf", prompts


def _cmd(ckpt, prompts, output, *extra) -> list[str]:
  return [sys.executable, "-m", "gemma2_jax.sample", "--checkpoint", str(ckpt), "--prompts",
          str(prompts), "--output", str(output), *FLAGS, *extra]


def _one_process(cmd) -> subprocess.CompletedProcess:
  """The same command in one process with the 2 x 2 devices: the same global mesh."""
  r = subprocess.run(cmd, cwd=mp.ROOT, env=mp.env(4), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def _last(err: str) -> str:
  return err.strip().splitlines()[-1]


def test_bad_output_is_one_error_line_on_every_process(inputs, tmp_path):
  """Only process 0 reads --output; its error reaches the other process, which must not wait for it
  in a collective: both end with the same line, exit 1, before loading the model."""
  ckpt, prompts = inputs
  out = tmp_path / "foreign.jsonl"
  out.write_text(json.dumps({"index": 0, "prompt": "another prompt"}) + "\n")
  start = time.monotonic()
  results = mp.run(_cmd(ckpt, prompts, out), 2, 2, timeout=300, check=False)
  assert time.monotonic() - start < 120
  want = f"error: {out}:1 holds another prompt than line 0 of the input; choose another --output"
  for rc, _, err in results:
    assert rc == 1 and _last(err) == want, err[-3000:]
  assert out.read_text() == json.dumps({"index": 0, "prompt": "another prompt"}) + "\n"


@pytest.mark.slow
def test_two_processes_write_what_one_writes_and_resume(inputs, tmp_path):
  ckpt, prompts = inputs
  want = tmp_path / "one.jsonl"
  _one_process(_cmd(ckpt, prompts, want, "--no_progress"))
  lines = want.read_text().splitlines(keepends=True)
  assert sorted(json.loads(line)["index"] for line in lines) == list(range(len(PROMPTS)))

  out = tmp_path / "two.jsonl"
  (rc0, _, err0), (rc1, _, err1) = mp.run(_cmd(ckpt, prompts, out), 2, 2)
  assert out.read_bytes() == want.read_bytes()
  assert "sample: 100%" in err0 and "sample:" not in err1  # the progress bar: process 0's alone

  # A run killed mid-write: two complete lines and half of the third. The re-run keeps the complete
  # lines and redoes the rest: the same file, no duplicates.
  out.write_text(lines[0] + lines[1] + lines[2][:20])
  mp.run(_cmd(ckpt, prompts, out, "--no_progress"), 2, 2)
  assert out.read_bytes() == want.read_bytes()
  # A finished output: nothing left to do, nothing loaded or written.
  (_, _, err0), _ = mp.run(_cmd(ckpt, prompts, out), 2, 2)
  assert out.read_bytes() == want.read_bytes()
  assert _last(err0) == f"{out} holds all {len(PROMPTS)} prompts already"


@pytest.mark.slow
def test_processes_with_other_prompts_refuse_together(inputs, tmp_path):
  """Each process reads its own --prompts; a copy that differs stops every process with one line."""
  ckpt, prompts = inputs
  other = tmp_path / "other.jsonl"
  other.write_text(prompts.read_text().replace("헌법", "법률"))
  out = tmp_path / "out.jsonl"
  results = mp.wait(mp.launch(lambda pid: _cmd(ckpt, other if pid else prompts, out), 2, 2), 300)
  for rc, _, err in results:
    assert rc == 1 and _last(err).startswith(
      "error: process 1 has other prompts, prompt ids or sampling flags than process 0"), err[-3000:]
  assert not out.exists() or out.read_text() == ""
