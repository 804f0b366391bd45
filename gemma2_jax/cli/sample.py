"""`python -m gemma2_jax.sample --checkpoint PATH [--tokenizer PATH] (--prompt TEXT | --prompts FILE.jsonl)
[--chat] [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S] [--output FILE.jsonl]
[--distributed | --coordinator_address A --num_processes N --process_id I]`

Generates with the KV-cache sampler (gemma2_jax/inference/sampler.py). PATH is any checkpoint `load_model`
reads (HF, Kaggle, native, a training workdir); the tokenizer defaults to `tokenizer.model` in the
checkpoint directory, or a workdir's training tokenizer. A prompt is encoded as `<bos>` + its pieces;
with `--chat` it is Gemma's chat template as ids (`data.chat.prompt_ids`: the ids chat training sees
for the same turns) and the reply ends at `<end_of_turn>`.
Generation stops at `<eos>`, `<end_of_turn>` (when the tokenizer has it), any `--stop_ids`, or after
`--max_new_tokens`. `--temperature 0` (the default) is greedy.

One `--prompt` streams the text to stdout. `--prompts` reads JSONL lines with a `prompt` field (or
`messages` with `--chat`) and runs them in batches with a progress bar; `--output` gets one JSON line
per prompt (`index`, `prompt`, `prompt_ids` exactly as fed, `<bos>` included, `completion`,
`completion_ids` with the stop token when one was hit, `logprobs`), flushed after every batch.
Re-running with the same `--output` skips the prompts it already holds (resumable: a kill loses at
most the batch in flight); an output holding other prompts is refused. Prompts run shortest first, in
batches of one prompt-length bucket, and each row's random key comes from (`--seed`, the prompt's line
index): a prompt's result does not depend on the batch it ran in (up to float rounding with the
batch's size: the last digits of its log-probs).

Several hosts (a TPU pod slice, or any multi-process job): run the same command on every host with
the distributed flags of training (`--distributed` on TPU pods / SLURM, or `--coordinator_address`,
`--num_processes`, `--process_id`). The model is loaded onto the mesh of all the job's devices (each
process reads only its shards of the checkpoint) and every batch is one global batch whose rows are
split over the processes' devices (`--batch_size` is rounded up so that every data-parallel group of
processes feeds whole rows to each batch shard; see `inference.generation.Layout`). Every process
reads `--prompts` (the same file, or identical copies: checked); only process 0 reads and appends
`--output` (it need not be on shared storage) and shows the progress bar. The output is byte for
byte that of one process on the same mesh with the same global batch. Bad input is the same
`error: ...` line and exit 1 on every process.
"""

from __future__ import annotations

import argparse
import sys

from gemma2_jax.cli.common import ArgumentParser, add_distributed_flags, dtype_flag, run_job


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.sample", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="HF / Kaggle / native dir or a workdir")
  parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: see above)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt; the completion streams to stdout")
  source.add_argument("--prompts", help="JSONL file: {'prompt': ...} or {'messages': [...]} lines")
  parser.add_argument("--chat", action="store_true", help="apply Gemma's chat template")
  parser.add_argument("--max_new_tokens", type=int, default=256)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop_ids", default="", help="extra stop token ids, comma-separated")
  parser.add_argument("--output", default=None, help="JSONL results (with --prompts)")
  parser.add_argument("--batch_size", type=int, default=8,
                      help="prompts per batch (rounded up to whole rows per batch shard and process)")
  parser.add_argument("--max_len", type=int, default=8192,
                      help="context length: prompt + max_new_tokens must fit (Gemma 2: 8192)")
  parser.add_argument("--dtype", default="auto", type=dtype_flag(auto=True),
                      help="param/compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
  parser.add_argument("--cache_dtype", default="bfloat16", type=dtype_flag(),
                      help="KV cache dtype (float32, bfloat16, float16, or bf16, fp32, ...)")
  parser.add_argument("--mesh", default="",
                      help="e.g. tensor=4,data=2 (default: tensor over the kv heads, data the rest)")
  parser.add_argument("--no_progress", action="store_true")
  add_distributed_flags(parser)
  args = parser.parse_args(argv)
  checks = [
    (args.max_new_tokens > 0, f"--max_new_tokens must be positive, got {args.max_new_tokens}"),
    (args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
    (args.top_k is None or args.top_k > 0, f"--top_k must be positive, got {args.top_k}"),
    (args.top_p is None or 0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}"),
    (args.batch_size > 0, f"--batch_size must be positive, got {args.batch_size}"),
    (args.output is None or args.prompts, "--output needs --prompts"),
  ]
  for ok, msg in checks:
    if not ok:
      parser.error(msg)
  try:
    args.stop_ids = tuple(int(s) for s in args.stop_ids.split(",") if s.strip())
  except ValueError:
    parser.error(f"--stop_ids must be comma-separated integers, got {args.stop_ids!r}")
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)

  def run() -> int:
    import dataclasses

    from gemma2_jax.inference.generation import SampleJob, sample

    sample(SampleJob(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SampleJob)}))
    return 0

  return run_job(args, run)
