"""Ahead-of-time checks of a job for a slice (what `python -m gemma2_jax.aot` prints): its programs,
built by training/programs.py exactly as the trainer / teacher_logits / sample build them, compiled for
a device topology from abstract inputs; per-chip memory against the chip's HBM, compile time, the
train step's FLOPs per chip, and each host's share of the data and the weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from gemma2_jax import checkpoint
from gemma2_jax.checkpoint import hf
from gemma2_jax.checkpoint.mapping import export_tensors
from gemma2_jax.data.tokenizer import END_OF_TURN_ID, EOS_ID
from gemma2_jax.distill import onpolicy
from gemma2_jax.distill.teacher import teacher_shardings
from gemma2_jax.errors import UserError
from gemma2_jax.inference.sampler import SamplingConfig, cache_sizes
from gemma2_jax.model.config import get_preset
from gemma2_jax.model.transformer import LOGICAL_AXES, param_shapes
from gemma2_jax.parallel.sharding import logical_to_sharding, make_mesh, process_row_blocks
from gemma2_jax.training import flops, modes, programs
from gemma2_jax.training.experiment import ConfigError, Experiment
from gemma2_jax.training.optim import make_optimizer
from gemma2_jax.training.state import state_shardings

HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95,
           "TPU v6 lite": 32, "TPU v6e": 32}


GiB = 2**30


def sampler_model_config(preset: str | None, checkpoint_path: str | None, dtype: str):
  """The sampled model's shapes (a preset, or a checkpoint's config file) with params and compute in
  `dtype`, as `python -m gemma2_jax.sample --dtype` loads them."""

  if preset:
    try:
      cfg = get_preset(preset)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  else:
    cfg = checkpoint.read_config(checkpoint_path)  # CheckpointError: one error line
  return cfg.replace(param_dtype=dtype, dtype=dtype)


def memory_line(name: str, compiled, hbm: int | None, seconds: float) -> tuple[str, bool]:
  """One program's per-chip memory against the chip's HBM: (the report line, whether it fits)."""
  m, total = compiled.memory_analysis(), peak_bytes(compiled)
  fits = hbm is None or total <= hbm * GiB
  return (f"{name} per chip: arguments {m.argument_size_in_bytes / GiB:.2f} GiB, outputs "
          f"{m.output_size_in_bytes / GiB:.2f} GiB (aliased {m.alias_size_in_bytes / GiB:.2f}), "
          f"temporaries {m.temp_size_in_bytes / GiB:.2f} GiB -> peak {total / GiB:.2f} GiB"
          + (f" of {hbm} GiB HBM: {'fits' if fits else 'DOES NOT FIT'}" if hbm else "")
          + f" (traced and compiled in {seconds:.0f} s)"), fits


def sampler_report(p: CompiledSampler, cfg, name: str, *, batch_size: int,
                   sampling) -> tuple[list[str], str | None]:
  """The compiled sampler's per-chip memory: (report lines, the first program that does not fit the
  chip's HBM or None)."""

  devices = list(p.mesh.devices.flat)
  kind = devices[0].device_kind
  hbm = HBM_GIB.get(kind)
  hosts = len({d.process_index for d in devices})
  W, S = cache_sizes(cfg, p.bucket, sampling)
  sizes = {k: v for k, v in p.mesh.shape.items() if v > 1} or {"data": 1}
  lines = [
    f"sampler {name} ({len(devices)} x {kind}, {hosts} hosts), mesh {sizes}, {cfg.param_dtype} params, "
    f"B={p.rows}" + (f" ({batch_size} asked, padded to the batch shards)" if p.rows != batch_size else "")
    + f", prompt bucket {p.bucket} + {sampling.max_new_tokens} new tokens, "
    f"{'greedy' if sampling.greedy else f'temperature {sampling.temperature}'}"
    + (f" top_k {sampling.top_k}" if sampling.top_k else "")
    + (f" top_p {sampling.top_p}" if sampling.top_p else "") + f", cache {sampling.cache_dtype}",
    f"params per chip {p.param_bytes_per_chip / GiB:.2f} GiB; KV cache {p.cache_bytes_total / GiB:.2f} "
    f"GiB in all, {p.cache_bytes_per_chip / GiB:.2f} GiB per chip (local layers {W} ring slots, global "
    f"layers {S})",
  ]
  too_big = None
  for part in ("prefill", "decode"):
    line, fits = memory_line(part, getattr(p, part), hbm, p.seconds[part])
    lines.append(line)
    too_big = too_big or (None if fits else part)
  if hosts > 1:
    lines.append(f"note: this slice has {hosts} hosts: run python -m gemma2_jax.sample on every host "
                 "with --distributed; --batch_size is rounded up to whole rows per batch shard")
  return lines, too_big


