"""Compile the real train step ahead of time for a TPU slice and report per-chip memory.

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
  if t.preset:
    cfg = get_preset(t.preset)
  else:
    try:
      cfg = checkpoint.read_config(t.checkpoint)
    except checkpoint.CheckpointError as e:
      raise ConfigError(f"teacher checkpoint {t.checkpoint} is not readable here ({e}); give its "
                        "shapes with --config.teacher.preset=gemma2_27b (or gemma2_9b, gemma2_2b)") from None
  return teacher_runtime_config(exp, cfg)


def compile_step(exp, devices):
  """Lowers and compiles make_train_step for `devices`; returns the compiled executable."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding

  from gemma2_jax.model.transformer import param_shapes
  from gemma2_jax.optim import make_optimizer
  from gemma2_jax.sharding import activation_sharding, logical_to_spec, make_mesh
  from gemma2_jax.trainer import (
    TOPK_KEYS,
    abstract_state,
    make_train_step,
    state_shardings,
    teacher_shardings,
  )

  mesh = make_mesh(exp.mesh, devices)
  tx, schedule = make_optimizer(exp.optimizer, exp.train.steps)
  sh = state_shardings(exp, mesh, tx)
  S = jax.ShapeDtypeStruct
  state = abstract_state(exp, tx, sh)
  B, T = exp.train.global_batch, exp.train.seq_len
  batch = {k: S((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh.batch)
           for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
  teacher_cfg = teacher = None
  if exp.distill_mode == "online":
    teacher_cfg = teacher_model_config(exp)
    teacher = jax.tree.map(lambda s, shard: S(s, jnp.dtype(teacher_cfg.param_dtype), sharding=shard),
                           param_shapes(teacher_cfg), teacher_shardings(exp, mesh),
                           is_leaf=lambda x: isinstance(x, tuple))
  elif exp.distill_mode == "offline":
    k = 128
    spec = NamedSharding(mesh, logical_to_spec(("batch", "length", None), exp.rules))
    batch |= {TOPK_KEYS[0]: S((B, T, k), jnp.float32, sharding=spec),
              TOPK_KEYS[1]: S((B, T, k), jnp.int32, sharding=spec)}
  step = make_train_step(exp, tx, schedule, teacher_cfg)
  with activation_sharding(mesh, exp.rules):
    lowered = jax.jit(step, out_shardings=(sh.state, sh.replicated), donate_argnums=0).lower(
      state, batch, teacher)
  return lowered.compile()


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
  try:
    exp = from_config(apply_overrides(load_config_file(args.config), overrides),
                      num_devices=len(devices))
    compiled = compile_step(exp, devices)
  except (ConfigError, CheckpointError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except Exception as e:  # XLA refuses at compile time a program that cannot fit the chip's HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(f"{args.config} on {args.topology}: DOES NOT FIT: {' '.join(str(e).split())[:400]}")
    return 1
  m = compiled.memory_analysis()
  kind = devices[0].device_kind
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  hbm = HBM_GIB.get(kind)
  print(f"{args.config} on {args.topology} ({len(devices)} x {kind}, {processes} hosts), mesh {exp.mesh}, "
        f"mode {exp.distill_mode}, B={exp.train.global_batch} T={exp.train.seq_len}")
  print(f"per chip: arguments {m.argument_size_in_bytes / GiB:.2f} GiB, outputs "
        f"{m.output_size_in_bytes / GiB:.2f} GiB (aliased {m.alias_size_in_bytes / GiB:.2f}), temporaries "
        f"{m.temp_size_in_bytes / GiB:.2f} GiB -> peak {total / GiB:.2f} GiB"
        + (f" of {hbm} GiB HBM: {'fits' if total <= hbm * GiB else 'DOES NOT FIT'}" if hbm else ""))
  return 0 if hbm is None or total <= hbm * GiB else 1


if __name__ == "__main__":
  sys.exit(main())
