"""grain pipeline: documents -> SentencePiece ids -> packed rows -> per-process batches.

Per source: random-access documents are shuffled per epoch and sharded per JAX process
(`_ShardedEpochChunks`; a remote text / JSONL / Parquet source holds its data group's share only),
grouped into chunks that one batched read and one SentencePiece batch call handle, flattened back to
documents, and packed by grain's `ConcatThenSplitIterDataset` into rows of seq_len + 1 tokens.
Sources are mixed row by row (so weights are shares of tokens), rows are batched and split into
model inputs and next-token targets. Every stage is a grain iterator, so `get_state()` is small
(indices and offsets, no data) and `set_state()` resumes exactly.

Batch layout (B = global_batch // process_count, T = seq_len), all numpy:
  tokens      [B, T] int32  input ids
  targets     [B, T] int32  next token: targets[b, t] == tokens[b, t + 1] within the row
  positions   [B, T] int32  position within the document piece (restarts at 0 per segment)
  segment_ids [B, T] int32  1, 2, ... per document in the row; 0 = padding
  loss_mask   [B, T] float32  1 where targets[b, t] is the next token of the *same* document;
                              0 on padding and where tokens[b, t] is the last token of a document
                              (its "next token" would be the next document's <bos>); in a chat
                              conversation also 0 unless targets[b, t] is a model turn's token
  target_bytes [B, T] int32  UTF-8 bytes of targets[b, t] where loss_mask, else 0 (bits per byte)
Rows are packed with T + 1 tokens so that each row trains T predictions. A document longer than a
row continues in the next row with positions restarting at 0 (no <bos> is inserted).

Chat sources (`SourceConfig(chat=True)`): each conversation is <bos> + Gemma's chat template as ids
with a loss weight per token (data.chat.encode: 1 on model turns' text and `<end_of_turn>`), no
<eos> (a reply ends with `<end_of_turn>`, where the sampler stops). The weight rides along as a
`weights` row feature, and loss_mask is also 0 where the weight of targets[b, t] is 0. Conversations
are packed whole, several to a row with their own segment ids, by grain's best-fit packer over
CHAT_PACKING_BINS rows at a time (padding the rest of a row): a reply split off its prompt into the
next row would be trained without the context it answers. A conversation longer than a row
(seq_len + 1 tokens) is cut after the last model turn that fits, or, when not even the first reply
fits, keeps the row's worth of tokens (the reply cut short, trained without `<end_of_turn>`); one
whose prompt alone fills the row is skipped (data.chat.fit). Each case is counted in
STATS['long_chats'] / STATS['long_chats_skipped'] and logged; long_docs='error' makes it an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import grain.experimental as gx
import grain.python as gp
import numpy as np

from gemma2_jax.data import chat
from gemma2_jax.data.config import DataConfig, SourceConfig
from gemma2_jax.data.sources import (
  STATS,
  ArrayRecordTokensSource,
  DataError,
  RemoteReads,
  note,
  open_source,
)
from gemma2_jax.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from gemma2_jax.paths import as_path

log = logging.getLogger(__name__)

# Rows a chat source's best-fit packer fills at once: more bins mean less padding (a conversation
# finds a row it fits) for a larger resume replay (up to this many rows are re-packed).
CHAT_PACKING_BINS = 32


class _ShardedEpochChunks(grain.MapDataset):
  """Chunk c of process `shard` -> list of up to `chunk` documents of epoch c // chunks_per_epoch.

  Each epoch is a permutation of the source seeded with seed + epoch; process p reads global slots
  p, p + P, p + 2P, ... of it, so the P processes together read every document exactly once per
  epoch. Chunks never straddle epochs, and one chunk is one batched read + one SentencePiece call.

  A `presharded` source (remote text / JSONL / Parquet: sources.RemoteLinesSource) holds only this
  shard's documents already (those starting in its share of the corpus's bytes): each epoch is a
  permutation of all of them, seeded with seed + epoch + shard * _SHARD_SEED (shard 0 permutes as an
  unsharded source does), so again every document is read once per epoch over the shards.
  """

  _SHARD_SEED = 0x9E3779B1

  def __init__(self, source, *, shard: int, num_shards: int, num_epochs: int | None,
               seed: int | None, chunk: int, label: str):
    super().__init__()
    self._source = source
    self._n = len(source)
    self._shard, self._num_shards = shard, num_shards
    # Slots of the permutation this shard reads: every num_shards-th from `shard`, or all of them.
    self._first, self._step = (0, 1) if getattr(source, "presharded", False) else (shard, num_shards)
    self.docs_per_epoch = len(range(self._first, self._n, self._step))
    if self.docs_per_epoch == 0:
      raise DataError(f"source {label!r} has {self._n} documents, fewer than the "
                      f"{num_shards} processes reading it")
    self._chunk = max(1, min(chunk, self.docs_per_epoch))
    self.chunks_per_epoch = -(-self.docs_per_epoch // self._chunk)
    self._epochs = num_epochs
    self._seed = seed
    self._batched = hasattr(source, "__getitems__")

  def __len__(self) -> int:
    return sys.maxsize if self._epochs is None else self.chunks_per_epoch * self._epochs

  def __str__(self) -> str:
    return f"ShardedEpochChunks(shard={self._shard}/{self._num_shards}, seed={self._seed})"

  def __getitem__(self, c):
    if isinstance(c, slice):
      return self.slice(c)
    epoch, k = divmod(c, self.chunks_per_epoch)
    lo = k * self._chunk
    hi = min(lo + self._chunk, self.docs_per_epoch)
    slots = range(self._first + lo * self._step, self._first + hi * self._step, self._step)
    if self._seed is not None and self._n > 1:
      seed = (self._seed + epoch + (self._step == 1) * self._shard * self._SHARD_SEED) % 2**32
      ids = [int(gx.index_shuffle(g, max_index=self._n - 1, seed=seed, rounds=4)) for g in slots]
    else:
      ids = list(slots)
    if self._batched:
      return list(self._source.__getitems__(ids))
    return [self._source[i] for i in ids]


class _TokenizeChunk(grain.transforms.Map):
  """list of documents (str | token array | None) -> list of {"tokens": int32 [len]}; a chat
  source's conversations -> {"tokens": int32 [len], "weights": uint8 [len]} of at most a row."""

  def __init__(self, tok: Tokenizer, cfg: DataConfig, label: str, chat: bool = False):
    self._tok = tok
    self._bos, self._eos = cfg.add_bos, cfg.add_eos
    self._max_len = cfg.seq_len + 1
    self._long = cfg.long_docs
    self._label = label
    self._chat = chat

  def map(self, docs):
    if self._chat:
      return self._conversations(docs)
    # Whitespace-only lines are not documents (prepare_data skips them the same way).
    texts = [d for d in docs if isinstance(d, str) and not d.isspace() and d]
    encoded = iter(self._tok.encode_batch(texts)) if texts else iter(())
    out = []
    for d in docs:
      if d is None or (isinstance(d, str) and (not d or d.isspace())):
        continue
      ids = next(encoded) if isinstance(d, str) else d
      n = len(ids) + self._bos + self._eos
      if n == self._bos + self._eos:
        STATS["empty_docs"] += 1
        continue
      arr = np.empty(n, np.int32)
      if self._bos:
        arr[0] = BOS_ID
      arr[self._bos:n - self._eos] = ids
      if self._eos:
        arr[-1] = EOS_ID
      if n > self._max_len:
        STATS["long_docs"] += 1
        if STATS["long_docs"] == 1 and self._long == "split":
          log.info("source %r: a document of %d tokens is longer than a row of %d; it is split "
                   "across rows (further ones are counted in STATS['long_docs'])",
                   self._label, n, self._max_len)
        if self._long == "error":
          raise DataError(f"source {self._label!r}: a document of {n} tokens is longer than a "
                          f"row of {self._max_len} (long_docs='error')")
        if self._long == "truncate":
          arr = arr[:self._max_len]
      out.append({"tokens": arr})
    return out

  def _conversations(self, docs):
    out = []
    convs = [d for d in docs if d is not None]  # None: a bad record, skipped and counted
    for conv, (ids, weights, cuts) in zip(convs, chat.encode(convs, self._tok, bos=self._bos),
                                         strict=True):
      n = len(ids)
      if n > self._max_len:
        if self._long == "error":
          raise DataError(f"source {self._label!r}: a conversation of {n} tokens is longer than a "
                          f"row of {self._max_len} (long_docs='error')")
        fitted = chat.fit(ids, weights, cuts, self._max_len)
        first = conv.turns[0][1][:40].replace("\n", " ")
        if fitted is None:
          note("long_chats_skipped", f"source {self._label!r}: a conversation of {n} tokens whose "
               f"prompt alone fills a row of {self._max_len} is skipped ({first!r}...)")
          continue
        ids, weights = fitted
        note("long_chats", f"source {self._label!r}: a conversation of {n} tokens is longer than "
             f"a row of {self._max_len}; cut to {len(ids)} ({first!r}...)")
      out.append({"tokens": ids, "weights": weights})
    return out


