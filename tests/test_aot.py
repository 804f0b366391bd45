"""Ahead-of-time compilation of a job's programs (the machinery behind `python -m gemma2_jax.aot`):
train, eval and teacher_logits steps, and the sampler's prefill and decode."""

import dataclasses
import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from gemma2_jax.cli.aot import default_mesh, main
from gemma2_jax.distill.config import DistillConfig, TeacherConfig
from gemma2_jax.inference.sampler import SamplingConfig, cache_bytes
from gemma2_jax.parallel.sharding import DEFAULT_RULES, make_mesh
from gemma2_jax.training import flops
from gemma2_jax.training.preflight import (
  compile_sampler,
  flops_report,
  host_plan,
  job_programs,
  peak_bytes,
  sampler_model_config,
  sampler_report,
  traced_flops,
  while_loops,
)
from tests.tiny import ROOT, experiment_from, tiny_experiment


def program(exp, devices, name="train step"):
  """One of the programs `aot` compiles for a config (training.preflight.job_programs)."""
  return {p.name: p for p in job_programs(exp, devices)}[name]


def compiled(exp, devices, name="train step"):
  return program(exp, devices, name).lower().compile()


@pytest.mark.parametrize("mode", ["ce", "online", "offline"])
def test_step_compiles_from_shapes_alone_on_a_mesh(mode):
  exp = experiment_from(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2})
  if mode != "ce":
    exp = dataclasses.replace(exp, distill=DistillConfig(loss="forward_kl"))
  if mode == "online":  # no checkpoint anywhere: the teacher is shapes from a preset
    exp = dataclasses.replace(exp, teacher=TeacherConfig(checkpoint="/nowhere", preset="tiny"))
  if mode == "offline":
    exp = dataclasses.replace(exp, offline_paths="/nowhere")
  m = compiled(exp, jax.devices()[:8]).memory_analysis()
  assert m.argument_size_in_bytes > 0 and m.temp_size_in_bytes > 0


def test_eval_runs_in_the_train_steps_micro_batches():
  """Eval of a whole global batch in one forward needed 2.4x the train step's temporaries; in the
  train step's micro-batches it needs no more than the train step."""
  exp = experiment_from(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 4, "tensor": 2},
                            train=dataclasses.replace(exp.train, global_batch=32, grad_accum_steps=4))
  train, evaluate = compiled(exp, jax.devices()[:8]), compiled(exp, jax.devices()[:8], "eval step")
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
  exp = experiment_from(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 4, "tensor": 1},
                            distill=DistillConfig(loss="forward_kl"), init_from="/nowhere",
                            teacher=TeacherConfig(checkpoint="/nowhere", preset="tiny"))
  m = compiled(exp, jax.devices()[:8], "teacher_logits step").memory_analysis()
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
  exp = experiment_from(c, 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2})
  p = program(exp, jax.devices()[:8])
  traced = p.trace()
  with p.context():
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


def test_onpolicy_train_step_with_its_decode_loop_compiles_and_is_reported():
  """On-policy distillation samples inside the train step (the decode while loop; lambda 1: no cond,
  the cheaper compile): the AOT trace, compile and FLOP report take it as it is, and say the loop's
  body counts once."""
  exp = experiment_from(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2},
                            distill=DistillConfig(loss="reverse_kl", onpolicy_lambda=1.0,
                                                  onpolicy_max_new_tokens=4),
                            teacher=TeacherConfig(checkpoint="/nowhere", preset="tiny"))
  p = program(exp, jax.devices()[:8])
  traced = p.trace()
  assert while_loops(traced.jaxpr) >= 1
  with p.context():
    compiled = traced.lower().compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  lines = flops_report(exp, traced, compiled, 8)
  assert "while loop(s) (e.g. on-policy sampling's decode) counted once per body" in lines[1]


