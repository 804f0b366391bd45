"""Compile a job's programs ahead of time for a TPU slice; report per-chip memory, compile time and
the train step's FLOPs per chip (the trainer's MFU count against a count of the traced step's matmuls).

  pip install -e ".[tpu]"        # libtpu: lets this CPU host compile for TPU topologies
  python -m gemma2_jax.aot --config=configs/distill_9b.py --topology=v5p:4x4x4 \\
      --config.teacher.preset=gemma2_27b [--config.a.b=v ...]
  python -m gemma2_jax.aot --sample (--preset=gemma2_27b | --checkpoint=PATH) --topology=v5p:2x2x1 \\
      --batch_size=64 --prompt_len=2048 --max_new_tokens=1024 [--cache_dtype=bfloat16] [--mesh=tensor=4]

A config compiles its train step, eval step and (with a teacher) teacher_logits step. `--sample`
compiles `python -m gemma2_jax.sample`'s two programs instead (sampler.Sampler's jitted prefill and
its decode loop, the decode state donated) for `--batch_size` rows of a `--prompt_len`-token prompt
bucket, with that CLI's flags and defaults: params in --dtype (bfloat16, sample's `auto` on TPU) laid
out by the sharding rules on its default mesh (tensor over the kv heads, data the rest) or --mesh.
Measured (libtpu 0.0.52; greedy, prompt bucket 2048 + 1024 new tokens, bf16 params and cache), peak
GiB per chip of prefill / decode: the 27B teacher writing SFT responses (`sample --chat`) on v5p:2x2x1
(one host, tensor=4) 55.7 / 66.7 at B=64 (KV cache 17.25 per chip), 83.4 / 93.0 at B=128 (34.5); on
v5p:2x2x2 (tensor=8) 25.8 / 33.4 at B=64; gemma2_9b on v5p:2x2x1 34.0 / 40.1 at B=64 (cache 15.75).
Decode's temporaries are about a second copy of the params and of the cache (its per-layer weights
in DECODE_LAYOUT and the loop's own cache buffers), next to the arguments.

Nothing is allocated and no weights are read: params, optimizer state, the teacher, the batch and the
prompts are abstract (shapes + shardings on the slice's mesh). The teacher's shapes come from
`teacher.preset`, or from the config file of its checkpoint when that is readable here (likewise
`--sample --checkpoint`). Exit code 0 if every program fits the chip's HBM, 1 if one does not (or on
bad input, with one `error:` line).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from gemma2_jax.cli.common import ArgumentParser, parse_with_overrides

HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95,
           "TPU v6 lite": 32, "TPU v6e": 32}
GiB = 2**30


def teacher_model_config(exp):
  """The teacher's shapes without its weights: a preset, or its checkpoint's config file."""
  from gemma2_jax import checkpoint
  from gemma2_jax.distill.teacher import teacher_runtime_config
  from gemma2_jax.model.config import get_preset
  from gemma2_jax.training.experiment import ConfigError

  t = exp.teacher
  if t.preset:  # shapes only: the vocab is the student's (one tokenizer; the presets' is 256128)
    cfg = get_preset(t.preset).replace(vocab_size=exp.model.vocab_size)
  else:
    try:
      cfg = checkpoint.read_config(t.checkpoint)
    except checkpoint.CheckpointError as e:
      raise ConfigError(f"teacher checkpoint {t.checkpoint} is not readable here ({e}); give its "
                        "shapes with --config.teacher.preset=gemma2_27b (or gemma2_9b, gemma2_2b)") from None
  return teacher_runtime_config(exp.teacher, exp.model, cfg)


def _abstract_inputs(exp, devices):
  """Mesh, shardings, abstract train state and batch (with the config's shardings), teacher."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding

  from gemma2_jax.parallel.sharding import logical_to_spec, make_mesh
  from gemma2_jax.training.optim import make_optimizer
  from gemma2_jax.training.state import abstract_state, state_shardings
  from gemma2_jax.training.steps import TOPK_KEYS

  mesh = make_mesh(exp.mesh, devices)
  tx, schedule = make_optimizer(exp.optimizer, exp.train.steps)
  sh = state_shardings(exp, mesh, tx)
  S = jax.ShapeDtypeStruct
  state = abstract_state(exp, tx, sh)
  B, T = exp.train.global_batch, exp.train.seq_len
  batch = {k: S((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh.batch)
           for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")}
  teacher_cfg = teacher = None
  if exp.distill_mode == "online":
    teacher_cfg = teacher_model_config(exp)
    teacher = _abstract_teacher(exp, mesh, teacher_cfg)
  elif exp.distill_mode == "offline":
    k = 128
    spec = NamedSharding(mesh, logical_to_spec(("batch", "length", None), exp.rules))
    batch |= {TOPK_KEYS[0]: S((B, T, k), jnp.float32, sharding=spec),
              TOPK_KEYS[1]: S((B, T, k), jnp.int32, sharding=spec)}
  return mesh, tx, schedule, sh, state, batch, teacher_cfg, teacher


def _abstract_teacher(exp, mesh, teacher_cfg):
  import jax
  import jax.numpy as jnp

  from gemma2_jax.distill.teacher import teacher_shardings
  from gemma2_jax.model.transformer import param_shapes

  return jax.tree.map(
    lambda s, shard: jax.ShapeDtypeStruct(s, jnp.dtype(teacher_cfg.param_dtype), sharding=shard),
    param_shapes(teacher_cfg), teacher_shardings(exp.teacher, exp.rules, mesh),
    is_leaf=lambda x: isinstance(x, tuple))


def trace_step(exp, devices):
  """Traces make_train_step for `devices` (a jax.stages.Traced: its jaxpr, then .lower().compile())."""
  import jax

  from gemma2_jax.parallel.sharding import activation_sharding
  from gemma2_jax.training.steps import BATCH_KEYS, TOPK_KEYS, make_train_step

  mesh, tx, schedule, sh, state, batch, teacher_cfg, teacher = _abstract_inputs(exp, devices)
  batch = {k: v for k, v in batch.items() if k in BATCH_KEYS + TOPK_KEYS}
  step = make_train_step(exp, tx, schedule, teacher_cfg)
  with activation_sharding(mesh, exp.rules):
    return jax.jit(step, out_shardings=(sh.state, sh.replicated), donate_argnums=0).trace(
      state, batch, teacher)


def compile_step(exp, devices):
  """Lowers and compiles make_train_step for `devices`; returns the compiled executable."""
  return trace_step(exp, devices).lower().compile()


def compile_eval_step(exp, devices):
  """Lowers and compiles the eval step (the trainer's shardings) for `devices`."""
  import jax

  from gemma2_jax.parallel.sharding import activation_sharding
  from gemma2_jax.training.steps import BATCH_KEYS, make_eval_step

  mesh, _, _, sh, state, batch, _, _ = _abstract_inputs(exp, devices)
  batch = {k: v for k, v in batch.items() if k in (*BATCH_KEYS, "target_bytes")}
  with activation_sharding(mesh, exp.rules):
    step = make_eval_step(exp.model, chunk=exp.train.loss_chunk, micro_batches=exp.train.grad_accum_steps)
    lowered = jax.jit(step, out_shardings=sh.replicated).lower(state.params, batch)
  return lowered.compile()


def compile_teacher_logits_step(exp, devices, k: int = 128):
  """Lowers and compiles `python -m gemma2_jax.teacher_logits`'s step (default rows per forward)."""
  import jax
  import jax.numpy as jnp

  from gemma2_jax.cli.teacher_logits import topk_step
  from gemma2_jax.parallel.sharding import activation_sharding, make_mesh

  mesh = make_mesh(exp.mesh, devices)
  teacher_cfg = teacher_model_config(exp)
  teacher = _abstract_teacher(exp, mesh, teacher_cfg)
  step, batch_sharding, B = topk_step(exp, teacher_cfg, mesh, k)
  rows = jax.ShapeDtypeStruct((B, exp.train.seq_len), jnp.int32, sharding=batch_sharding)
  with activation_sharding(mesh, exp.rules):
    return step.lower(teacher, rows, rows, rows).compile()


def sampler_model_config(preset: str | None, checkpoint_path: str | None, dtype: str):
  """The sampled model's shapes (a preset, or a checkpoint's config file) with params and compute in
  `dtype`, as `python -m gemma2_jax.sample --dtype` loads them."""
  from gemma2_jax import checkpoint
  from gemma2_jax.model.config import get_preset
  from gemma2_jax.training.experiment import ConfigError

  if preset:
    try:
      cfg = get_preset(preset)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  else:
    cfg = checkpoint.read_config(checkpoint_path)  # CheckpointError: one error line
  return cfg.replace(param_dtype=dtype, dtype=dtype)


@dataclasses.dataclass
class SamplerPrograms:
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


def compile_sampler(cfg, devices, *, batch_size: int, prompt_len: int, sampling,
                    mesh: dict | None = None) -> SamplerPrograms:
  """Lowers and compiles `python -m gemma2_jax.sample`'s programs for `devices`: the Sampler's own
  jitted prefill and decode (the state donated), params laid out by the sharding rules on `mesh`
  (default: sample's, tensor over the kv heads and data the rest), rows as Sampler.start pads them.
  The decode state's abstract inputs are prefill's outputs with the shardings prefill gives them."""
  import math

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from gemma2_jax.cli.sample import mesh_sizes
  from gemma2_jax.inference.sampler import Sampler, bucket_length
  from gemma2_jax.model.transformer import LOGICAL_AXES, param_shapes
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh

  S = jax.ShapeDtypeStruct
  mesh = make_mesh(mesh or mesh_sizes("", cfg.num_kv_heads, len(devices)), devices)
  params = jax.tree.map(lambda shape, sh: S(shape, jnp.dtype(cfg.param_dtype), sharding=sh),
                        param_shapes(cfg), logical_to_sharding(LOGICAL_AXES, mesh, DEFAULT_RULES),
                        is_leaf=lambda x: isinstance(x, tuple))
  sampler = Sampler(cfg, params, mesh=mesh)
  B = batch_size + -batch_size % sampler.rows_multiple
  T = bucket_length(prompt_len)

  def rows(shape, dtype):  # as Sampler._rows lays out host rows
    spec = PartitionSpec(*sampler.row_sharding.spec[:1], *[None] * (len(shape) - 1))
    return S(shape, dtype, sharding=NamedSharding(mesh, spec))

  seconds = {}
  with sampler._ctx():
    start = time.perf_counter()
    prefill = sampler._prefill.lower(cfg, params, rows((B, T), jnp.int32), rows((B,), jnp.int32),
                                     S((), jnp.uint32), rows((B,), jnp.uint32), sampling).compile()
    seconds["prefill"] = time.perf_counter() - start
    state = jax.tree.map(lambda x: S(x.shape, x.dtype, sharding=x.sharding), prefill.out_info)
    start = time.perf_counter()
    decode = sampler._decode.lower(cfg, params, state, sampling, S((), jnp.int32)).compile()
    seconds["decode"] = time.perf_counter() - start

  def nbytes(tree, per_chip: bool):
    return sum(math.prod(x.sharding.shard_shape(x.shape) if per_chip else x.shape)
               * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

  return SamplerPrograms(mesh=mesh, rows=B, bucket=T, prefill=prefill, decode=decode,
                         seconds=seconds, cache_bytes_per_chip=nbytes(state.caches, True),
                         cache_bytes_total=nbytes(state.caches, False),
                         param_bytes_per_chip=nbytes(params, True))


def memory_line(name: str, compiled, hbm: int | None, seconds: float) -> tuple[str, bool]:
  """One program's per-chip memory against the chip's HBM: (the report line, whether it fits)."""
  m, total = compiled.memory_analysis(), peak_bytes(compiled)
  fits = hbm is None or total <= hbm * GiB
  return (f"{name} per chip: arguments {m.argument_size_in_bytes / GiB:.2f} GiB, outputs "
          f"{m.output_size_in_bytes / GiB:.2f} GiB (aliased {m.alias_size_in_bytes / GiB:.2f}), "
          f"temporaries {m.temp_size_in_bytes / GiB:.2f} GiB -> peak {total / GiB:.2f} GiB"
          + (f" of {hbm} GiB HBM: {'fits' if fits else 'DOES NOT FIT'}" if hbm else "")
          + f" (traced and compiled in {seconds:.0f} s)"), fits


def sampler_report(p: SamplerPrograms, cfg, name: str, *, batch_size: int,
                   sampling) -> tuple[list[str], str | None]:
  """The compiled sampler's per-chip memory: (report lines, the first program that does not fit the
  chip's HBM or None)."""
  from gemma2_jax.inference.sampler import _cache_sizes

  devices = list(p.mesh.devices.flat)
  kind = devices[0].device_kind
  hbm = HBM_GIB.get(kind)
  hosts = len({d.process_index for d in devices})
  W, S = _cache_sizes(cfg, p.bucket, sampling)
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
  import math

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
  from gemma2_jax.training import flops

  T = exp.train.seq_len
  per_chip = exp.train.global_batch * T / num_devices
  model = flops.train_flops_per_token(exp.model, T) * per_chip
  attention = 3 * flops.attention_flops_per_token(exp.model, T) * per_chip
  outside, kernels = traced_flops(traced.jaxpr, num_devices)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list | tuple) else cost or {}).get("flops", float("nan"))
  teacher = ""
  if teacher_cfg is not None:
    teacher_fwd = flops.forward_flops_per_token(teacher_cfg, T) * per_chip
    teacher = f"; the teacher's forward, not in MFU: {teacher_fwd / 1e12:.1f}"
  return [
    f"train step FLOPs per chip: model {model / 1e12:.1f} TFLOP (the trainer's MFU count: 3 x forward, "
    f"attention over visible keys {attention / 1e12:.1f}{teacher})",
    f"  traced {(outside + kernels) / 1e12:.1f} TFLOP = {outside / 1e12:.1f} XLA matmuls (backward and "
    f"remat recompute included, loops x trip count) + {kernels / 1e12:.1f} in Pallas kernels (every "
    f"grid step in full); XLA cost analysis {cost / 1e12:.1f} TFLOP (each loop body once, Pallas "
    f"kernels not seen)" + (f"; {loops} while loop(s) (e.g. on-policy sampling's decode) counted once "
                             f"per body" if (loops := while_loops(traced.jaxpr)) else ""),
  ]


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def _host_bytes(shapes: dict, shardings: dict, dtype, host: int) -> int:
  """Bytes of the distinct slices of a parameter tree that `host`'s devices hold."""
  import math

  import jax
  import numpy as np

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
  import numpy as np

  from gemma2_jax.checkpoint import hf
  from gemma2_jax.checkpoint.mapping import export_tensors
  from gemma2_jax.distill.teacher import teacher_shardings
  from gemma2_jax.model.transformer import param_shapes
  from gemma2_jax.parallel.sharding import make_mesh, process_row_blocks
  from gemma2_jax.training.optim import make_optimizer
  from gemma2_jax.training.state import state_shardings

  mesh = make_mesh(exp.mesh, devices)
  sh = state_shardings(exp, mesh, make_optimizer(exp.optimizer, 1)[0])
  blocks = process_row_blocks(sh.batch, exp.train.global_batch)
  hosts = sorted(blocks)
  groups = len(set(blocks.values()))
  rows = sum(b - a for a, b in blocks[hosts[0]])
  lines = [f"hosts: {len(hosts)} in {groups} data groups; each host feeds {rows} of "
           f"{exp.train.global_batch} rows per step ({len(hosts) // groups} hosts per group)"]

  def most(shapes, shardings, dtype):
    return max(_host_bytes(shapes, shardings, dtype, h) for h in hosts) / GiB

  if exp.init_from:
    gib = most(param_shapes(exp.model), sh.state.params, exp.model.param_dtype)
    lines.append(f"init_from: each host reads at most {gib:.2f} GiB ({exp.model.param_dtype}) of the "
                 "checkpoint (its devices' slices)")
  if exp.teacher is not None:
    tcfg = teacher_model_config(exp)
    gib = most(param_shapes(tcfg), teacher_shardings(exp.teacher, exp.rules, mesh), tcfg.param_dtype)
    lines.append(f"teacher: each host reads at most {gib:.2f} GiB "
                 f"({tcfg.param_dtype}) of the teacher checkpoint")
  specs, _ = export_tensors(exp.model, hf.entries(exp.model), {}, np.float32,
                            vocab_rows=exp.model.num_real_tokens or exp.model.vocab_size)
  biggest = max(specs, key=lambda s: int(np.prod(s[1])))
  lines.append(f"export: process 0's host holds one tensor at a time, at most "
               f"{int(np.prod(biggest[1])) * 4 / GiB:.2f} GiB (fp32 {biggest[0]})")
  return lines


SAMPLE_DEFAULTS = dict(preset=None, checkpoint=None, batch_size=8, prompt_len=None, max_new_tokens=256,
                       max_len=8192, temperature=0.0, top_k=None, top_p=None, dtype="bfloat16",
                       cache_dtype="bfloat16", mesh="")


def _parse_args(argv):
  import argparse

  parser = ArgumentParser(prog="python -m gemma2_jax.aot", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="experiment config file (configs/*.py): its train, eval and "
                                       "teacher_logits steps")
  parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4 or v5e:4x4")
  g = parser.add_argument_group("sampler", "--sample: python -m gemma2_jax.sample's prefill and decode "
                                           "(the same flags and defaults as that command)")
  g.add_argument("--sample", action="store_true", help="compile the sampler instead of a config's steps")
  g.add_argument("--preset", help="the model's shapes: gemma2_2b, gemma2_9b or gemma2_27b")
  g.add_argument("--checkpoint", help="or a checkpoint whose config file is readable here (no weights "
                                      "are read)")
  g.add_argument("--batch_size", type=int, help="prompts per generate call (default 8)")
  g.add_argument("--prompt_len", type=int, help="tokens of the longest prompt of a call (<bos> and the "
                                                "chat template included); padded to a power of two")
  g.add_argument("--max_new_tokens", type=int, help="default 256")
  g.add_argument("--max_len", type=int, help="context: prompt + max_new_tokens must fit (default 8192)")
  g.add_argument("--temperature", type=float, help="0 = greedy (default)")
  g.add_argument("--top_k", type=int)
  g.add_argument("--top_p", type=float)
  g.add_argument("--dtype", help="param/compute dtype (default bfloat16: sample's `auto` on TPU)")
  g.add_argument("--cache_dtype", help="KV cache dtype (default bfloat16)")
  g.add_argument("--mesh", help="e.g. tensor=4,data=2 (default: tensor over the kv heads, data the rest)")
  args, overrides = parse_with_overrides(parser, argv)
  given = [k for k in SAMPLE_DEFAULTS if getattr(args, k) is not None]
  for k, v in SAMPLE_DEFAULTS.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if not args.sample:
    if not args.config:
      parser.error("give --config (a job's train/eval/teacher steps) or --sample (the sampler)")
    if given:
      parser.error(f"--{given[0]} is a sampler flag: it needs --sample (and no --config)")
    return args, overrides
  checks = [
    (not args.config and not overrides, "--sample compiles the sampler of a --preset or --checkpoint; "
                                        "it takes no --config or --config.* overrides"),
    (bool(args.preset) != bool(args.checkpoint), "--sample needs one of --preset or --checkpoint"),
    (args.prompt_len is not None, "--sample needs --prompt_len (tokens of the longest prompt)"),
    (args.prompt_len is None or args.prompt_len > 0, f"--prompt_len must be positive, got {args.prompt_len}"),
    (args.batch_size > 0, f"--batch_size must be positive, got {args.batch_size}"),
    (args.max_new_tokens > 0, f"--max_new_tokens must be positive, got {args.max_new_tokens}"),
    (args.prompt_len is None or args.prompt_len + args.max_new_tokens <= args.max_len,
     f"--prompt_len {args.prompt_len} + --max_new_tokens {args.max_new_tokens} exceeds the context "
     f"--max_len {args.max_len}"),
  ]
  for ok, msg in checks:
    if not ok:
      parser.error(msg)
  return args, overrides


def _sampler_setup(args):
  """(model config, SamplingConfig, mesh sizes or None) of --sample's flags; ConfigError on bad ones."""
  import jax.numpy as jnp

  from gemma2_jax.cli.sample import SampleError, mesh_sizes
  from gemma2_jax.inference.sampler import END_OF_TURN_ID, EOS_ID, SamplingConfig
  from gemma2_jax.training.experiment import ConfigError

  for flag in ("dtype", "cache_dtype"):
    try:
      jnp.dtype(getattr(args, flag))
    except TypeError:
      raise ConfigError(f"--{flag} {getattr(args, flag)!r}: use bfloat16 or float32") from None
  try:  # the stop tokens change no shape: <eos> and <end_of_turn>, as with --chat
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, cache_dtype=args.cache_dtype,
                              stop_tokens=(EOS_ID, END_OF_TURN_ID))
    mesh = mesh_sizes(args.mesh, 1, 1) if args.mesh else None
  except (ValueError, SampleError) as e:
    raise ConfigError(str(e)) from None
  return sampler_model_config(args.preset, args.checkpoint, args.dtype), sampling, mesh


def main(argv=None) -> int:
  args, overrides = _parse_args(sys.argv[1:] if argv is None else argv)

  from gemma2_jax.checkpoint import CheckpointError
  from gemma2_jax.training.experiment import ConfigError, apply_overrides, from_config, load_config_file

  if args.sample:  # bad flags and an unreadable checkpoint are reported before libtpu is needed
    try:
      model_cfg, sampling, mesh = _sampler_setup(args)
    except (ConfigError, CheckpointError) as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      return 1
  try:
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
  except Exception as e:  # libtpu missing or an unknown topology name
    hint = ("install the tpu extra (pip install -e '.[tpu]') and use names like v5p:2x2x2 or v5e:4x4"
            if "lockfile" not in str(e) else  # another process (e.g. an aot run) holds libtpu
            "another process is using libtpu: wait for it, or run with ALLOW_MULTIPLE_LIBTPU_LOAD=1")
    print(f"error: cannot build TPU topology {args.topology!r} ({type(e).__name__}: "
          f"{' '.join(str(e).split())[:200]}); {hint}", file=sys.stderr)
    return 1
  if args.sample:
    return _sample_main(args, topology.devices, model_cfg, sampling, mesh)
  devices = topology.devices
  processes = len({d.process_index for d in devices})
  compiled, seconds = {}, {}
  try:
    exp = from_config(apply_overrides(load_config_file(args.config), overrides),
                      num_devices=len(devices))
    traced = {}

    def train_step(exp, devices):  # keeps the trace: the FLOP count reads its jaxpr
      traced["train step"] = trace_step(exp, devices)
      return traced["train step"].lower().compile()

    parts = {"train step": train_step, "eval step": compile_eval_step}
    if exp.teacher is not None:  # the same config runs teacher_logits for offline distillation
      parts["teacher_logits step"] = compile_teacher_logits_step
    for name, compile_fn in parts.items():
      start = time.perf_counter()
      try:
        compiled[name] = compile_fn(exp, devices)
        seconds[name] = time.perf_counter() - start
      except Exception as e:  # XLA refuses at compile time a program that cannot fit the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        print(f"{args.config} on {args.topology}: {name} DOES NOT FIT: {' '.join(str(e).split())[:400]}")
        return 1
  except (ConfigError, CheckpointError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  kind = devices[0].device_kind
  hbm = HBM_GIB.get(kind)
  print(f"{args.config} on {args.topology} ({len(devices)} x {kind}, {processes} hosts), mesh {exp.mesh}, "
        f"mode {exp.distill_mode}, B={exp.train.global_batch} T={exp.train.seq_len}")
  print("\n".join(host_plan(exp, devices)))
  teacher_cfg = teacher_model_config(exp) if exp.distill_mode == "online" else None
  print("\n".join(flops_report(exp, traced["train step"], compiled["train step"], len(devices), teacher_cfg)))
  too_big = None
  for name, c in compiled.items():
    line, fits = memory_line(name, c, hbm, seconds[name])
    print(line)
    too_big = too_big or (None if fits else name)
  if too_big:
    print(f"error: the {too_big} does not fit {kind} HBM on {args.topology}", file=sys.stderr)
    return 1
  return 0


def _sample_main(args, devices, model_cfg, sampling, mesh) -> int:
  name = f"{args.preset or args.checkpoint} on {args.topology}"
  try:
    programs = compile_sampler(model_cfg, devices, batch_size=args.batch_size,
                               prompt_len=args.prompt_len, sampling=sampling, mesh=mesh)
  except ValueError as e:  # a --mesh that does not match the slice's chips
    if not str(e).startswith("mesh:"):
      raise
    print(f"error: --mesh {args.mesh!r} on {args.topology}: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # XLA refuses at compile time a program that cannot fit the chip's HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(f"sampler {name}: DOES NOT FIT: {' '.join(str(e).split())[:400]}")
    return 1
  lines, too_big = sampler_report(programs, model_cfg, name, batch_size=args.batch_size,
                                  sampling=sampling)
  print("\n".join(lines))
  if too_big:
    print(f"error: the sampler's {too_big} does not fit {devices[0].device_kind} HBM on "
          f"{args.topology}", file=sys.stderr)
    return 1
  return 0

