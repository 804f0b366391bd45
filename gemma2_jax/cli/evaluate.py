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

from gemma2_jax.cli.common import ArgumentParser, run_job
from gemma2_jax.training.evaluation import run_eval
from gemma2_jax.training.steps import make_eval_step


class EvalError(ValueError):
  """Bad input found after parsing (e.g. data with no tokens)."""


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
  parser.add_argument("--dtype", default="auto",
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
    from jax.sharding import NamedSharding, PartitionSpec
    from tqdm import tqdm

    from gemma2_jax import checkpoint
    from gemma2_jax.cli.sample import default_tokenizer, dtype_for, mesh_sizes
    from gemma2_jax.data.config import DataConfig, SourceConfig
    from gemma2_jax.data.pipeline import make_eval_iterator
    from gemma2_jax.model.transformer import LOGICAL_AXES
    from gemma2_jax.parallel.sharding import (
      DEFAULT_RULES,
      activation_sharding,
      data_group,
      host_to_global,
      logical_to_sharding,
      logical_to_spec,
      make_mesh,
    )
    from gemma2_jax.training.metrics import write_json

    checkpoint.detect_format(args.checkpoint)
    tokenizer = args.tokenizer or default_tokenizer(args.checkpoint)
    cfg = checkpoint.read_config(args.checkpoint)
    mesh = make_mesh(mesh_sizes(args.mesh, cfg.num_kv_heads, jax.device_count()))
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), DEFAULT_RULES))
    data = DataConfig(sources=(SourceConfig(paths=tuple(args.data.split(",")), format=args.format,
                                            text_field=args.text_field),),
                      seq_len=args.seq_len, global_batch=args.batch, shuffle=False, num_epochs=1)
    group = data_group(batch_sharding, args.batch)
    batches = make_eval_iterator(data, process_index=group.index, process_count=group.count,
                                 tokenizer_path=tokenizer, vocab_size=cfg.vocab_size,
                                 num_real_tokens=cfg.num_real_tokens, num_batches=args.max_batches)
    dtype = dtype_for(args.dtype)
    param_shardings = logical_to_sharding(LOGICAL_AXES, mesh, DEFAULT_RULES)
    cfg, params = checkpoint.load_sharded(args.checkpoint, dtype, param_shardings, config=cfg)
    cfg = cfg.replace(dtype=dtype)
    step = jax.jit(make_eval_step(cfg, chunk=min(args.loss_chunk, args.seq_len)),
                   in_shardings=(param_shardings, batch_sharding),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
    bar = tqdm(total=args.max_batches, desc="evaluate", unit="batch", file=sys.stderr,
               disable=args.no_progress or jax.process_index() != 0, dynamic_ncols=True)
    with activation_sharding(mesh, DEFAULT_RULES), bar:
      result = run_eval(step, params, batches,
                        lambda b: {k: host_to_global(v, batch_sharding) for k, v in b.items()},
                        max_batches=args.max_batches, progress=bar)
    if result["eval_tokens"] == 0:
      raise EvalError(f"no tokens to evaluate in {args.data}")
    if jax.process_index() == 0:
      print("eval: " + " ".join(f"{k.removeprefix('eval_')}={v:.6g}" for k, v in result.items())
            + f"; checkpoint={args.checkpoint} data={args.data}")
      if args.output:
        write_json(args.output, {**result, "checkpoint": args.checkpoint, "data": args.data,
                                 "seq_len": args.seq_len})
    return 0

  def expected():
    from gemma2_jax.cli.sample import SampleError

    return (EvalError, SampleError)

  return run_job(args, run, expected)