def traced_flops(jaxpr, num_devices: int) -> tuple[float, float]:
  """FLOPs per chip of every matmul in a traced step: (outside Pallas kernels, inside them).

  XLA's cost analysis counts each while-loop body once, so it misses the scanned layers, micro-batches
  and loss chunks; this walks the step's jaxpr (what XLA compiles: the backward pass and remat's
  recomputation included) and multiplies scan bodies by their length. Outside shard_map the shapes are
  global (divided by the chips); inside, per chip. A Pallas kernel counts its body once per grid
  step, with every conditional block computed: an upper bound for kernels that skip masked blocks.
  A while loop's body (e.g. on-policy distillation's decode loop, sampler.sample_tokens inside the
  train step) counts once: its trip count is known only at run time (see while_loops).
  """

  def walk(jaxpr, scale, kernel, acc):
    for eqn in jaxpr.eqns:
      name, params = eqn.primitive.name, eqn.params
      if name == "dot_general":
        (contracting, _), _ = params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        acc[kernel] += scale * 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in contracting)
        continue
      if name == "cond":  # the most expensive branch
        branches = [walk(b.jaxpr, scale, kernel, [0.0, 0.0]) for b in params["branches"]]
        best = max(branches, key=sum)
        acc[0], acc[1] = acc[0] + best[0], acc[1] + best[1]
        continue
      inner_scale, inner_kernel = scale, kernel
      if name == "scan":
        inner_scale *= params["length"]
      elif name == "shard_map":
        inner_scale *= num_devices
      elif name == "pallas_call":
        inner_scale, inner_kernel = scale * math.prod(params["grid_mapping"].grid), 1
      for value in params.values():
        for sub in value if isinstance(value, tuple | list) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub, inner_scale, inner_kernel, acc)
    return acc

  outside, kernels = walk(jaxpr.jaxpr, 1.0 / num_devices, 0, [0.0, 0.0])
  return outside, kernels


def while_loops(jaxpr) -> int:
  """How many while loops a traced step holds (nested ones included): traced_flops counts each body
  once."""
  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "while"
      for value in eqn.params.values():
        for sub in value if isinstance(value, tuple | list) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            n += walk(sub)
    return n

  return walk(jaxpr.jaxpr)


def flops_report(exp, traced, compiled, num_devices: int, teacher_cfg=None) -> list[str]:
  """The train step's FLOPs per chip: the model FLOPs the trainer's MFU uses, the traced count, and
  XLA's cost analysis."""

  T = exp.train.seq_len
  per_chip = exp.train.global_batch * T / num_devices
  model = model_flops_per_chip(exp, num_devices, teacher_cfg)
  attention = 3 * flops.attention_flops_per_token(exp.model, T) * per_chip
  outside, kernels = traced_flops(traced.jaxpr, num_devices)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list | tuple) else cost or {}).get("flops", float("nan"))
  teacher = ""
  if teacher_cfg is not None:
    teacher_fwd = flops.forward_flops_per_token(teacher_cfg, T) * per_chip
    teacher = f"; the teacher's forward {teacher_fwd / 1e12:.1f}"
  return [
    f"train step FLOPs per chip: model {model / 1e12:.1f} TFLOP (the trainer's MFU count: the student's "
    + ("3 x forward" if exp.lora is None else "forward + backward with no weight gradient for its frozen "
       "base (flops.lora_train_flops_per_token)")
    + f", attention over visible keys {attention / 1e12:.1f}{teacher}; on-policy sampling "
    "counted at run time)",
    f"  traced {(outside + kernels) / 1e12:.1f} TFLOP = {outside / 1e12:.1f} XLA matmuls (backward and "
    f"remat recompute included, loops x trip count) + {kernels / 1e12:.1f} in Pallas kernels (every "
    f"grid step in full); XLA cost analysis {cost / 1e12:.1f} TFLOP (each loop body once, Pallas "
    f"kernels not seen)" + (f"; {loops} while loop(s) (e.g. on-policy sampling's decode) counted once "
                             f"per body" if (loops := while_loops(traced.jaxpr)) else ""),
  ]


