"""Convert Gemma 2 weights between formats, streaming tensor by tensor.

  python -m gemma2_jax.convert --src /ckpt/gemma-2-9b --dst /ckpt/gemma-2-9b-native --to native
  python -m gemma2_jax.convert --src /ckpt/kaggle-9b --dst /ckpt/gemma-2-9b-hf --to hf --dtype bfloat16

The source format (HF safetensors dir, Kaggle Flax/Orbax, native) is detected. `--dst` must not exist
(or be an empty directory): an existing checkpoint is never overwritten.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm import tqdm

from gemma2_jax.checkpoint import FORMATS, CheckpointError, load_params, save_params


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gemma2_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="checkpoint directory to read")
  parser.add_argument("--dst", required=True, help="new directory to write")
  parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
  parser.add_argument("--dtype", default=None,
                      help="dtype of the written tensors (default: the source's parameter dtype, "
                           "float32 for HF/native sources loaded without one)")
  parser.add_argument("--max_shard_gb", type=float, default=5.0, help="HF output shard size")
  args = parser.parse_args(argv)
  try:
    dtype = np.dtype(args.dtype or "float32")
  except TypeError:
    print(f"error: unknown --dtype {args.dtype!r}; use float32, bfloat16 or float16",
          file=sys.stderr)
    return 2
  try:
    with tqdm(desc="read", unit="tensor") as bar:
      cfg, params = load_params(args.src, dtype, progress=bar)
    kwargs = {"max_shard_bytes": int(args.max_shard_gb * 1e9)} if args.to == "hf" else {}
    with tqdm(desc="write", unit="tensor") as bar:
      out = save_params(params, cfg, args.dst, args.to, dtype, progress=bar, **kwargs)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.to} checkpoint of a {cfg.num_layers}-layer d={cfg.d_model} Gemma 2 "
        f"({cfg.num_params():,} params, {dtype.name}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
