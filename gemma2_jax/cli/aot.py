"""Compile a job's programs ahead of time for a TPU slice; report per-chip memory, compile time and
the train step's FLOPs per chip (the trainer's MFU count against a count of the traced step's matmuls).

  pip install -e ".[tpu]"        # libtpu: lets this CPU host compile for TPU topologies
  python -m gemma2_jax.aot --config=configs/distill_9b.py --topology=v5p:4x4x4 \
      --config.teacher.preset=gemma2_27b [--config.a.b=v ...]
  python -m gemma2_jax.aot --sample (--preset=gemma2_27b | --checkpoint=PATH) --topology=v5p:2x2x1 \
      --batch_size=64 --prompt_len=2048 --max_new_tokens=1024 [--cache_dtype=bfloat16] [--mesh=tensor=4]

A config compiles its train step, eval step and (with a teacher) teacher_logits step. A single chip
(--topology=v6e:1x1, v5e:1x1) is a topology too: one accelerator (configs/lora_ko_9b.py). `--sample`
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

import sys

from gemma2_jax.cli.common import ArgumentParser, dtype_flag, parse_with_overrides

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
  parser.add_argument("--topk", type=int, default=128,
                      help="teacher_logits' --topk (its step; and offline records' k when not readable)")
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
  g.add_argument("--dtype", type=dtype_flag(),
                 help="param/compute dtype (default bfloat16: sample's `auto` on TPU)")
  g.add_argument("--cache_dtype", type=dtype_flag(), help="KV cache dtype (default bfloat16)")
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
  from gemma2_jax.data.tokenizer import END_OF_TURN_ID, EOS_ID
  from gemma2_jax.inference.generation import SampleError, mesh_sizes
  from gemma2_jax.inference.sampler import SamplingConfig
  from gemma2_jax.training.experiment import ConfigError

  try:  # the stop tokens change no shape: <eos> and <end_of_turn>, as with --chat
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, cache_dtype=args.cache_dtype,
                              stop_tokens=(EOS_ID, END_OF_TURN_ID))
    mesh = mesh_sizes(args.mesh, 1, 1) if args.mesh else None
  except (ValueError, SampleError) as e:
    raise ConfigError(str(e)) from None
  from gemma2_jax.training.preflight import sampler_model_config

  return sampler_model_config(args.preset, args.checkpoint, args.dtype), sampling, mesh



def main(argv=None) -> int:
  args, overrides = _parse_args(sys.argv[1:] if argv is None else argv)

  from gemma2_jax.errors import UserError

  if args.sample:  # bad flags and an unreadable checkpoint are reported before libtpu is needed
    try:
      model_cfg, sampling, mesh = _sampler_setup(args)
    except UserError as e:
      return _error(e)
  try:
    topology = _topology(args.topology)
  except Exception as e:  # libtpu missing or an unknown topology name
    hint = ("install the tpu extra (pip install -e '.[tpu]') and use names like v5p:2x2x2 or v5e:4x4"
            if "lockfile" not in str(e) else  # another process (e.g. an aot run) holds libtpu
            "another process is using libtpu: wait for it, or run with ALLOW_MULTIPLE_LIBTPU_LOAD=1")
    print(f"error: cannot build TPU topology {args.topology!r} ({type(e).__name__}: "
          f"{' '.join(str(e).split())[:200]}); {hint}", file=sys.stderr)
    return 1
  if args.sample:
    return _sample_main(args, topology.devices, model_cfg, sampling, mesh)
  try:
    return _config_main(args, overrides, topology.devices)
  except UserError as e:
    return _error(e)


def _topology(name: str):
  """The TPU topology `name`; one smaller than libtpu's default host (2x2x1 chips), such as a single
  chip (v6e:1x1, v5e:1x1: one accelerator, e.g. configs/lora_ko_9b.py), is one host of its own size."""
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:
    if "chips_per_host_bounds" not in str(e):
      raise
    dims = [int(d) for d in name.partition(":")[2].split("x")]
    if len(dims) not in (2, 3) or dims[0] * dims[1] > 4:
      raise
    bounds = (*dims, 1) if len(dims) == 2 else tuple(dims)
    return topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=bounds)


def _error(e: BaseException) -> int:
  print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
  return 1


def _does_not_fit(e: Exception) -> str | None:
  """XLA refuses at compile time a program that cannot fit the chip's HBM: its message, else None."""
  return " ".join(str(e).split())[:400] if "RESOURCE_EXHAUSTED" in str(e) else None


