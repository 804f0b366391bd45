"""Corpus -> ArrayRecord shards of SentencePiece ids (tokenize once, train many times), and a
small SentencePiece trainer (`train_corpus_tokenizer`). CLI: `python -m gemma2_jax.prepare_data
{tokenize,train-tokenizer}` (gemma2_jax/cli/prepare_data.py).

Records hold one document each as little-endian int32 ids *without* <bos>/<eos> (the pipeline adds
them per DataConfig). `meta.json` beside the shards records the tokenizer hash and the summary.

Chat data (`--chat`) is not pre-tokenized: the shards hold no loss weights, and the pipeline renders
and encodes conversations on the fly. `train-tokenizer --chat` trains on the conversations' text; every
trained tokenizer has Gemma's turn markers `<start_of_turn>` / `<end_of_turn>` as single pieces.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np

from gemma2_jax.data.chat import Conversation
from gemma2_jax.data.config import SourceConfig
from gemma2_jax.data.sources import STATS, DataError, open_source
from gemma2_jax.paths import is_remote

# group_size:1 keeps every record independently readable: random access for global shuffling.
ARRAY_RECORD_OPTIONS = "group_size:1"
_CHUNK = 512  # documents per SentencePiece batch call


@dataclasses.dataclass
class Summary:
  documents: int = 0
  tokens: int = 0
  bytes: int = 0
  chars: int = 0
  skipped_empty: int = 0
  bad_utf8: int = 0
  bad_records: int = 0
  seconds: float = 0.0

  def add(self, other: Summary) -> None:
    for f in dataclasses.fields(self):
      if f.name != "seconds":
        setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def lines(self) -> list[str]:
    tok = max(self.tokens, 1)
    rate = self.tokens / self.seconds if self.seconds else 0.0
    return [
        f"documents   {self.documents:,}  (skipped: {self.skipped_empty:,} empty, "
        f"{self.bad_records:,} bad records; {self.bad_utf8:,} with invalid UTF-8 repaired)",
        f"tokens      {self.tokens:,}",
        f"bytes       {self.bytes:,} UTF-8  ({self.chars:,} chars)",
        f"chars/token {self.chars / tok:.3f}   bytes/token {self.bytes / tok:.3f}",
        f"time        {self.seconds:.1f} s  ({rate:,.0f} tokens/s)",
    ]


_counter = None


def _init_worker(counter):
  global _counter
  _counter = counter


def _write_shard(args) -> Summary:
  src, tok, lo, hi, path = args
  from array_record.python.array_record_module import ArrayRecordWriter

  tok.num_threads = 1  # parallelism comes from the worker processes
  STATS.clear()
  out = Summary()
  writer = ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)
  try:
    for start in range(lo, hi, _CHUNK):
      stop = min(start + _CHUNK, hi)
      docs = [src[i] for i in range(start, stop)]
      texts = [d for d in docs if isinstance(d, str) and d.strip()]
      out.skipped_empty += sum(1 for d in docs if isinstance(d, str) and not d.strip())
      for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        writer.write(np.asarray(ids, dtype="<i4").tobytes())
        out.documents += 1
        out.tokens += len(ids)
        out.chars += len(text)
        out.bytes += len(text.encode("utf-8"))
      if _counter is not None:
        with _counter.get_lock():
          _counter.value += stop - start
  finally:
    writer.close()
  out.bad_utf8 = STATS["bad_utf8"]
  out.bad_records = STATS["bad_records"]
  return out


def tokenize_corpus(source: SourceConfig, tokenizer_path: str, output_dir: str, *,
                    num_shards: int | None = None, num_workers: int | None = None,
                    bad_utf8: str = "replace", bad_records: str = "skip", name: str = "data",
                    progress: bool = True) -> Summary:
  """Writes `{output_dir}/{name}.array_record-0000i-of-0000n` and `meta.json`; returns totals."""
  from tqdm import tqdm

  from gemma2_jax.data.tokenizer import Tokenizer

  if source.chat:
    raise DataError(f"source {source.label!r} is chat data: it is tokenized by the training pipeline "
                    "(shards would lose which tokens the loss counts); train from the JSONL / Parquet")
  if is_remote(output_dir):
    # array_record writes local files only: os.makedirs would make a local directory named `gs:`.
    raise DataError(f"output_dir {output_dir}: shards are written to a local directory (or a gcsfuse "
                    "mount); copy them to the bucket afterwards, training reads gs:// directly")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise DataError(f"output_dir {output_dir} exists and is not a directory; name a new or existing "
                    "directory")
  t0 = time.perf_counter()
  tok = Tokenizer(tokenizer_path)
  tok.check()
  src = open_source(source, bad_utf8=bad_utf8, bad_records=bad_records)
  if isinstance(src[0], np.ndarray):
    raise DataError(f"source {source.label!r} is already tokenized")
  n = len(src)
  num_workers = num_workers or min(os.cpu_count() or 1, 8)
  num_shards = num_shards or num_workers
  os.makedirs(output_dir, exist_ok=True)
  jobs = []
  for s in range(num_shards):
    path = os.path.join(output_dir, f"{name}.array_record-{s:05d}-of-{num_shards:05d}")
    jobs.append((src, tok, s * n // num_shards, (s + 1) * n // num_shards, path))
  total = Summary()
  bar = tqdm(total=n, unit="doc", disable=not progress, desc="tokenize")
  if num_workers == 1:
    _init_worker(None)
    for job in jobs:
      total.add(_write_shard(job))
      bar.update(job[3] - job[2])
  else:
    ctx = mp.get_context("spawn")  # fork is unsafe once threads (grain, tqdm) exist
    counter = ctx.Value("q", 0)
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(counter,)) as pool:
      res = pool.map_async(_write_shard, jobs, chunksize=1)
      while not res.ready():
        res.wait(0.2)
        bar.update(counter.value - bar.n)
      for part in res.get():
        total.add(part)
    bar.update(n - bar.n)
  bar.close()
  total.seconds = time.perf_counter() - t0
  if total.documents == 0:
    raise DataError(f"source {source.label!r}: no non-empty documents to tokenize")
  meta = dict(dataclasses.asdict(total), tokenizer=str(tokenizer_path), tokenizer_sha256=tok.sha256,
              vocab_size=tok.vocab_size, source=dataclasses.asdict(source),
              shards=[os.path.basename(j[4]) for j in jobs], record_format="int32 little-endian")
  with open(os.path.join(output_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1, ensure_ascii=False)
  return total


def _dump_text(source: SourceConfig, path: str, max_docs: int) -> int:
  """Writes one document per line for the SentencePiece trainer (which reads lines)."""
  src = open_source(source)
  step = max(1, len(src) // max_docs)
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for i in range(0, len(src), step):
      d = src[i]
      if isinstance(d, Conversation):  # the text of its turns (the markers are pieces already)
        d = "\n".join(text for _, text in d.turns)
      if isinstance(d, str) and d.strip():
        f.write(d.replace("\n", " ") + "\n")
        n += 1
  return n


def train_corpus_tokenizer(source: SourceConfig, model_prefix: str, *, vocab_size: int,
                           character_coverage: float = 0.9995, max_docs: int = 1_000_000) -> str:
  """Trains a SentencePiece model with Gemma's conventions (`tokenizer.train_tokenizer`) on the
  documents of `source` and returns its path: text files of one document a line as they are, any
  other source through a dump of up to `max_docs` of its documents (a conversation: its turns' text)."""
  from gemma2_jax.data.sources import expand_paths, infer_format
  from gemma2_jax.data.tokenizer import train_tokenizer

  with tempfile.TemporaryDirectory() as tmp:
    fmt = source.format if source.format != "auto" else infer_format(expand_paths(source.paths))
    if fmt == "text" and source.doc_per == "line" and not source.chat:
      inputs = list(source.paths)  # the trainer reads lines itself
    else:
      inputs = [os.path.join(tmp, "corpus.txt")]
      _dump_text(source, inputs[0], max_docs)
    return train_tokenizer(inputs, model_prefix, vocab_size=vocab_size,
                           character_coverage=character_coverage)