def model_flops_per_chip(exp, num_devices: int, teacher_cfg=None) -> float:
  """The model FLOPs of one train step per chip that the trainer's `mfu` counts (sampling aside)."""
  step = flops.step_flops(exp.model, exp.train.seq_len, teacher=teacher_cfg, lora=exp.lora,
                          anchor=exp.anchored)
  return step.total(exp.train.global_batch * exp.train.seq_len) / num_devices


def roofline_report(exp, traced, compiled, devices, teacher_cfg=None) -> list[str]:
  """The train step's roofline per chip (training/roofline.py) on the devices' chip, if its peaks
  are known: compute (the traced FLOPs, remat included), HBM and collective bytes from the compiled
  program, and the MFU ceiling they allow."""
  from gemma2_jax.training import roofline

  chip = flops.CHIPS.get(devices[0].device_kind)
  if chip is None:
    return [f"roofline: no published peaks for {devices[0].device_kind}"]
  outside, kernels = traced_flops(traced.jaxpr, len(devices))
  r = roofline.analyze(compiled.as_text(), outside + kernels)
  return r.lines(chip, model_flops_per_chip(exp, len(devices), teacher_cfg))


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def host_bytes(shapes: dict, shardings: dict, dtype, host: int) -> int:
  """Bytes of the distinct slices of a parameter tree that `host`'s devices hold."""


  total = 0
  for shape, sharding in zip(jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)),
                             jax.tree.leaves(shardings), strict=True):
    slices = {tuple((s.start, s.stop) for s in index) for d, index in
              sharding.devices_indices_map(tuple(shape)).items() if d.process_index == host}
    for index in slices:
      total += math.prod(len(range(*slice(a, b).indices(n))) for (a, b), n in zip(index, shape, strict=True))
  return total * np.dtype(dtype).itemsize


def host_plan(exp, devices) -> list[str]:
  """Per host on this topology: the batch rows it feeds (data groups; see sharding.data_group), the
  weights it reads for `init_from` and the teacher (only its devices' slices), and the host RAM the
  end-of-run export needs (one tensor at a time)."""


  mesh = make_mesh(exp.mesh, devices)
  sh = state_shardings(exp, mesh, make_optimizer(exp.optimizer, 1)[0])
  blocks = process_row_blocks(sh.batch, exp.train.global_batch)
  hosts = sorted(blocks)
  groups = len(set(blocks.values()))
  rows = sum(b - a for a, b in blocks[hosts[0]])
  lines = [f"hosts: {len(hosts)} in {groups} data groups; each host feeds {rows} of "
           f"{exp.train.global_batch} rows per step ({len(hosts) // groups} hosts per group)"]

  def most(shapes, shardings, dtype):
    return max(host_bytes(shapes, shardings, dtype, h) for h in hosts) / GiB

  if exp.init_from:
    # A LoRA run reads the base (in lora.base_dtype, laid out like the model) into no train state.
    read = sh.state.params if exp.lora is None else logical_to_sharding(LOGICAL_AXES, mesh, exp.rules)
    dtype = exp.model.param_dtype if exp.lora is None else exp.lora.base_dtype
    gib = most(param_shapes(exp.model), read, dtype)
    lines.append(f"init_from: each host reads at most {gib:.2f} GiB ({dtype}) of the "
                 "checkpoint (its devices' slices)" + (", at every (re)start: the frozen LoRA base"
                                                       if exp.lora else ""))
  if exp.teacher is not None:
    tcfg = teacher_config(exp)
    gib = most(param_shapes(tcfg), teacher_shardings(exp.teacher, exp.rules, mesh), tcfg.param_dtype)
    lines.append(f"teacher: each host reads at most {gib:.2f} GiB "
                 f"({tcfg.param_dtype}) of the teacher checkpoint")
  specs, _ = export_tensors(exp.model, hf.entries(exp.model), {}, np.float32,
                            vocab_rows=exp.model.num_real_tokens or exp.model.vocab_size)
  biggest = max(specs, key=lambda s: int(np.prod(s[1])))
  lines.append(f"export: process 0's host holds one tensor at a time, at most "
               f"{int(np.prod(biggest[1])) * 4 / GiB:.2f} GiB (fp32 {biggest[0]})")
  return lines