def test_sampler_prefill_and_decode_compile_from_shapes_on_a_mesh():
  """`python -m gemma2_jax.aot --sample`: the Sampler's own jitted programs on sample's default mesh
  (tensor over the 2 kv heads, data the rest), rows padded to the batch shards, the decode state
  donated (its outputs alias its inputs), the KV cache counted per chip."""
  cfg = sampler_model_config("tiny", None, "bfloat16")
  sampling = SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.9)
  mesh = make_mesh(default_mesh(cfg.num_kv_heads, 8), jax.devices()[:8])
  p = compile_sampler(cfg, mesh, DEFAULT_RULES, batch_size=6, prompt_len=20, sampling=sampling)
  assert dict(p.mesh.shape) == {"dcn": 1, "data": 4, "fsdp": 1, "tensor": 2}
  assert (p.rows, p.bucket) == (8, 32)
  assert p.cache_bytes_total == cache_bytes(cfg, 8, 32 + 8)["ring"]
  assert p.cache_bytes_per_chip * 8 == p.cache_bytes_total  # rows over data, kv heads over tensor
  prefill, decode = p.prefill.memory_analysis(), p.decode.memory_analysis()
  assert prefill.argument_size_in_bytes >= p.param_bytes_per_chip > 0
  assert prefill.output_size_in_bytes >= p.cache_bytes_per_chip
  assert decode.alias_size_in_bytes >= p.cache_bytes_per_chip
  lines, too_big = sampler_report(p, cfg, "tiny on cpu", batch_size=6, sampling=sampling)
  assert too_big is None  # no HBM figure for a CPU device: nothing judged
  assert lines[0].startswith("sampler tiny on cpu (8 x cpu, 1 hosts), mesh {'data': 4, 'tensor': 2}, "
                             "bfloat16 params, B=8 (6 asked")
  assert lines[1].startswith("params per chip") and "local layers 8 ring slots, global layers 40" in lines[1]
  assert lines[2].startswith("prefill per chip: arguments") and lines[3].startswith("decode per chip:")


@pytest.mark.parametrize("argv, rc, message", [
  (["--sample", "--preset=gemma2_9b"], 2, "--sample needs --prompt_len"),
  (["--sample", "--prompt_len=16"], 2, "--sample needs one of --preset or --checkpoint"),
  (["--sample", "--preset=gemma2_9b", "--prompt_len=8000", "--max_new_tokens=256"], 2,
   "exceeds the context --max_len 8192"),
  (["--sample", "--preset=gemma2_9b", "--prompt_len=16", "--batch_size=0"], 2, "--batch_size must be"),
  (["--sample", "--config=configs/distill_tiny.py", "--preset=gemma2_9b", "--prompt_len=16"], 2,
   "takes no --config"),
  (["--preset=gemma2_9b"], 2, "give --config"),
  (["--config=configs/distill_tiny.py", "--prompt_len=16"], 2, "--prompt_len is a sampler flag"),
  (["--sample", "--preset=gemma3", "--prompt_len=16"], 1, "unknown model preset 'gemma3'"),
  (["--sample", "--checkpoint=/nowhere", "--prompt_len=16"], 1, "/nowhere"),
  (["--sample", "--preset=gemma2_9b", "--prompt_len=16", "--top_p=2"], 1, "top_p must be in (0, 1]"),
  (["--sample", "--preset=gemma2_9b", "--prompt_len=16", "--mesh=tensor"], 1, "--mesh 'tensor'"),
  (["--sample", "--preset=gemma2_9b", "--prompt_len=16", "--cache_dtype=int3"], 2,
   "--cache_dtype: 'int3' is not a float dtype"),
])
def test_sample_cli_bad_input_is_one_error_line(argv, rc, message, capsys):
  """Checked before libtpu is needed: one `error:` line naming the problem."""
  try:
    got = main([*argv, "--topology=v5p:2x2x1"])
  except SystemExit as e:
    got = e.code
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert got == rc and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_sample_cli_without_libtpu_says_how_to_get_it(capsys):
  assert main(["--sample", "--preset=gemma2_9b", "--prompt_len=16", "--topology=v5p:2x2x1"]) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "pip install -e '.[tpu]'" in lines[0]