class _Flatten(gx.FlatMapTransform):
  """Chunks back to documents; guards against a source whose every document is skipped."""

  def __init__(self, label: str, max_empty_chunks: int):
    self._label = label
    self._max_empty = max_empty_chunks
    self._empty = 0

  def flat_map(self, chunk):
    if chunk:
      self._empty = 0
    else:
      self._empty += 1
      if self._empty > self._max_empty:
        raise DataError(f"source {self._label!r}: every document of a whole epoch was empty or "
                        f"skipped as bad input ({dict(STATS)})")
    return chunk


class _ChatRow(grain.transforms.Map):
  """A packed chat row without the packer's copies of segment ids / positions for `weights`."""

  def map(self, row):
    return {k: row[k] for k in ("tokens", "tokens_segment_ids", "tokens_positions", "weights")}


class _OneChatRow(grain.transforms.Map):
  """One conversation per row (`pack=False`): from position 0, padded to the row (segment 0)."""

  def __init__(self, row_len: int):
    self._n = row_len

  def map(self, conv):
    n, pad = len(conv["tokens"]), self._n - len(conv["tokens"])
    return {"tokens": np.pad(conv["tokens"].astype(np.int32), (0, pad)),
            "tokens_segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
            "tokens_positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
            "weights": np.pad(conv["weights"], (0, pad))}


