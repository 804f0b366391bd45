"""Ahead-of-time compilation of the real train step (the machinery behind `python -m gemma2_jax.aot`)."""

import dataclasses
import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from gemma2_jax import flops
from gemma2_jax.aot import (
  compile_eval_step,
  compile_step,
  flops_report,
  peak_bytes,
  trace_step,
  traced_flops,
)
from gemma2_jax.experiment import TeacherConfig
from gemma2_jax.losses import DistillConfig
from gemma2_jax.sharding import make_mesh
from tests.test_trainer import ROOT, _experiment, tiny_experiment


@pytest.mark.parametrize("mode", ["ce", "online", "offline"])
def test_step_compiles_from_shapes_alone_on_a_mesh(mode):
  exp = _experiment(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2})
  if mode != "ce":
    exp = dataclasses.replace(exp, distill=DistillConfig(loss="forward_kl"))
  if mode == "online":  # no checkpoint anywhere: the teacher is shapes from a preset
    exp = dataclasses.replace(exp, teacher=TeacherConfig(checkpoint="/nowhere", preset="tiny"))
  if mode == "offline":
    exp = dataclasses.replace(exp, offline_paths="/nowhere")
  compiled = compile_step(exp, jax.devices()[:8])
  m = compiled.memory_analysis()
  assert m.argument_size_in_bytes > 0 and m.temp_size_in_bytes > 0


def test_eval_runs_in_the_train_steps_micro_batches():
  """Eval of a whole global batch in one forward needed 2.4x the train step's temporaries; in the
  train step's micro-batches it needs no more than the train step."""
  exp = _experiment(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 4, "tensor": 2},
                            train=dataclasses.replace(exp.train, global_batch=32, grad_accum_steps=4))
  train, evaluate = compile_step(exp, jax.devices()[:8]), compile_eval_step(exp, jax.devices()[:8])
  assert evaluate.memory_analysis().temp_size_in_bytes <= train.memory_analysis().temp_size_in_bytes
  assert peak_bytes(evaluate) <= peak_bytes(train)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_cli_without_libtpu_says_how_to_get_it():
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.aot", "--config=configs/distill_tiny.py",
                      "--topology=v5p:2x2x1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "pip install -e '.[tpu]'" in lines[0]


def test_teacher_logits_step_and_host_plan():
  from gemma2_jax.aot import compile_teacher_logits_step, host_plan

  exp = _experiment(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 4, "tensor": 1},
                            distill=DistillConfig(loss="forward_kl"), init_from="/nowhere",
                            teacher=TeacherConfig(checkpoint="/nowhere", preset="tiny"))
  m = compile_teacher_logits_step(exp, jax.devices()[:8]).memory_analysis()
  assert m.argument_size_in_bytes > 0 and m.temp_size_in_bytes > 0
  plan = host_plan(exp, jax.devices()[:8])
  assert plan[0].startswith("hosts: 1 in 1 data groups; each host feeds 8 of 8 rows")
  assert plan[1].startswith("init_from: each host reads at most") and plan[2].startswith("teacher:")
  assert plan[3].startswith("export: process 0's host holds one tensor at a time")


def test_traced_flops_counts_scan_trips_cond_shard_map_and_kernel_grids():
  """XLA's cost analysis counts a loop body once; the traced count multiplies by the trip count."""
  mesh = make_mesh({"fsdp": 2}, jax.devices()[:2])
  mm = 2 * 8 * 16 * 16  # one [8,16] @ [16,16]

  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] @ w_ref[...]

  def f(x, w):
    x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, length=5)  # 5 global matmuls
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ w @ w, lambda x: x, x)  # the dearer branch: 2
    # per chip: one [4,16] @ [16,16] on each of the 2 chips = 1 global matmul
    x = jax.shard_map(lambda x: x @ w, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp"))(x)
    return pl.pallas_call(kernel, out_shape=x, grid=(3,), interpret=True)(x, w)  # 3 grid steps

  outside, kernels = traced_flops(jax.jit(f).trace(jnp.ones((8, 16)), jnp.ones((16, 16))).jaxpr, 2)
  assert outside == (5 + 2 + 1) * mm / 2
  assert kernels == 3 * mm / 2


def test_train_step_with_splash_under_a_mesh_and_its_flops_report():
  """The released configs' attention (splash, interpret mode here) in the real train step: scanned
  pairs, full remat, heads split over tensor=2; the FLOP report sees its kernels."""
  c = tiny_experiment()
  c.model.update(dict(attention_impl="splash", remat="full", head_dim=16, num_layers=4))
  exp = _experiment(c, 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2})
  traced = trace_step(exp, jax.devices()[:8])
  compiled = traced.lower().compile()
  outside, kernels = traced_flops(traced.jaxpr, 8)
  assert kernels > 0
  # Matmuls outside the kernels: at least the model's non-attention FLOPs (full remat recomputes
  # the forward: about 4/3 of them).
  T = exp.train.seq_len
  tokens_per_chip = exp.train.global_batch * T / 8
  dense = (flops.train_flops_per_token(exp.model, T) - 3 * flops.attention_flops_per_token(exp.model, T))
  assert 1.0 <= outside / (dense * tokens_per_chip) <= 1.5
  lines = flops_report(exp, traced, compiled, 8)
  assert lines[0].startswith("train step FLOPs per chip: model") and "traced" in lines[1]
