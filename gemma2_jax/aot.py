"""Compile the real train step ahead of time for a TPU slice; report per-chip memory, compile time and
the step's FLOPs per chip (the trainer's MFU count against a count of the traced step's matmuls).

  pip install -e ".[tpu]"        # libtpu: lets this CPU host compile for TPU topologies
  python -m gemma2_jax.aot --config=configs/distill_9b.py --topology=v5p:4x4x4 \\
      --config.teacher.preset=gemma2_27b [--config.a.b=v ...]

Nothing is allocated and no checkpoint is read: params, optimizer state, the teacher and the batch are
abstract (shapes + shardings on the slice's mesh). The teacher's shapes come from `teacher.preset`, or
from the config file of its checkpoint when that is readable here. Exit code 0 if the step fits the
chip's HBM, 1 if it does not (or on bad input, with one `error:` line).
"""

from __future__ import annotations

import sys
import time

from gemma2_jax.cli import ArgumentParser, parse_with_overrides

HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95,
           "TPU v6 lite": 32, "TPU v6e": 32}
GiB = 2**30


def teacher_model_config(exp):
  """The teacher's shapes without its weights: a preset, or its checkpoint's config file."""
  from gemma2_jax import checkpoint
  from gemma2_jax.experiment import ConfigError
  from gemma2_jax.model.config import get_preset
  from gemma2_jax.trainer import teacher_runtime_config

  t = exp.teacher
  if t.preset:  # shapes only: the vocab is the student's (one tokenizer; the presets' is 256128)
    cfg = get_preset(t.preset).replace(vocab_size=exp.model.vocab_size)
  else:
    try:
      cfg = checkpoint.read_config(t.checkpoint)
    except checkpoint.CheckpointError as e:
      raise ConfigError(f"teacher checkpoint {t.checkpoint} is not readable here ({e}); give its "
                        "shapes with --config.teacher.preset=gemma2_27b (or gemma2_9b, gemma2_2b)") from None
  return teacher_runtime_config(exp, cfg)


def _abstract_inputs(exp, devices):
  """Mesh, shardings, abstract train state and batch (with the config's shardings), teacher."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding

  from gemma2_jax.optim import make_optimizer
  from gemma2_jax.sharding import logical_to_spec, make_mesh
  from gemma2_jax.trainer import TOPK_KEYS, abstract_state, state_shardings

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

  from gemma2_jax.model.transformer import param_shapes
  from gemma2_jax.trainer import teacher_shardings

  return jax.tree.map(
    lambda s, shard: jax.ShapeDtypeStruct(s, jnp.dtype(teacher_cfg.param_dtype), sharding=shard),
    param_shapes(teacher_cfg), teacher_shardings(exp, mesh), is_leaf=lambda x: isinstance(x, tuple))


def trace_step(exp, devices):
  """Traces make_train_step for `devices` (a jax.stages.Traced: its jaxpr, then .lower().compile())."""
  import jax

  from gemma2_jax.sharding import activation_sharding
  from gemma2_jax.trainer import BATCH_KEYS, TOPK_KEYS, make_train_step

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

  from gemma2_jax.sharding import activation_sharding
  from gemma2_jax.trainer import BATCH_KEYS, make_eval_step

  mesh, _, _, sh, state, batch, _, _ = _abstract_inputs(exp, devices)
  batch = {k: v for k, v in batch.items() if k in (*BATCH_KEYS, "target_bytes")}
  with activation_sharding(mesh, exp.rules):
    lowered = jax.jit(make_eval_step(exp), out_shardings=sh.replicated).lower(state.params, batch)
  return lowered.compile()


def compile_teacher_logits_step(exp, devices, k: int = 128):
  """Lowers and compiles `python -m gemma2_jax.teacher_logits`'s step (default rows per forward)."""
  import jax
  import jax.numpy as jnp

  from gemma2_jax.sharding import activation_sharding, make_mesh
  from gemma2_jax.teacher_logits import topk_step

  mesh = make_mesh(exp.mesh, devices)
  teacher_cfg = teacher_model_config(exp)
  teacher = _abstract_teacher(exp, mesh, teacher_cfg)
  step, batch_sharding, B = topk_step(exp, teacher_cfg, mesh, k)
  rows = jax.ShapeDtypeStruct((B, exp.train.seq_len), jnp.int32, sharding=batch_sharding)
  with activation_sharding(mesh, exp.rules):
    return step.lower(teacher, rows, rows, rows).compile()