class _AllWeights(grain.transforms.Map):
  """A text row in a mixture with chat sources: every token weighs 1 (rows batch alike)."""

  def map(self, row):
    return dict(row, weights=np.ones(len(row["tokens"]), np.uint8))


class _ToModelBatch(grain.transforms.Map):
  """Packed rows of T + 1 -> the documented batch dict."""

  def __init__(self, piece_bytes: np.ndarray):
    self._piece_bytes = piece_bytes

  def map(self, rows):
    return model_batch(rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"],
                       self._piece_bytes, rows.get("weights"))


def model_batch(full, seg, pos, piece_bytes, weights=None) -> dict[str, np.ndarray]:
  """Packed rows of T + 1 tokens (with segment ids, positions and optionally per-token loss weights,
  see chat sources) -> the documented [B, T] batch."""
  targets = full[:, 1:]
  mask = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
  if weights is not None:  # the mask applies to the target: a position counts if what it predicts does
    mask &= weights[:, 1:] != 0
  nbytes = np.take(piece_bytes, np.minimum(targets, len(piece_bytes) - 1))
  return {
      "tokens": np.ascontiguousarray(full[:, :-1], np.int32),
      "targets": np.ascontiguousarray(targets, np.int32),
      "positions": np.ascontiguousarray(pos[:, :-1], np.int32),
      "segment_ids": np.ascontiguousarray(seg[:, :-1], np.int32),
      "loss_mask": mask.astype(np.float32),
      "target_bytes": np.where(mask, nbytes, 0).astype(np.int32),
  }


