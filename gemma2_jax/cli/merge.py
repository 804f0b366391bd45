"""`python -m gemma2_jax.merge --config merge.yaml --output DIR [--to hf|native] [--liti ETA[,ETA...]]
[--seed N] [--max_shard_gb G]`

Merges Gemma 2 checkpoints with a mergekit-style YAML (the same keys where they mean the same):

  merge_method: ties            # linear, task_arithmetic, slerp, nuslerp, ties, dare_linear,
  base_model: /ckpt/gemma-2-2b  #   dare_ties, model_stock
  models:
    - model: /ckpt/sft-ko
      parameters: {weight: [0.3, 0.7], density: 0.5}   # a list: a gradient over the layers
    - model: /runs/sft-code                            # any format: HF, Kaggle, native, a workdir
      parameters:
        weight: [{filter: mlp, value: 0.8}, {value: 0.5}]  # by tensor kind (part of the HF name)
        density: 0.5
  parameters: {normalize: true}
  dtype: float32                # inputs rounded to it; the output dtype unless out_dtype is given

The models must be one architecture with one vocabulary (the first differing config field is named).
Tensors are read, merged and written a block of rows at a time: memory stays at a few blocks per
model. `--liti 0.3,0.6,1` writes WARP's LITI interpolations (1 - eta) theta_base + eta theta_merged,
one checkpoint per eta under DIR/eta_<eta>. `--seed` seeds DARE's random drops. DIR must not exist
(or be empty); nothing is left there when the merge fails. See README "Merging".
"""

from __future__ import annotations

import argparse

from gemma2_jax.cli.common import ArgumentParser, run_job


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.merge", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="merge YAML (mergekit's keys)")
  parser.add_argument("--output", required=True, help="new directory to write")
  parser.add_argument("--to", default="hf", choices=("hf", "native"), help="output format")
  parser.add_argument("--liti", default=None,
                      help="comma-separated etas: write (1 - eta) base + eta merge for each")
  parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
  parser.add_argument("--max_shard_gb", type=float, default=5.0, help="HF output shard size")
  args = parser.parse_args(argv)
  if args.max_shard_gb <= 0:
    parser.error("--max_shard_gb must be positive")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)

  def body() -> int:
    from tqdm import tqdm

    from gemma2_jax.merging import load_config, merge, parse_etas

    etas = parse_etas(args.liti) if args.liti is not None else None
    config = load_config(args.config)
    # A bar only on a terminal: piped stderr (CI, tests) then carries just the error line.
    with tqdm(desc="merge", unit="tensor", disable=None) as bar:
      outs = merge(config, args.output, to=args.to, liti=etas, seed=args.seed,
                   max_shard_bytes=int(args.max_shard_gb * 1e9), progress=bar)
    inputs = len(config.inputs)
    for out in outs:
      print(f"wrote {args.to} checkpoint: {config.method.name} of {inputs} models"
            + (f" (LITI eta={out.name[len('eta_'):]})" if etas else "") + f" to {out}")
    return 0

  return run_job(args, body)