def traced_flops(jaxpr, num_devices: int) -> tuple[float, float]:
  """FLOPs per chip of every matmul in a traced step: (outside Pallas kernels, inside them).

  XLA's cost analysis counts each while-loop body once, so it misses the scanned layers, micro-batches
  and loss chunks; this walks the step's jaxpr (what XLA compiles: the backward pass and remat's
  recomputation included) and multiplies scan bodies by their length. Outside shard_map the shapes are
  global (divided by the chips); inside, per chip. A Pallas kernel counts its body once per grid
  step, with every conditional block computed: an upper bound for kernels that skip masked blocks.
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


def flops_report(exp, traced, compiled, num_devices: int, teacher_cfg=None) -> list[str]:
  """The train step's FLOPs per chip: the model FLOPs the trainer's MFU uses, the traced count, and
  XLA's cost analysis."""
  from gemma2_jax import flops

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
    f"kernels not seen)",
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
  from gemma2_jax.model.transformer import param_shapes
  from gemma2_jax.optim import make_optimizer
  from gemma2_jax.sharding import make_mesh, process_row_blocks
  from gemma2_jax.trainer import state_shardings, teacher_shardings

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
    lines.append(f"teacher: each host reads at most "
                 f"{most(param_shapes(tcfg), teacher_shardings(exp, mesh), tcfg.param_dtype):.2f} GiB "
                 f"({tcfg.param_dtype}) of the teacher checkpoint")
  specs, _ = export_tensors(exp.model, hf.entries(exp.model), {}, np.float32,
                            vocab_rows=exp.model.num_real_tokens or exp.model.vocab_size)
  biggest = max(specs, key=lambda s: int(np.prod(s[1])))
  lines.append(f"export: process 0's host holds one tensor at a time, at most "
               f"{int(np.prod(biggest[1])) * 4 / GiB:.2f} GiB (fp32 {biggest[0]})")
  return lines


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m gemma2_jax.aot", description=__doc__,
                          formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4 or v5e:4x4")
  args, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)

  from gemma2_jax.checkpoint import CheckpointError
  from gemma2_jax.experiment import ConfigError, apply_overrides, from_config, load_config_file

  try:
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
  except Exception as e:  # libtpu missing or an unknown topology name
    print(f"error: cannot build TPU topology {args.topology!r} ({type(e).__name__}: "
          f"{' '.join(str(e).split())[:200]}); install the tpu extra (pip install -e '.[tpu]') and use "
          "names like v5p:2x2x2 or v5e:4x4", file=sys.stderr)
    return 1
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
    m, total = c.memory_analysis(), peak_bytes(c)
    fits = hbm is None or total <= hbm * GiB
    too_big = too_big or (None if fits else name)
    print(f"{name} per chip: arguments {m.argument_size_in_bytes / GiB:.2f} GiB, outputs "
          f"{m.output_size_in_bytes / GiB:.2f} GiB (aliased {m.alias_size_in_bytes / GiB:.2f}), "
          f"temporaries {m.temp_size_in_bytes / GiB:.2f} GiB -> peak {total / GiB:.2f} GiB"
          + (f" of {hbm} GiB HBM: {'fits' if fits else 'DOES NOT FIT'}" if hbm else "")
          + f" (traced and compiled in {seconds[name]:.0f} s)")
  if too_big:
    print(f"error: the {too_big} does not fit {kind} HBM on {args.topology}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