def _check_prepared(src, tok: Tokenizer, label: str) -> None:
  """ArrayRecord shards carry meta.json from prepare_data; refuse ids from another tokenizer."""
  meta_path = as_path(src.files[0]).parent / "meta.json"
  if not meta_path.exists():
    log.warning("source %r: no meta.json next to the shards; cannot verify the tokenizer", label)
    return
  try:
    meta = json.loads(meta_path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{meta_path}: not valid JSON ({e}); it is written last by prepare_data, so its "
                    "output may be incomplete: re-run prepare_data") from None
  if not isinstance(meta, dict):
    raise DataError(f"{meta_path}: expected a JSON object (written by prepare_data)")
  if meta.get("tokenizer_sha256") not in (None, tok.sha256):
    raise DataError(f"source {label!r} was tokenized with {meta.get('tokenizer')} "
                    f"(sha256 {meta['tokenizer_sha256'][:12]}), not {tok.path} "
                    f"(sha256 {tok.sha256[:12]}); re-run prepare_data")


def rows(cfg: DataConfig, tok: Tokenizer, *, process_index: int, process_count: int,
         num_epochs: int | None, shuffle: bool,
         presharded: list[int] | None = None,
         seed_slots: list[int] | None = None) -> grain.IterDataset:
  """Packed rows {"tokens", "tokens_segment_ids", "tokens_positions"} [T+1], mixed; with any chat
  source every row also has "weights" [T+1] (see the module docstring). `presharded` (a list) gets
  the indices of the sources that hold only this process's share (see _ShardedEpochChunks).
  `seed_slots[i]`: what seeds source i's shuffle (default i, its position; a source keeps the slot it
  had when a resumed mixture adds or removes sources, see DataIterator.set_state)."""
  any_chat = any(sc.chat for sc in cfg.sources)
  if any_chat:
    tok.chat_ids()  # a tokenizer without the turn markers fails at start-up, naming it
  per_source = []
  reads = RemoteReads(cfg.remote_read_concurrency, cfg.remote_read_block_bytes)
  for i, sc in enumerate(cfg.sources):
    src = open_source(sc, bad_utf8=cfg.bad_utf8, bad_records=cfg.bad_records,
                      shard=process_index, num_shards=process_count, reads=reads)
    if isinstance(src, ArrayRecordTokensSource):
      _check_prepared(src, tok, sc.label)
    if presharded is not None and getattr(src, "presharded", False):
      presharded.append(i)
    ds = _ShardedEpochChunks(src, shard=process_index, num_shards=process_count,
                             num_epochs=num_epochs, chunk=cfg.tokenize_batch,
                             seed=(cfg.seed * 1_000_003 + (i if seed_slots is None else
                                                           seed_slots[i])) % 2**32
                             if shuffle else None,
                             label=sc.label)
    max_empty = ds.chunks_per_epoch + 1
    ds = ds.map(_TokenizeChunk(tok, cfg, sc.label, chat=sc.chat))
    ds = ds.to_iter_dataset(gp.ReadOptions(num_threads=cfg.num_threads,
                                           prefetch_buffer_size=cfg.prefetch))
    ds = gx.FlatMapIterDataset(ds, _Flatten(sc.label, max_empty))
    if sc.chat and not sc.pack:
      ds = ds.map(_OneChatRow(cfg.seq_len + 1))
    elif sc.chat:
      # The source is shuffled already; unshuffled bins keep the row order a function of the data.
      ds = gx.BestFitPackIterDataset(
          ds, length_struct={"tokens": cfg.seq_len + 1, "weights": cfg.seq_len + 1},
          num_packing_bins=CHAT_PACKING_BINS, shuffle_bins=False)
      ds = ds.map(_ChatRow())
    else:
      ds = gx.ConcatThenSplitIterDataset(ds, length_struct={"tokens": cfg.seq_len + 1})
      if any_chat:
        ds = ds.map(_AllWeights())
    per_source.append(ds)
  if len(per_source) == 1:
    return per_source[0]
  names = source_names(cfg.sources)
  if len(set(names)) != len(names):
    raise DataError(f"source names must be unique in a mixture, got {names}")
  return grain.IterDataset.mix(dict(zip(names, per_source, strict=True)),
                               {n: sc.weight for n, sc in zip(names, cfg.sources, strict=True)})


