"""Convert Gemma 2 weights between formats, streaming tensor by tensor.

  python -m gemma2_jax.convert --src /ckpt/gemma-2-9b --dst /ckpt/gemma-2-9b-native --to native
  python -m gemma2_jax.convert --src /ckpt/kaggle-9b --dst /ckpt/gemma-2-9b-hf --to hf \\
      --dtype bfloat16

The source format (HF safetensors dir, Kaggle Flax/Orbax, native) is detected. `--dst` must not
exist (or be an empty directory): an existing checkpoint is never overwritten. A Kaggle tree stores
no config: one of release shapes is read as that release, any other needs `--preset` or
`--model_config` (a JSON file of ModelConfig fields, e.g. a native checkpoint's gemma2_jax.json).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm import tqdm

from gemma2_jax.checkpoint import (
  FORMATS,
  CheckpointError,
  check_config,
  load_params,
  save_params,
  stored_dtype,
)
from gemma2_jax.cli.common import ArgumentParser
from gemma2_jax.model.config import PRESETS, ModelConfig, get_preset

# Weights are floats: a cast to an integer type would write zeros (silently) and complex is meaningless.
DTYPES = ("float32", "bfloat16", "float16")


def _model_config(path: str) -> ModelConfig:
  """A JSON file of ModelConfig fields, bare or under "model" (gemma2_jax.json, a workdir's config)."""
  import json

  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"--model_config {path}: not valid JSON ({e})") from None
  if isinstance(d, dict) and isinstance(d.get("model"), dict):
    d = d["model"]
  if not isinstance(d, dict):
    raise CheckpointError(f"--model_config {path}: expected a JSON object of ModelConfig fields")
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"--model_config {path}: {e}") from None


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m gemma2_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="checkpoint directory to read")
  parser.add_argument("--dst", required=True, help="new directory to write")
  parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
  parser.add_argument("--dtype", default=None, choices=DTYPES,
                      help="dtype of the written tensors (default: the dtype the source stores)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0, help="HF output shard size")
  config = parser.add_mutually_exclusive_group()
  config.add_argument("--preset", choices=sorted(PRESETS),
                      help="model config of the source (needed for a Kaggle tree of non-release "
                           "shapes; checked against the config an HF/native source stores)")
  config.add_argument("--model_config", help="JSON file of ModelConfig fields, as --preset")
  args = parser.parse_args(argv)
  if args.max_shard_gb <= 0:
    parser.error("--max_shard_gb must be positive")
  try:
    model_cfg = None
    if args.preset or args.model_config:
      model_cfg = get_preset(args.preset) if args.preset else _model_config(args.model_config)
      check_config(args.src, model_cfg, what="--src",
                   fix="it stores its own config: leave out --preset / --model_config")
    # Reading in the stored dtype keeps the in-memory copy the size of the checkpoint itself.
    dtype = np.dtype(args.dtype) if args.dtype else stored_dtype(args.src)
    if dtype.name not in DTYPES:
      raise CheckpointError(f"{args.src} stores {dtype.name} weights; give --dtype ({', '.join(DTYPES)})")
    # Bars only on a terminal: piped stderr (CI, tests) then carries just the error line.
    with tqdm(desc="read", unit="tensor", disable=None) as bar:
      cfg, params = load_params(args.src, dtype, config=model_cfg, progress=bar)
    kwargs = {"max_shard_bytes": int(args.max_shard_gb * 1e9)} if args.to == "hf" else {}
    with tqdm(desc="write", unit="tensor", disable=None) as bar:
      out = save_params(params, cfg, args.dst, args.to, dtype, progress=bar, **kwargs)
  except (CheckpointError, OSError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 1
  print(f"wrote {args.to} checkpoint of a {cfg.num_layers}-layer d={cfg.d_model} Gemma 2 "
        f"({cfg.num_params():,} params, {dtype.name}) to {out}")
  return 0

