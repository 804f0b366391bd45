"""`python -m gemma2_jax.teacher_logits --config=configs/<x>.py --output_dir=DIR [--topk=128]
[--max_rows=N] [--config.a.b=v ...]`

Runs the config's teacher (section `teacher`: checkpoint, dtype, preset) once over one epoch of the
packed rows of `data.train` in order (no shuffle; the last partial batch included) and writes, per
row, the teacher's top-k log-probs and ids of every position, with the row itself, as ArrayRecord
shards + meta.json (layout and sizes: gemma2_jax/data/offline.py). Train on them with
`--config.distill.offline_paths=DIR`; the trainer shuffles the rows.

Logits are built per sequence chunk of `train.loss_chunk` tokens and reduced to top-k at once, so a
[B, T, V] logits tensor never exists. Multi-host: as for training (`--distributed` or
`--coordinator_address/--num_processes/--process_id`); each data group of processes writes its rows
to `output_dir/part-*` (see `training.teacher_logits.run`). A non-empty output_dir is refused (an
unfinished output of the same settings is continued); bad input is one `error: ...` line, exit 1.
"""

from __future__ import annotations

import argparse
import sys

from gemma2_jax.cli.common import ArgumentParser, add_distributed_flags, parse_with_overrides, run_job


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.teacher_logits", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--output_dir", required=True, help="new or empty directory for the records")
  parser.add_argument("--topk", type=int, default=128, help="teacher tokens kept per position")
  parser.add_argument("--max_rows", type=int, default=None, help="stop after this many packed rows")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="rows per teacher forward (default: one per batch shard of the mesh)")
  parser.add_argument("--rows_per_shard", type=int, default=1024,
                      help="rows per record file; a stopped run re-run continues after its last "
                           "complete file")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  add_distributed_flags(parser)
  args, overrides = parse_with_overrides(parser, argv)
  if args.topk < 1:
    parser.error(f"--topk must be >= 1, got {args.topk}")
  if args.max_rows is not None and args.max_rows < 1:
    parser.error(f"--max_rows must be >= 1, got {args.max_rows}")
  if args.rows_per_shard < 1:
    parser.error(f"--rows_per_shard must be >= 1, got {args.rows_per_shard}")
  if args.batch_size is not None and args.batch_size < 1:
    parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
  return args, overrides


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  out = args.output_dir

  def write() -> int:
    import jax

    from gemma2_jax.training.teacher_logits import write_teacher_logits

    meta = write_teacher_logits(args.config, overrides, out, k=args.topk, max_rows=args.max_rows,
                                batch_size=args.batch_size, progress=not args.no_progress,
                                rows_per_shard=args.rows_per_shard)
    if meta is not None and jax.process_index() == 0:
      q = meta["quantization"]
      parts = f" (part {meta['part'] + 1} of {meta['parts']})" if meta["parts"] > 1 else ""
      print(f"done{parts}: {meta['rows']} rows, {meta['tokens']} tokens, k={meta['k']}, "
            f"{meta['record_bytes_per_token']:.1f} bytes/token ({meta['bytes_per_token']:.1f} with "
            f"the files' fixed overhead), max |dequant - logprob| = {q['max_abs_error']:.2g}; "
            f"output_dir={out}")
    return 0

  return run_job(args, write)