def source_names(sources) -> list[str]:
  """A mixture's keys: each source's name, or `source<i>` (its position) when it has none."""
  return [(sc.name if isinstance(sc, SourceConfig) else sc.get("name")) or f"source{i}"
          for i, sc in enumerate(sources)]


def stop_threads(it) -> None:
  """Closes a grain iterator and waits for its reader threads (and worker processes) to end.

  grain's own close() leaves running prefetch tasks to finish in the background: after an error
  they would go on reading (and logging bad records) while the error is printed. Here pending tasks
  are cancelled and the running ones joined, so nothing of the pipeline outlives the call.
  """
  from concurrent import futures

  close = getattr(it, "close", None)
  if close is not None:
    close()  # recursive: stops worker processes and thread-prefetch loops (joined by grain)
  seen, todo = set(), [it]
  while todo:  # grain internals (guarded): every iterator of the tree and its thread pool
    node = todo.pop()
    if id(node) in seen:
      continue
    seen.add(id(node))
    executor = getattr(node, "_executor", None)
    if isinstance(executor, futures.ThreadPoolExecutor):
      executor.shutdown(wait=True, cancel_futures=True)
    todo.extend(p for p in getattr(node, "_parents", ()) if hasattr(p, "__next__"))


class DataIterator(Iterator[dict[str, np.ndarray]]):
  """Batches of the documented layout; get_state()/set_state() are JSON-serialisable dicts.

  With `pad_to`, a finite pipeline is padded with all-padding batches (loss_mask 0) until `pad_to`
  batches were produced, so every process of a multi-host eval runs the same number of steps.

  An error while reading (bad data, an unreadable file) stops the pipeline's threads before it
  propagates (see `stop_threads`); `close()` does the same at any time.

  State: {"grain": the grain pipeline's state (per source: its shard's chunk = epoch and position,
  the document within the chunk, the packer's partial row; for a mixture also the mixing index),
  "count", "done", "fingerprint" (what the batch sequence depends on), and, once a resumed mixture
  dropped sources, "retired": {name: {"grain": that source's state, "slot", "source"}}}.
  set_state resumes bit-identically under the same fingerprint; under a changed mixture or global
  batch it continues every source where it stopped (see `_resume_changed`).
  """

  def __init__(self, ds: grain.IterDataset, *, batch_size: int, seq_len: int,
               pad_to: int | None = None, fingerprint: Mapping[str, Any] | None = None,
               rebuild=None):
    self._ds = ds
    self._fingerprint = _jsonable(dict(fingerprint or {}))
    self._rebuild = rebuild  # seed_slots -> (ds, fingerprint): the same config, sources reseeded
    self._retired: dict[str, Any] = {}
    self._it = iter(ds)
    self.batch_size, self.seq_len = batch_size, seq_len
    self._pad_to = pad_to
    self._count = 0
    self._done = False

  def __iter__(self):
    return self

  def _empty(self, rows: int) -> dict[str, np.ndarray]:
    shape = (rows, self.seq_len)
    out = {k: np.zeros(shape, np.int32) for k in
           ("tokens", "targets", "positions", "segment_ids", "target_bytes")}
    out["loss_mask"] = np.zeros(shape, np.float32)
    return out

  def __next__(self) -> dict[str, np.ndarray]:
    if self._pad_to is not None and self._count >= self._pad_to:
      raise StopIteration
    batch = None
    if not self._done:
      try:
        batch = next(self._it)
      except StopIteration:
        self._done = True
      except BaseException:
        self.close()
        raise
    if batch is None:
      if self._pad_to is None:
        raise StopIteration
      batch = self._empty(self.batch_size)
    elif len(batch["tokens"]) < self.batch_size:  # last partial batch of a finite pipeline
      pad = self._empty(self.batch_size - len(batch["tokens"]))
      batch = {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
    self._count += 1
    return batch

  def close(self) -> None:
    stop_threads(self._it)

  def rewind(self) -> None:
    """Back to the first batch, reusing the pipeline (its sources' indexes): a periodic eval's
    iterator is built once."""
    self.close()
    self._it = iter(self._ds)
    self._count, self._done = 0, False

  def get_state(self) -> dict[str, Any]:
    state = {"grain": _jsonable(self._it.get_state()), "count": self._count, "done": self._done,
             "fingerprint": self._fingerprint}
    if self._retired:
      state["retired"] = self._retired
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    saved = state.get("fingerprint")
    if saved is not None and _jsonable(saved) != self._fingerprint:
      self._resume_changed(_jsonable(saved), state)
      return
    self._it.set_state(from_json(state["grain"]))
    self._count = int(state["count"])
    self._done = bool(state["done"])
    self._retired = _jsonable(state.get("retired", {}))

  def _resume_changed(self, saved: dict[str, Any], state: Mapping[str, Any]) -> None:
    """Resumes a state saved under other source weights, other sources or another global batch.

    Every source present in both runs continues exactly where it stopped: the same epoch, the same
    next document of its shard's permutation, even the rest of its partially packed row (its grain
    state is restored as it was), so no document is replayed and none is skipped. A source new to
    the mixture starts at its beginning (epoch 0); a source dropped from it keeps its state under
    "retired" and continues from there if it comes back. Rows are then drawn from the sources by
    the new weights, in the order a fresh run with these weights would draw them (the mixing index
    restarts at 0), and batched by the new global batch. Anything else changed is refused.
    """
    now = self._fingerprint
    free = ("sources", "global_batch", "chat_packing_bins", "byte_sharded_sources", "seed_slots")
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if k not in free and saved.get(k) != now.get(k)}
    if "process_count" in diff or "process_index" in diff:
      raise DataError(
        f"data iterator state was saved by process {saved.get('process_index')} of "
        f"{saved.get('process_count')} (process_count), this is process {now.get('process_index')} "
        f"of {now.get('process_count')}: each process's document positions cannot be re-mapped "
        f"to another process count; resume with {saved.get('process_count')} processes, or set "
        "checkpoint.restore_data=False to restart the data stream (documents already seen are "
        "seen again)")
    if diff or self._rebuild is None:
      raise DataError(f"data iterator state was saved by a different pipeline; (saved, now): {diff}"
                      " (only source weights, the set of sources and global_batch may change)")
    old, new = saved["sources"], now["sources"]
    old_names, new_names = source_names(old), source_names(new)
    if len(old) != len(new) and not all(sc.get("name") for sc in old + new):
      raise DataError("a resumed mixture adds or removes sources: name every source "
                      "(SourceConfig.name), in the saved run and now, so that each continues "
                      f"where it stopped (saved: {[sc.get('name') for sc in old]}, now: "
                      f"{[sc.get('name') for sc in new]})")
    old_slots = saved.get("seed_slots") or list(range(len(old)))
    retired = _jsonable(state.get("retired", {}))
    # name -> (its source fingerprint, seed slot, grain state or None = still inside the mixture)
    known = {n: (sc, slot, None) for n, sc, slot in zip(old_names, old, old_slots, strict=True)}
    for n, r in retired.items():
      known.setdefault(n, (r["source"], r["slot"], r["grain"]))

    def _same(a, b):  # a source's identity: everything but its weight (and paths, never stored)
      return {k: v for k, v in a.items() if k != "weight"} == \
             {k: v for k, v in b.items() if k != "weight"}

    for n, sc in zip(new_names, new, strict=True):
      if n in known and not _same(known[n][0], sc):
        d = {k: (known[n][0].get(k), sc.get(k)) for k in set(known[n][0]) | set(sc)
             if k != "weight" and known[n][0].get(k) != sc.get(k)}
        raise DataError(f"source {n!r} changed since the saved run ((saved, now): {d}); only its "
                        "weight may change on resume: give a different corpus a new name (it then "
                        "starts from its beginning)")
    taken = {known[n][1] for n in known}
    slots, free_slot = [], 0
    for n in new_names:
      if n in known:
        slots.append(known[n][1])
      else:
        while free_slot in taken:
          free_slot += 1
        slots.append(free_slot)
        taken.add(free_slot)
    if slots != (now.get("seed_slots") or list(range(len(new)))):
      stop_threads(self._it)
      self._ds, self._fingerprint = self._rebuild(slots)
      self._it = iter(self._ds)
    if self._fingerprint == saved:  # e.g. the same changed mixture resumed again: exact
      self.set_state(state)
      return
    if now.get("num_workers"):
      raise DataError("a changed mixture or global batch resumes with data.num_workers=0 only "
                      "(grain worker processes each hold a slice of every source)")
    # Per-source grain states: a mixture's "parents" by name, or a single source's whole state.
    grain_state = _jsonable(state["grain"])
    per_source = (dict(grain_state["parents"]) if len(old) > 1 else {old_names[0]: grain_state})
    fresh = _jsonable(self._it.get_state())
    fresh_parents = fresh["parents"] if len(new) > 1 else {new_names[0]: fresh}
    parents = {}
    for n in new_names:
      got = per_source.get(n) if n in per_source else known.get(n, (None, None, None))[2]
      parents[n] = got if got is not None else fresh_parents[n]
    self._retired = {n: {"grain": per_source.get(n, known[n][2]), "slot": known[n][1],
                         "source": known[n][0]} for n in known if n not in new_names}
    new_state = (parents[new_names[0]] if len(new) == 1 else
                 {"parents": parents, "index": 0, "stop": False})
    self._it.set_state(from_json(new_state))
    self._count = int(state["count"])
    self._done = False
    added = [n for n in new_names if n not in known]
    log.info("data: resumed under a changed mixture / global batch: %s continue where they "
             "stopped%s%s; rows are mixed afresh by the new weights",
             [n for n in new_names if n in known] or "no sources",
             f", {added} start from their beginning" if added else "",
             f", {sorted(self._retired)} are set aside (kept in the state)" if self._retired else "")