def _config_main(args, overrides, devices) -> int:
  from gemma2_jax.parallel.sharding import num_slices
  from gemma2_jax.training import preflight
  from gemma2_jax.training.experiment import apply_overrides, from_config, load_config_file

  exp = from_config(apply_overrides(load_config_file(args.config), overrides), num_devices=len(devices),
                    num_slices=num_slices(devices))
  compiled = {}
  for program in preflight.job_programs(exp, devices, topk=args.topk):
    try:
      compiled.update(preflight.compile_programs([program]))
    except Exception as e:
      if (why := _does_not_fit(e)) is None:
        raise
      print(f"{args.config} on {args.topology}: {program.name} DOES NOT FIT: {why}")
      return 1
  kind = devices[0].device_kind
  hbm = preflight.HBM_GIB.get(kind)
  print(f"{args.config} on {args.topology} ({len(devices)} x {kind}, "
        f"{len({d.process_index for d in devices})} hosts), mesh {exp.mesh}, mode {exp.distill_mode}, "
        f"B={exp.train.global_batch} T={exp.train.seq_len}")
  print("\n".join(preflight.host_plan(exp, devices)))
  teacher_cfg = preflight.teacher_config(exp) if exp.distill_mode == "online" else None
  traced, train_compiled, _ = compiled["train step"]
  print("\n".join(preflight.flops_report(exp, traced, train_compiled, len(devices), teacher_cfg)))
  print("\n".join(preflight.roofline_report(exp, traced, train_compiled, devices, teacher_cfg)))
  too_big = None
  for name, (_, c, seconds) in compiled.items():
    line, fits = preflight.memory_line(name, c, hbm, seconds)
    print(line)
    too_big = too_big or (None if fits else name)
  if too_big:
    print(f"error: the {too_big} does not fit {kind} HBM on {args.topology}", file=sys.stderr)
    return 1
  return 0


def _sample_main(args, devices, model_cfg, sampling, mesh_sizes) -> int:
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, make_mesh
  from gemma2_jax.training import preflight

  name = f"{args.preset or args.checkpoint} on {args.topology}"
  try:
    mesh = make_mesh(mesh_sizes or default_mesh(model_cfg.num_kv_heads, len(devices)), devices)
    programs = preflight.compile_sampler(model_cfg, mesh, DEFAULT_RULES, batch_size=args.batch_size,
                                         prompt_len=args.prompt_len, sampling=sampling)
  except ValueError as e:  # a --mesh that does not match the slice's chips
    if not str(e).startswith("mesh:"):
      raise
    print(f"error: --mesh {args.mesh!r} on {args.topology}: {e}", file=sys.stderr)
    return 1
  except Exception as e:
    if (why := _does_not_fit(e)) is None:
      raise
    print(f"sampler {name}: DOES NOT FIT: {why}")
    return 1
  lines, too_big = preflight.sampler_report(programs, model_cfg, name, batch_size=args.batch_size,
                                            sampling=sampling)
  print("\n".join(lines))
  if too_big:
    print(f"error: the sampler's {too_big} does not fit {devices[0].device_kind} HBM on "
          f"{args.topology}", file=sys.stderr)
    return 1
  return 0


def default_mesh(num_kv_heads: int, num_devices: int) -> dict[str, int]:
  """`sample`'s default mesh: tensor over the kv heads, data the rest."""
  from gemma2_jax.inference.generation import mesh_sizes

  return mesh_sizes("", num_kv_heads, num_devices)