def teacher_config(exp: Experiment):
  """The teacher's shapes without its weights: a preset, or its checkpoint's config file."""
  try:
    return modes.teacher_model_config(exp)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"teacher checkpoint {exp.teacher.checkpoint} is not readable here ({e}); give its "
                      "shapes with --config.teacher.preset=gemma2_27b (or gemma2_9b, gemma2_2b)") from None


def stop_tokens(exp: Experiment) -> tuple[int, ...] | None:
  """On-policy samples' stop tokens: the tokenizer's, or Gemma's ids when it is not readable here
  (the ids are constants of the program: its shapes and memory are the same)."""
  if exp.distill is None or not exp.distill.onpolicy_lambda:
    return None
  try:
    return onpolicy.stop_tokens_for(exp.tokenizer)
  except (OSError, UserError):
    return (EOS_ID, END_OF_TURN_ID)


def job_programs(exp: Experiment, devices, *, topk: int = modes.TOPK_DEFAULT) -> list[programs.Program]:
  """The programs a config runs, on a mesh of `devices`: train step, eval step and, with a teacher,
  teacher_logits' step (`topk` tokens kept; also the offline records' k when they are not readable)."""
  mesh = make_mesh(exp.mesh, devices)
  teacher_cfg = teacher_config(exp) if exp.teacher is not None else None
  mode = modes.for_experiment(exp, topk=topk, stop_tokens=stop_tokens(exp))
  out = [programs.train_program(exp, mode, mesh), programs.trainer_eval_program(exp, mesh)]
  if teacher_cfg is not None:  # the same config runs teacher_logits for offline distillation
    out.append(programs.topk_program(exp, teacher_cfg, mesh, topk))
  return out


def compile_programs(progs: list[programs.Program]) -> dict[str, tuple[Any, Any, float]]:
  """name -> (traced, compiled, seconds to trace and compile)."""
  out = {}
  for p in progs:
    start = time.perf_counter()
    traced = p.trace()
    with p.context():
      compiled = traced.lower().compile()
    out[p.name] = (traced, compiled, time.perf_counter() - start)
  return out


@dataclasses.dataclass
class CompiledSampler:
  """The sampler's compiled programs on a mesh, and what they were compiled for."""

  mesh: Any
  rows: int  # the batch as run: --batch_size rounded up to a multiple of the batch shards
  bucket: int  # the prompt bucket (power of two) the prompts are left-padded to
  prefill: Any  # jax.stages.Compiled
  decode: Any
  seconds: dict
  cache_bytes_per_chip: int  # the decode state's KV caches on one chip
  cache_bytes_total: int
  param_bytes_per_chip: int


def compile_sampler(cfg, mesh, rules, *, batch_size: int, prompt_len: int,
                    sampling: SamplingConfig) -> CompiledSampler:
  """Compiles `python -m gemma2_jax.sample`'s prefill and decode (programs.sampler_programs) on `mesh`.
  The decode state's abstract inputs are prefill's outputs with the shardings prefill gives them."""
  sp = programs.sampler_programs(cfg, mesh, rules, batch_size=batch_size, prompt_len=prompt_len,
                                 sampling=sampling)
  seconds = {}
  start = time.perf_counter()
  prefill = sp.prefill.lower().compile()
  seconds["prefill"] = time.perf_counter() - start
  decode_program = sp.decode(prefill.out_info, sampling)
  start = time.perf_counter()
  decode = decode_program.lower().compile()
  seconds["decode"] = time.perf_counter() - start
  state = decode_program.args[2]
  return CompiledSampler(mesh=mesh, rows=sp.rows, bucket=sp.bucket, prefill=prefill, decode=decode,
                         seconds=seconds, cache_bytes_per_chip=programs.tree_bytes(state.caches, True),
                         cache_bytes_total=programs.tree_bytes(state.caches, False),
                         param_bytes_per_chip=programs.tree_bytes(sp.sampler.params, True))
