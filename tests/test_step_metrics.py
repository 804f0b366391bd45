"""The numbers a run logs: MFU counts every model FLOP of the step (the student's forward and
backward, the online teacher's forward, on-policy sampling), tokens/s counts loss-bearing tokens
(slots/s the padded positions), and evals and saves stay out of the step time."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from tests.tiny import SMALL_MODEL


def hand_forward_flops(cfg, T: int) -> float:
  """2 FLOPs per matmul weight per token (every layer's projections and MLP, the tied embedding as
  the logits) + QK^T and PV over the keys each query sees, counted from the masks."""
  from gemma2_jax.model.transformer import param_shapes

  shapes = param_shapes(cfg)
  matmul = sum(math.prod(s) for s in (*shapes["layers"]["attn"].values(),
                                      *shapes["layers"]["mlp"].values()))
  matmul += math.prod(shapes["embedder"]["input_embedding"])
  q, k = np.arange(T)[:, None], np.arange(T)[None, :]
  visible = {w: float(((k <= q) & (q - k < w)).sum()) / T for w in (cfg.sliding_window, T + 1)}
  attention = sum(4 * cfg.num_heads * cfg.head_dim * visible[cfg.sliding_window if i % 2 == 0 else T + 1]
                  for i in range(cfg.num_layers))
  return 2 * matmul + attention


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  from gemma2_jax.training import hooks

  c = Clock()
  monkeypatch.setattr(hooks.time, "perf_counter", c)
  return c


def logger(tmp_path, flops, B=4, T=16, peak=1e12):
  from gemma2_jax.training.hooks import MetricsLogger

  train = types.SimpleNamespace(progress_bar=False, steps=100, log_every=2, global_batch=B, seq_len=T)
  return MetricsLogger(tmp_path, train, start=0, flops=flops, peak=peak, check_finite=lambda m, s: 0)


def step_metrics(tokens, **extra):
  return {"loss": 1.0, "finite": 1.0, "tokens": float(tokens), **extra}


def test_mfu_counts_the_student_the_teacher_and_sampling(tmp_path, clock):
  import jax

  from gemma2_jax.model.config import tiny
  from gemma2_jax.training.flops import step_flops

  T, B = 16, 4
  student = tiny(vocab_size=256, num_layers=2, **SMALL_MODEL)
  teacher = tiny(vocab_size=256, num_layers=4, **{**SMALL_MODEL, "d_model": 48, "ffn_dim": 96})
  log = logger(tmp_path, step_flops(student, T, teacher=teacher, onpolicy=True), B=B, T=T)
  log(0, step_metrics(10, rows=4.0, gen_rows=4.0, gen_tokens=20.0))  # compiles: not timed
  for step in (1, 2, 3):
    clock.now += 2.0
    log(step, step_metrics(10, rows=4.0, gen_rows=4.0, gen_tokens=20.0))
  row = log.last
  slots, generated, seconds = 3 * B * T, 3 * 20, 3 * 2.0
  student_f, teacher_f = 3 * hand_forward_flops(student, T), hand_forward_flops(teacher, T)
  per_chip = seconds * jax.device_count() * 1e12
  expected = ((student_f + teacher_f) * slots + hand_forward_flops(student, T) * generated) / per_chip
  assert row["mfu"] == pytest.approx(expected, rel=0.01)
  assert row["student_mfu"] == pytest.approx(student_f * slots / per_chip, rel=0.01)
  assert row["step_time_s"] == pytest.approx(2.0)
  assert row["gen_tokens_per_s"] == pytest.approx(generated / seconds)
  # WARP's EMA anchor: one more forward of the student per slot, counted with the frozen forwards.
  anchored = step_flops(student, T, teacher=teacher, anchor=True)
  assert anchored.teacher == pytest.approx(teacher_f + hand_forward_flops(student, T), rel=0.01)
  assert anchored.student == pytest.approx(student_f, rel=0.01)


def test_tokens_per_s_counts_loss_bearing_tokens_not_padded_slots(tmp_path, clock):
  from gemma2_jax.training.flops import StepFlops

  log = logger(tmp_path, StepFlops(student=1.0), B=4, T=16)
  log(0, step_metrics(64))
  for step in (1, 2, 3):
    clock.now += 0.5
    log(step, step_metrics(37))  # an SFT batch: 37 response tokens in 64 slots
  assert log.last["tokens_per_s"] == pytest.approx(3 * 37 / 1.5)
  assert log.last["slots_per_s"] == pytest.approx(3 * 64 / 1.5)


def test_evals_and_saves_are_kept_out_of_the_step_time(tmp_path, clock):
  from gemma2_jax.training.flops import StepFlops

  log = logger(tmp_path, StepFlops(student=1.0))
  clock.now += 5.0  # compilation
  log(0, step_metrics(64))
  clock.now += 1.0
  with log.paused("eval"):
    clock.now += 30.0
  log(1, step_metrics(64))
  clock.now += 1.0
  with log.paused("save"):
    clock.now += 7.0
  log(2, step_metrics(64))
  assert log.last["step_time_s"] == pytest.approx(1.0)
  times = log.times()
  assert times["eval_s"] == 30.0 and times["save_s"] == 7.0 and times["first_step_s"] == 5.0
  assert times["step_s"] == pytest.approx(2.0)
  assert times["goodput"] == pytest.approx(2.0 / 44.0)
