"""Convert Gemma 2 weights between formats, streaming tensor by tensor.

  python -m gemma2_jax.convert --src /ckpt/gemma-2-9b --dst /ckpt/gemma-2-9b-native --to native
  python -m gemma2_jax.convert --src /ckpt/kaggle-9b --dst /ckpt/gemma-2-9b-hf --to hf \\
      --dtype bfloat16
  python -m gemma2_jax.convert --src /ckpt/gemma-2-9b --merge_lora runs/lora/peft_step1000 \\
      --dst /ckpt/gemma-2-9b-ko-merged --to hf --dtype bfloat16

The source format (HF safetensors dir, Kaggle Flax/Orbax, native) is detected. `--dst` must not
exist (or be an empty directory): an existing checkpoint is never overwritten. A Kaggle tree stores
no config: one of release shapes is read as that release, any other needs `--preset` or
`--model_config` (a JSON file of ModelConfig fields, e.g. a native checkpoint's gemma2_jax.json).
`--merge_lora` merges a PEFT LoRA adapter of the source model (a LoRA run's `peft_step<N>`, or one
peft wrote) into the weights it writes.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from gemma2_jax.checkpoint import FORMATS
from gemma2_jax.checkpoint.convert import convert, read_model_config
from gemma2_jax.cli.common import ArgumentParser, dtype_flag
from gemma2_jax.errors import UserError
from gemma2_jax.model.config import PRESETS, get_preset


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.convert", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="checkpoint directory to read")
  parser.add_argument("--dst", required=True, help="new directory to write")
  parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
  parser.add_argument("--dtype", default=None, type=dtype_flag(),
                      help="dtype of the written tensors (default: the dtype the source stores)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0, help="HF output shard size")
  parser.add_argument("--merge_lora", default=None, metavar="ADAPTER_DIR",
                      help="a PEFT LoRA adapter directory to merge into the weights written")
  config = parser.add_mutually_exclusive_group()
  config.add_argument("--preset", choices=sorted(PRESETS),
                      help="model config of the source (needed for a Kaggle tree of non-release "
                           "shapes; checked against the config an HF/native source stores)")
  config.add_argument("--model_config", help="JSON file of ModelConfig fields, as --preset")
  args = parser.parse_args(argv)
  if args.max_shard_gb <= 0:
    parser.error("--max_shard_gb must be positive")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    model_cfg = get_preset(args.preset) if args.preset else (
      read_model_config(args.model_config) if args.model_config else None)
    # Bars only on a terminal: piped stderr (CI, tests) then carries just the error line.
    cfg, dtype, out = convert(args.src, args.dst, args.to, dtype=args.dtype, config=model_cfg,
                              max_shard_bytes=int(args.max_shard_gb * 1e9),
                              progress=lambda phase: tqdm(desc=phase, unit="tensor", disable=None),
                              merge_lora=args.merge_lora)
  except (UserError, OSError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 1
  merged = f", {args.merge_lora} merged in" if args.merge_lora else ""
  print(f"wrote {args.to} checkpoint of a {cfg.num_layers}-layer d={cfg.d_model} Gemma 2 "
        f"({cfg.num_params():,} params, {dtype.name}{merged}) to {out}")
  return 0
