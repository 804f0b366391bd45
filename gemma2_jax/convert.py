"""Convert Gemma 2 weights between formats, streaming tensor by tensor.

  python -m gemma2_jax.convert --src /ckpt/gemma-2-9b --dst /ckpt/gemma-2-9b-native --to native
  python -m gemma2_jax.convert --src /ckpt/kaggle-9b --dst /ckpt/gemma-2-9b-hf --to hf \\
      --dtype bfloat16

The source format (HF safetensors dir, Kaggle Flax/Orbax, native) is detected. `--dst` must not
exist (or be an empty directory): an existing checkpoint is never overwritten.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm import tqdm

from gemma2_jax.checkpoint import (
  FORMATS,
  CheckpointError,
  load_params,
  save_params,
  stored_dtype,
)
from gemma2_jax.cli import ArgumentParser


def main(argv=None) -> int:
  parser = ArgumentParser(prog="python -m gemma2_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="checkpoint directory to read")
  parser.add_argument("--dst", required=True, help="new directory to write")
  parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
  parser.add_argument("--dtype", default=None,
                      help="dtype of the written tensors (default: the dtype the source stores)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0, help="HF output shard size")
  args = parser.parse_args(argv)
  if args.dtype is not None:
    try:
      np.dtype(args.dtype)
    except TypeError:
      parser.error(f"unknown --dtype {args.dtype!r}; use float32, bfloat16 or float16")
  if args.max_shard_gb <= 0:
    parser.error("--max_shard_gb must be positive")
  try:
    # Reading in the stored dtype keeps the in-memory copy the size of the checkpoint itself.
    dtype = np.dtype(args.dtype) if args.dtype else stored_dtype(args.src)
    # Bars only on a terminal: piped stderr (CI, tests) then carries just the error line.
    with tqdm(desc="read", unit="tensor", disable=None) as bar:
      cfg, params = load_params(args.src, dtype, progress=bar)
    kwargs = {"max_shard_bytes": int(args.max_shard_gb * 1e9)} if args.to == "hf" else {}
    with tqdm(desc="write", unit="tensor", disable=None) as bar:
      out = save_params(params, cfg, args.dst, args.to, dtype, progress=bar, **kwargs)
  except (CheckpointError, OSError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 1
  print(f"wrote {args.to} checkpoint of a {cfg.num_layers}-layer d={cfg.d_model} Gemma 2 "
        f"({cfg.num_params():,} params, {dtype.name}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
