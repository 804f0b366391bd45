"""`python -m gemma2_jax.evaluate --checkpoint PATH [--tokenizer PATH] --data GLOB [--format F]
[--seq_len N] [--batch N] [--max_batches N] [--output FILE.json]`

Loss, perplexity, bits per byte (tokenizer independent), next-token accuracy and token count of a
checkpoint (HF, Kaggle, native or a training workdir) on a corpus, in one deterministic pass of
packed rows, sharded over the mesh (`--mesh`, default: the batch over every device). The trainer's
periodic eval runs the same step and reduction (`make_eval_step`, `run_eval`). Bad input is one
`error: ...` line and exit 1.
"""

from __future__ import annotations

import argparse
import sys

from gemma2_jax.cli.common import ArgumentParser, dtype_flag, run_job


def parse_args(argv):
  from gemma2_jax.data.config import FORMATS

  parser = ArgumentParser(prog="python -m gemma2_jax.evaluate", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="HF / Kaggle / native dir or a workdir")
  parser.add_argument("--tokenizer", default=None,
                      help="SentencePiece model (default: tokenizer.model in the checkpoint dir, or "
                           "a workdir's training tokenizer)")
  parser.add_argument("--data", required=True, help="glob(s), comma-separated")
  parser.add_argument("--format", default="auto", choices=FORMATS)
  parser.add_argument("--text_field", default="text", help="JSONL / Parquet text field")
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=8, help="rows per step (global)")
  parser.add_argument("--max_batches", type=int, default=None, help="stop after N batches")
  parser.add_argument("--output", default=None, help="write the metrics as JSON")
  parser.add_argument("--dtype", default="auto", type=dtype_flag(auto=True),
                      help="param/compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
  parser.add_argument("--mesh", default="data=-1", help="e.g. fsdp=4,tensor=2")
  parser.add_argument("--loss_chunk", type=int, default=1024, help="tokens per logits chunk")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  for name in ("seq_len", "batch", "loss_chunk"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be positive, got {getattr(args, name)}")
  if args.max_batches is not None and args.max_batches < 1:
    parser.error(f"--max_batches must be positive, got {args.max_batches}")
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)

  def run() -> int:
    import jax

    from gemma2_jax.training.evaluation import evaluate_checkpoint
    from gemma2_jax.training.metrics import write_json

    result = evaluate_checkpoint(args.checkpoint, args.data, tokenizer=args.tokenizer,
                                 data_format=args.format, text_field=args.text_field,
                                 seq_len=args.seq_len, batch=args.batch, max_batches=args.max_batches,
                                 dtype=args.dtype, mesh=args.mesh, loss_chunk=args.loss_chunk,
                                 progress=not args.no_progress)
    if jax.process_index() == 0:
      print("eval: " + " ".join(f"{k.removeprefix('eval_')}={v:.6g}" for k, v in result.items())
            + f"; checkpoint={args.checkpoint} data={args.data}")
      if args.output:
        write_json(args.output, {**result, "checkpoint": args.checkpoint, "data": args.data,
                                 "seq_len": args.seq_len})
    return 0

  return run_job(args, run)
