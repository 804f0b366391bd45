"""Checkpoint operations: saves on a wall-time cadence besides the step cadence (one decision for all
processes), milestone checkpoints kept besides the last few, the pod configs' settings, and the
persistent compilation cache every command turns on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gemma2_jax.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from gemma2_jax.training.hooks import Checkpointer
from tests import multiprocess
from tests.cli import ROOT, cli_env, train


class _FakeCkpt:
  """The TrainCheckpointer side Checkpointer talks to: records the steps saved."""

  def __init__(self, minutes: float = 0.0):
    self.cfg = CheckpointConfig(save_every_minutes=minutes)
    self.saved: list[int] = []

  def reached_preemption(self, step):
    return False

  def save(self, step, *args, **kw):
    self.saved.append(step)

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def wait(self):
    pass


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _run(saver: Checkpointer, clock: _Clock, steps: int, seconds_per_step: float) -> None:
  for done in range(1, steps + 1):
    clock.now += seconds_per_step
    saver.due(done)  # the loop asks first (to wait for the step), then saves: one decision
    saver(done, state={}, metrics={"finite": True})
  saver.final({})


def _saver(ckpt, clock, *, save_every: int, steps: int) -> Checkpointer:
  return Checkpointer(ckpt, None, {}, save_every=save_every, steps=steps, stop_requested=lambda: False,
                      check_finite=lambda m, s: 0, clock=clock)


def test_timed_saves_combine_with_the_step_cadence():
  """Every 10 steps, and whenever 60 s passed since the last save (the timer restarts at each)."""
  clock, ckpt = _Clock(), _FakeCkpt(minutes=1)
  _run(_saver(ckpt, clock, save_every=10, steps=40), clock, 40, seconds_per_step=7)
  # 7 s a step: 60 s after the start is step 9 (63 s); then step 10 is due by steps; 60 s after it
  # is step 19 (63 s later); and so on; the last step is the final save.
  assert ckpt.saved == [9, 10, 19, 20, 29, 30, 39, 40]


def test_timed_saves_alone_and_off():
  clock, ckpt = _Clock(), _FakeCkpt(minutes=0.5)
  _run(_saver(ckpt, clock, save_every=0, steps=20), clock, 20, seconds_per_step=4)
  assert ckpt.saved == [8, 16, 20]  # 32 s, 64 s, then the final save
  clock, ckpt = _Clock(), _FakeCkpt(minutes=0)
  _run(_saver(ckpt, clock, save_every=0, steps=20), clock, 20, seconds_per_step=1000)
  assert ckpt.saved == [20]


def test_save_every_minutes_is_checked():
  with pytest.raises(ValueError, match="save_every_minutes"):
    CheckpointConfig(save_every_minutes=-1)


def _worker():
  """Two processes whose clocks disagree save the same steps: process 0's decides."""
  from tests.multiprocess import worker_init
  worker_init()
  import jax

  clock, ckpt = _Clock(), _FakeCkpt(minutes=1)
  # Process 0 sees 7 s per step, process 1 a clock that never reaches a minute.
  per_step = 7 if jax.process_index() == 0 else 0.001
  _run(_saver(ckpt, clock, save_every=0, steps=30), clock, 30, seconds_per_step=per_step)
  print(json.dumps({"process": jax.process_index(), "saved": ckpt.saved}), flush=True)


@pytest.mark.slow  # two processes; the storage-stall and multiprocess tests keep one per class
def test_timed_save_decision_is_the_same_on_every_process():
  results = multiprocess.run([sys.executable, "-m", "tests.test_checkpoint_ops"], num_processes=2,
                             cli=False, timeout=120)
  reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  assert [r["saved"] for r in reports] == [[9, 18, 27, 30]] * 2


def test_milestones_are_kept_besides_the_last_few(tmp_path):
  ckpt = TrainCheckpointer(tmp_path, CheckpointConfig(keep_last=2, keep_every=4, async_save=False))

  class NoData:
    def get_state(self):
      return {}

  for step in range(1, 11):
    ckpt.save(step, {"w": np.full(3, step, np.float32)}, NoData(), {})
  ckpt.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
    4, 8, 9, 10]


POD_CONFIGS = ["pretrain_2b", "pretrain_9b", "pretrain_27b", "distill_2b", "distill_9b",
               "continue_pretrain_ko_9b", "sft_distill_9b", "onpolicy_distill_9b"]


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_pod_configs_save_on_time_and_keep_milestones(name):
  from gemma2_jax.training.experiment import load_config_file
  ck = load_config_file(str(ROOT / "configs" / f"{name}.py")).checkpoint
  assert ck.save_every_minutes == 30 and ck.save_every > 0 and ck.keep_last >= 2
  assert ck.keep_every > 0 and ck.keep_every % ck.save_every == 0  # milestones land on saved steps


# --- the persistent compilation cache ----------------------------------------------------------------

HIT = "Persistent compilation cache hit for 'jit_train_step'"


def _train_env(cache) -> dict:
  env = cli_env()
  env["GEMMA2_JAX_COMPILATION_CACHE"] = str(cache)
  env["JAX_DEBUG_LOG_MODULES"] = "jax._src.compiler"  # logs each cache hit / miss
  return env


def test_a_second_train_run_hits_the_compilation_cache(tmp_path, monkeypatch):
  from tests import cli as cli_mod

  cache = tmp_path / "cache"
  monkeypatch.setattr(cli_mod, "cli_env", lambda devices=1: _train_env(cache))
  first = train(tmp_path / "run1")
  assert first.returncode == 0, first.stderr[-3000:]
  entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
  assert entries, "nothing was written to the compilation cache"
  assert HIT not in first.stderr
  second = train(tmp_path / "run2")
  assert second.returncode == 0, second.stderr[-3000:]
  assert HIT in second.stderr, second.stderr[-3000:]


def test_the_compilation_cache_can_be_turned_off(tmp_path):
  env = _train_env("")
  code = ("from gemma2_jax.cli.common import enable_compilation_cache as e; import jax; "
          "print(repr(e()), jax.config.jax_enable_compilation_cache)")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
  assert out.stdout.split() == ["''", "False"], out.stderr
  env.pop("GEMMA2_JAX_COMPILATION_CACHE")
  env["XDG_CACHE_HOME"] = str(tmp_path)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
  assert out.stdout.split() == [repr(os.path.join(str(tmp_path), "gemma2_jax", "jax_cache")), "True"]


if __name__ == "__main__":
  _worker()
