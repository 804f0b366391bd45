"""Typed data configuration; `DataConfig.from_dict` accepts a plain dict or an ml_collections section."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord", "tfds")
# Remote (gs://) text / JSONL / Parquet reads, per process: ranged GETs in flight, and the size of the
# index scan's reads (also the largest read neighbouring documents are coalesced into).
REMOTE_READ_CONCURRENCY = 32
REMOTE_READ_BLOCK_BYTES = 2 << 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
  """One corpus. `paths` are globs (local or anything etils.epath / tf.io.gfile reads).

  format: text | jsonl | parquet | arrayrecord (pre-tokenized, written by prepare_data) | tfds |
    auto (from the file extension).
  doc_per: for `text`: "line" (one document per non-empty line) or "file".
  weight: relative share of packed rows (so roughly of tokens) in a mixture.
  chat: the records are conversations (SFT data), not text: a `jsonl` or `parquet` source whose
    records have `messages` or `prompt` + `response` / `completion` (the output of `python -m
    gemma2_jax.sample --chat --output`); see data.chat.conversation. They are rendered with Gemma's
    chat template, the loss counts only the model turns (data.chat.encode), and each conversation
    lies whole in one row (packed, with padding, never split; one longer than a row is cut at a turn
    boundary: see pipeline). `text_field` is unused. Chat and text sources mix in one mixture.
  pack: chat sources only. True: conversations are packed several to a row. False: one conversation
    per row, from position 0, padded (what on-policy distillation needs: each row is one prompt whose
    final model turn the student may answer itself, see gemma2_jax/onpolicy.py).
  """

  paths: tuple[str, ...] = ()
  format: str = "auto"
  weight: float = 1.0
  text_field: str = "text"
  doc_per: str = "line"
  name: str | None = None
  tfds_name: str | None = None
  tfds_split: str = "train"
  tfds_data_dir: str | None = None
  chat: bool = False
  pack: bool = True

  def __post_init__(self):
    if isinstance(self.paths, str):
      object.__setattr__(self, "paths", (self.paths,))
    else:
      object.__setattr__(self, "paths", tuple(self.paths))
    if self.format not in FORMATS:
      raise ValueError(f"source format {self.format!r} not in {FORMATS}")
    if self.doc_per not in ("line", "file"):
      raise ValueError(f"doc_per must be 'line' or 'file', got {self.doc_per!r}")
    if not self.weight > 0:
      raise ValueError(f"source weight must be > 0, got {self.weight}")
    if self.format == "tfds":
      if not self.tfds_name:
        raise ValueError("a tfds source needs tfds_name")
    elif not self.paths:
      raise ValueError("source has no paths")
    if self.chat and self.format not in ("auto", "jsonl", "parquet"):
      raise ValueError(f"a chat source is jsonl or parquet, not {self.format!r}")
    if not self.pack and not self.chat:
      raise ValueError("pack=False (one conversation per row) is for chat sources; text sources "
                       "are always packed")

  @property
  def label(self) -> str:
    return self.name or self.tfds_name or ",".join(self.paths)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Pipeline configuration (see pipeline.make_train_iterator for the batch layout).

  num_epochs: None = repeat forever (training); eval iterators always make one pass.
  add_bos / add_eos: around each document; a chat conversation gets <bos> (per add_bos) and no
    <eos>: its replies end with `<end_of_turn>`, where the sampler stops.
  long_docs: "split" (default; a document longer than a row continues in the next rows),
    "truncate" (keep its first seq_len + 1 tokens) or "error". A chat conversation is never split:
    under "split" and "truncate" one longer than a row is cut at a turn boundary (see pipeline),
    under "error" it is an error.
  bad_utf8: "replace" (U+FFFD, counted and logged) or "fail".
  bad_records: malformed JSONL line / missing text field / malformed conversation (unknown role,
    empty content, no model turn): "skip" (counted, logged with file:line) or "fail".
  tokenize_batch: documents per SentencePiece batch call (amortises Python overhead).
  num_threads / prefetch: grain read threads and buffered tokenized chunks per process.
  num_workers: grain worker processes (0 = in-process threads only). The batch sequence depends
    on num_workers (each worker packs its own slice), so keep it fixed across a resume.
  remote_read_concurrency: ranged GETs in flight per process (per grain worker with num_workers)
    for remote (gs://) text / JSONL / Parquet sources; at ~30 ms a request, 32 in flight read ~1000
    documents/s. Shared by all of the process's sources; the batches do not depend on it.
  remote_read_block_bytes: a remote text / JSONL source indexes its shard at start-up in reads of
    this size (at most concurrency x this many bytes buffered), and reads neighbouring documents
    with one request of up to this size. The batches do not depend on it.
  """

  sources: tuple[SourceConfig, ...]
  seq_len: int
  global_batch: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  add_bos: bool = True
  add_eos: bool = True
  long_docs: str = "split"
  bad_utf8: str = "replace"
  bad_records: str = "skip"
  tokenize_batch: int = 256
  num_threads: int = 2
  prefetch: int = 8
  num_workers: int = 0
  remote_read_concurrency: int = REMOTE_READ_CONCURRENCY
  remote_read_block_bytes: int = REMOTE_READ_BLOCK_BYTES

  def __post_init__(self):
    srcs = self.sources
    if isinstance(srcs, SourceConfig | Mapping):
      srcs = (srcs,)
    srcs = tuple(s if isinstance(s, SourceConfig) else SourceConfig(**_plain(s)) for s in srcs)
    object.__setattr__(self, "sources", srcs)
    if not srcs:
      raise ValueError("DataConfig.sources is empty")
    if self.seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
    if self.global_batch < 1:
      raise ValueError(f"global_batch must be >= 1, got {self.global_batch}")
    if self.long_docs not in ("split", "truncate", "error"):
      raise ValueError(f"long_docs must be split|truncate|error, got {self.long_docs!r}")
    if self.bad_utf8 not in ("replace", "fail"):
      raise ValueError(f"bad_utf8 must be replace|fail, got {self.bad_utf8!r}")
    if self.bad_records not in ("skip", "fail"):
      raise ValueError(f"bad_records must be skip|fail, got {self.bad_records!r}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
    if self.remote_read_concurrency < 1:
      raise ValueError(f"remote_read_concurrency must be >= 1, got {self.remote_read_concurrency}")
    if self.remote_read_block_bytes < 4096:
      raise ValueError(f"remote_read_block_bytes must be >= 4096, got "
                       f"{self.remote_read_block_bytes}")

  def replace(self, **kw) -> DataConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | Any) -> DataConfig:
    d = _plain(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown data config keys: {sorted(unknown)}")
    return cls(**d)


def _plain(d: Any) -> dict:
  """ConfigDict / FrozenConfigDict / Mapping -> dict (lists of sources stay sequences)."""
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  if not isinstance(d, Mapping):
    raise TypeError(f"expected a mapping, got {type(d).__name__}")
  out = dict(d)
  if "sources" in out and isinstance(out["sources"], Sequence | Mapping):
    s = out["sources"]
    out["sources"] = (s,) if isinstance(s, Mapping) else tuple(s)
  return out
