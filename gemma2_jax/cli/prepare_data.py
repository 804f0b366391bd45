"""`python -m gemma2_jax.prepare_data {tokenize,train-tokenizer} --input PATH ... [options]`

`tokenize`: corpus -> ArrayRecord shards of SentencePiece ids (tokenize once, train many times).
Records hold one document each as little-endian int32 ids *without* <bos>/<eos> (the pipeline adds
them per DataConfig). `meta.json` beside the shards records the tokenizer hash and the summary.
--output_dir is a local directory or a bucket (gs://...). A big corpus is tokenized by N workers, one
command per host (or per process) with `--worker_index I --worker_count N` and the same other flags:
every worker computes the same plan of input files -> shards and writes the shards s with
s % N == I, `--num_workers` processes at a time; a re-run skips the shards already complete, and the
worker that completes the last shard writes meta.json (see gemma2_jax/data/prepare.py). E.g. on
each of 16 hosts of a pod:
  python -m gemma2_jax.prepare_data tokenize --input 'gs://B/corpus/*.jsonl' \\
      --tokenizer gs://B/tokenizer.model --output_dir gs://B/tokenized --num_shards 1024 \\
      --worker_index $I --worker_count 16

`train-tokenizer`: a SentencePiece model with Gemma's conventions, trained on the corpus.

Chat data (`--chat`) is not pre-tokenized: the shards hold no loss weights, and the pipeline renders
and encodes conversations on the fly. `train-tokenizer --chat` trains on the conversations' text; every
trained tokenizer has Gemma's turn markers `<start_of_turn>` / `<end_of_turn>` as single pieces.
Bad input is one `error: ...` line and exit 2. The library is gemma2_jax/data/prepare.py.
"""

from __future__ import annotations

import sys

from gemma2_jax.cli.common import ArgumentParser
from gemma2_jax.errors import UserError


def parse_args(argv):
  from gemma2_jax.data.config import SourceConfig
  from gemma2_jax.data.tokenizer import MIN_VOCAB_SIZE

  p = ArgumentParser(prog="python -m gemma2_jax.prepare_data", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  for cmd in ("tokenize", "train-tokenizer"):
    s = sub.add_parser(cmd)
    s.add_argument("--input", nargs="+", required=True, help="files, dirs or globs")
    s.add_argument("--format", default="auto", help="auto|text|jsonl|parquet")
    s.add_argument("--text_field", default="text")
    s.add_argument("--doc_per", default="line", help="text: line|file")
    s.add_argument("--chat", action="store_true",
                   help="conversations (messages, or prompt + response/completion); see data.chat")
  t = sub.choices["tokenize"]
  t.add_argument("--tokenizer", required=True)
  t.add_argument("--output_dir", required=True)
  t.add_argument("--name", default="data")
  t.add_argument("--num_shards", type=int,
                 help="output shards in all (default: one per GiB of input, and at least one per "
                      "process of all workers); give every worker and every re-run the same")
  t.add_argument("--num_workers", type=int,
                 help="processes of this command (default: min(cores, 8))")
  t.add_argument("--worker_index", type=int, default=0,
                 help="which of the --worker_count cooperating commands this is (0-based)")
  t.add_argument("--worker_count", type=int, default=1,
                 help="commands (hosts, or processes) sharing the work; each writes the shards s "
                      "with s %% worker_count == worker_index")
  t.add_argument("--bad_utf8", default="replace", choices=("replace", "fail"))
  t.add_argument("--bad_records", default="skip", choices=("skip", "fail"))
  t.add_argument("--no_progress", action="store_true")
  r = sub.choices["train-tokenizer"]
  r.add_argument("--model_prefix", required=True)
  r.add_argument("--vocab_size", type=int, required=True)
  r.add_argument("--character_coverage", type=float, default=0.9995)
  r.add_argument("--max_docs", type=int, default=1_000_000)
  a = p.parse_args(argv)
  for name in ("num_shards", "num_workers", "worker_count", "max_docs"):
    if getattr(a, name, None) is not None and getattr(a, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
  if a.cmd == "tokenize" and not 0 <= a.worker_index < a.worker_count:
    p.error(f"--worker_index must be in 0..{a.worker_count - 1} (one of --worker_count "
            f"{a.worker_count} workers), got {a.worker_index}")
  if a.cmd == "train-tokenizer":
    if a.vocab_size < MIN_VOCAB_SIZE:
      p.error(f"--vocab_size must be at least {MIN_VOCAB_SIZE} (4 special ids, 2 chat turn markers, "
              f"256 byte-fallback pieces and the corpus's characters), got {a.vocab_size}")
    if not 0 < a.character_coverage <= 1:
      p.error(f"--character_coverage must be in (0, 1], got {a.character_coverage}")
  try:
    a.source = SourceConfig(paths=tuple(a.input), format=a.format, text_field=a.text_field,
                            doc_per=a.doc_per, chat=a.chat)
  except ValueError as e:  # e.g. --chat with --format text
    p.error(str(e))
  return a


def _print_report(r) -> None:
  who = f"worker {r.worker_index} of {r.worker_count}: " if r.worker_count > 1 else ""
  mine = len(r.written) + len(r.skipped)
  print(f"{who}wrote {len(r.written)} shards ({len(r.skipped)} of its {mine} were complete "
        f"already; {r.num_shards} in all)")
  if r.written:
    print("\n".join(r.summary.lines()))
  if r.total is not None:
    if r.skipped or r.worker_count > 1:
      print(f"all {r.num_shards} shards: {r.total.documents:,} documents, {r.total.tokens:,} tokens")
    print(f"wrote {r.meta_path}")
  else:
    owners = ", ".join(map(str, r.owners))
    print(f"{len(r.missing)} of {r.num_shards} shards are not complete yet (those of worker(s) "
          f"{owners}); meta.json is written by the worker that completes the last one, or by "
          "re-running any worker once they are all complete")


def main(argv: list[str] | None = None) -> int:
  a = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if a.cmd == "tokenize":
      from gemma2_jax.data.prepare import tokenize

      r = tokenize(a.source, a.tokenizer, a.output_dir, num_shards=a.num_shards,
                   num_workers=a.num_workers, worker_index=a.worker_index,
                   worker_count=a.worker_count, bad_utf8=a.bad_utf8, bad_records=a.bad_records,
                   name=a.name, progress=not a.no_progress)
      _print_report(r)
    else:
      from gemma2_jax.data.prepare import train_corpus_tokenizer
      from gemma2_jax.data.tokenizer import Tokenizer

      path = train_corpus_tokenizer(a.source, a.model_prefix, vocab_size=a.vocab_size,
                                    character_coverage=a.character_coverage, max_docs=a.max_docs)
      print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except OSError as e:  # e.g. an output path that cannot be created or written
    where = " ".join(str(f) for f in (e.filename, e.filename2) if f) or a.cmd
    print(f"error: {e.strerror or e}: {where} (check the input and output paths)", file=sys.stderr)
    return 2
  return 0