def _jsonable(x):
  return json.loads(json.dumps(x))


def from_json(x):
  """grain compares restored slices against tuples; JSON gave lists back."""
  if isinstance(x, dict):
    return {k: from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(from_json(v) for v in x)
  return x


def _build(cfg: DataConfig, *, process_index: int | None, process_count: int | None,
           tokenizer_path, vocab_size: int | None, num_real_tokens: int | None,
           num_epochs: int | None, shuffle: bool, drop_remainder: bool,
           seed_slots: list[int] | None = None):
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if cfg.global_batch % process_count:
    raise DataError(f"global_batch {cfg.global_batch} is not divisible by process_count "
                    f"{process_count}")
  batch = cfg.global_batch // process_count
  tok = Tokenizer(tokenizer_path, num_threads=cfg.num_threads)
  tok.check(vocab_size, num_real_tokens=num_real_tokens)
  presharded: list[int] = []
  ds = rows(cfg, tok, process_index=process_index, process_count=process_count,
            num_epochs=num_epochs, shuffle=shuffle, presharded=presharded, seed_slots=seed_slots)
  ds = ds.batch(batch, drop_remainder=drop_remainder)
  ds = ds.map(_ToModelBatch(tok.piece_bytes()))
  if cfg.num_workers > 0:
    from absl import flags

    # grain's workers read absl flags; a trainer that does not use absl.app never parses them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(gp.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                  per_worker_buffer_size=2))
  # What the batch sequence depends on; a resume under anything else would not be exact.
  fingerprint = dict(
      # Paths are left out so that a corpus can move (e.g. to another bucket) between runs.
      # `chat` / `pack` only when not at their defaults: states saved before these fields existed
      # stay valid.
      sources=[{k: v for k, v in dataclasses.asdict(sc).items()
                if k not in ("paths", "tfds_data_dir") and not (k == "chat" and not v)
                and not (k == "pack" and v)}
               for sc in cfg.sources],
      tokenizer_sha256=tok.sha256,
      process_index=process_index, process_count=process_count, num_epochs=num_epochs,
      shuffle=shuffle, **{k: getattr(cfg, k) for k in (
          "seq_len", "global_batch", "seed", "add_bos", "add_eos", "long_docs",
          "tokenize_batch", "num_workers")})
  if any(sc.chat for sc in cfg.sources):
    fingerprint["chat_packing_bins"] = CHAT_PACKING_BINS
  if presharded and process_count > 1:
    # Remote text / JSONL / Parquet sources are shared out by bytes, no longer dealt out by slots
    # of one permutation: a state saved under the old dealing is refused rather than resumed inexactly.
    fingerprint["byte_sharded_sources"] = presharded
  if seed_slots is not None and list(seed_slots) != list(range(len(cfg.sources))):
    # Only after a resume that added / removed sources (absent otherwise: older states stay valid).
    fingerprint["seed_slots"] = list(seed_slots)
  return ds, batch, fingerprint


def make_train_iterator(cfg: DataConfig | Mapping, *, process_index: int | None = 0,
                        process_count: int | None = 1, tokenizer_path: str | os.PathLike | bytes,
                        vocab_size: int | None = None,
                        num_real_tokens: int | None = None) -> DataIterator:
  """Shuffled, sharded, packed training batches of B = global_batch // process_count rows.

  process_index / process_count: this process's shard; None = jax.process_index() / count().

  Infinite unless cfg.num_epochs is set (then the last partial batch is dropped). Raises
  DataError at start-up for a missing/empty corpus or a tokenizer that does not fit `vocab_size`.
  """
  if not isinstance(cfg, DataConfig):
    cfg = DataConfig.from_dict(cfg)
  kw = dict(process_index=process_index, process_count=process_count,
            tokenizer_path=tokenizer_path, vocab_size=vocab_size, num_real_tokens=num_real_tokens,
            num_epochs=cfg.num_epochs, shuffle=cfg.shuffle, drop_remainder=True)
  ds, batch, fp = _build(cfg, **kw)
  return DataIterator(ds, batch_size=batch, seq_len=cfg.seq_len, fingerprint=fp,
                      rebuild=lambda slots: _build(cfg, seed_slots=slots, **kw)[::2])


def make_eval_iterator(cfg: DataConfig | Mapping, *, process_index: int | None = 0,
                       process_count: int | None = 1, tokenizer_path: str | os.PathLike | bytes,
                       vocab_size: int | None = None, num_real_tokens: int | None = None,
                       num_batches: int | None = None) -> DataIterator:
  """One deterministic pass in document order (no shuffle); the last batch is padded.

  num_batches: stop after that many batches, padding with empty batches if the data runs out
  first; set it in multi-host eval so all processes step the same number of times.
  """
  if not isinstance(cfg, DataConfig):
    cfg = DataConfig.from_dict(cfg)
  kw = dict(process_index=process_index, process_count=process_count,
            tokenizer_path=tokenizer_path, vocab_size=vocab_size, num_real_tokens=num_real_tokens,
            num_epochs=1, shuffle=False, drop_remainder=False)
  ds, batch, fp = _build(cfg, **kw)
  return DataIterator(ds, batch_size=batch, seq_len=cfg.seq_len, pad_to=num_batches,
                      fingerprint=fp, rebuild=lambda slots: _build(cfg, seed_slots=slots, **kw)[::2])
