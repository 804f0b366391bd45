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

from gemma2_jax.data import chat, groups
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
  """Chunk c of process `shard` -> list of up to `chunk` documents of one epoch (see groups.EpochPlan).

  Each epoch is a permutation of the source seeded with seed + epoch; process p reads global slots
  p, p + P, p + 2P, ... of it, so the P processes together read every document exactly once per
  epoch. Chunks never straddle epochs, and one chunk is one batched read + one SentencePiece call.
  A `plan` deals the first epochs otherwise: after a resume under another process count, the slots
  the old processes had not read (groups.merge).

  A `presharded` source (remote text / JSONL / Parquet: sources.RemoteLinesSource) holds only this
  shard's documents already (those starting in its share of the corpus's bytes): each epoch is a
  permutation of all of them, seeded with seed + epoch + shard * _SHARD_SEED (shard 0 permutes as an
  unsharded source does), so again every document is read once per epoch over the shards.
  """

  _SHARD_SEED = 0x9E3779B1

  def __init__(self, source, *, shard: int, num_shards: int, num_epochs: int | None,
               seed: int | None, chunk: int, label: str, plan: dict | None = None):
    super().__init__()
    self._source = source
    self._n = len(source)
    self._shard, self._num_shards = shard, num_shards
    presharded = getattr(source, "presharded", False)
    if plan is not None and presharded:
      raise DataError(f"source {label!r} is shared out by bytes per data group (remote text / "
                      "JSONL / Parquet): it cannot continue under another data group count")
    self.plan = groups.EpochPlan(self._n, shard, num_shards, chunk, presharded=presharded, plan=plan)
    self.docs_per_epoch = self.plan.per_epoch
    if self.docs_per_epoch == 0:
      raise DataError(f"source {label!r} has {self._n} documents, fewer than the "
                      f"{num_shards} processes reading it")
    self.chunks_per_epoch = self.plan.chunks_per_epoch
    self._presharded = presharded
    self._epochs = num_epochs
    self._seed = seed
    self._batched = hasattr(source, "__getitems__")

  def __len__(self) -> int:
    return sys.maxsize if self._epochs is None else self.plan.chunks(self._epochs)

  def __str__(self) -> str:
    return f"ShardedEpochChunks(shard={self._shard}/{self._num_shards}, seed={self._seed})"

  def __getitem__(self, c):
    if isinstance(c, slice):
      return self.slice(c)
    epoch, lo = self.plan.locate(c)
    slots = self.plan.slots(epoch, lo, min(lo + self.plan.chunk, self.plan.docs(epoch)))
    if self._seed is not None and self._n > 1:
      seed = (self._seed + epoch + self._presharded * self._shard * self._SHARD_SEED) % 2**32
      ids = [int(gx.index_shuffle(g, max_index=self._n - 1, seed=seed, rounds=4)) for g in slots]
    else:
      ids = list(slots)
    if self._batched:
      return list(self._source.__getitems__(ids))
    return [self._source[i] for i in ids]


class _TokenizeChunk(grain.transforms.Map):
  """list of documents (str | token array | None) -> list of {"tokens": int32 [len]}; a chat
  source's conversations -> {"tokens": int32 [len], "weights": uint8 [len]} of at most a row.
  A skipped document (bad, empty, a chat prompt that fills a row) stays in the list as None and is
  dropped after the flattening (`_Kept`), so that a position within a chunk is a document slot."""

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
        out.append(None)
        continue
      ids = next(encoded) if isinstance(d, str) else d
      n = len(ids) + self._bos + self._eos
      if n == self._bos + self._eos:
        STATS["empty_docs"] += 1
        out.append(None)
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
    convs = [d for d in docs if d is not None]  # None: a bad record, skipped and counted
    encoded = iter(chat.encode(convs, self._tok, bos=self._bos))
    return [None if conv is None else self._conversation(conv, *next(encoded)) for conv in docs]

  def _conversation(self, conv, ids, weights, cuts):
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
        return None
      ids, weights = fitted
      note("long_chats", f"source {self._label!r}: a conversation of {n} tokens is longer than "
           f"a row of {self._max_len}; cut to {len(ids)} ({first!r}...)")
    return {"tokens": ids, "weights": weights}


class _Flatten(gx.FlatMapTransform):
  """Chunks back to documents (None where one was skipped: see `_Kept`); guards against a source
  whose every document is skipped."""

  def __init__(self, label: str, max_empty_chunks: int):
    self._label = label
    self._max_empty = max_empty_chunks
    self._empty = 0

  def flat_map(self, chunk):
    if any(d is not None for d in chunk):
      self._empty = 0
    else:
      self._empty += 1
      if self._empty > self._max_empty:
        raise DataError(f"source {self._label!r}: every document of a whole epoch was empty or "
                        f"skipped as bad input ({dict(STATS)})")
    return chunk


class _Kept(grain.transforms.Filter):
  """Drops the skipped documents' None after `_Flatten` (whose position then counts slots)."""

  def filter(self, doc) -> bool:
    return doc is not None


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
         seed_slots: list[int] | None = None,
         plans: Mapping[str, dict] | None = None,
         sizes: dict[str, int] | None = None) -> grain.IterDataset:
  """Packed rows {"tokens", "tokens_segment_ids", "tokens_positions"} [T+1], mixed; with any chat
  source every row also has "weights" [T+1] (see the module docstring). `presharded` (a list) gets
  the indices of the sources that hold only this process's share (see _ShardedEpochChunks).
  `seed_slots[i]`: what seeds source i's shuffle (default i, its position; a source keeps the slot it
  had when a resumed mixture adds or removes sources, see DataIterator.set_state). `plans[name]`:
  how that source's first epochs are dealt after a resume under another process count (groups).
  `sizes` (a dict) gets each source's number of documents by name."""
  any_chat = any(sc.chat for sc in cfg.sources)
  if any_chat:
    tok.chat_ids()  # a tokenizer without the turn markers fails at start-up, naming it
  per_source = []
  names = source_names(cfg.sources)
  reads = RemoteReads(cfg.remote_read_concurrency, cfg.remote_read_block_bytes)
  for i, sc in enumerate(cfg.sources):
    src = open_source(sc, bad_utf8=cfg.bad_utf8, bad_records=cfg.bad_records,
                      shard=process_index, num_shards=process_count, reads=reads)
    if isinstance(src, ArrayRecordTokensSource):
      _check_prepared(src, tok, sc.label)
    if presharded is not None and getattr(src, "presharded", False):
      presharded.append(i)
    if sizes is not None:
      sizes[names[i]] = len(src)
    ds = _ShardedEpochChunks(src, shard=process_index, num_shards=process_count,
                             num_epochs=num_epochs, chunk=cfg.tokenize_batch,
                             seed=(cfg.seed * 1_000_003 + (i if seed_slots is None else
                                                           seed_slots[i])) % 2**32
                             if shuffle else None,
                             label=sc.label, plan=(plans or {}).get(names[i]))
    max_empty = ds.chunks_per_epoch + 1
    ds = ds.map(_TokenizeChunk(tok, cfg, sc.label, chat=sc.chat))
    ds = ds.to_iter_dataset(gp.ReadOptions(num_threads=cfg.num_threads,
                                           prefetch_buffer_size=cfg.prefetch))
    ds = gx.FlatMapIterDataset(ds, _Flatten(sc.label, max_empty)).filter(_Kept())
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
  "count", "done", "fingerprint" (what the batch sequence depends on; after a resume under another
  process count it holds each source's "plans", see groups), "consumed" (per source how far this
  process has read it: what another process count continues from) and, once a resumed mixture
  dropped sources, "retired": {name: {"grain": that source's state, "slot", "source", "plan",
  "consumed"}}}. set_state resumes bit-identically under the same fingerprint; under a changed
  mixture, global batch or process count it continues every source where it stopped (see
  `_resume_changed`).
  """

  def __init__(self, ds: grain.IterDataset, *, batch_size: int, seq_len: int,
               pad_to: int | None = None, fingerprint: Mapping[str, Any] | None = None,
               rebuild=None, sizes: Mapping[str, int] | None = None):
    self._ds = ds
    self._fingerprint = _jsonable(dict(fingerprint or {}))
    # (seed_slots, plans) -> _build's (ds, batch, fingerprint, sizes): the same config, sources
    # reseeded or dealt by plans
    self._rebuild = rebuild
    self._sizes = dict(sizes or {})  # documents per source (its name)
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
             "fingerprint": self._fingerprint, "consumed": self._consumed()}
    if self._retired:
      state["retired"] = self._retired
    return state

  def _consumed(self) -> dict[str, list[int] | None]:
    """Per source [chunk, documents of it read, documents in the source] (groups.read_position):
    where another data group count continues from; None where that cannot be read."""
    names = source_names(self._fingerprint.get("sources", []))
    node, iters = self._it, [None] * len(names)
    while node is not None:
      parents = [p for p in getattr(node, "_parents", ()) if hasattr(p, "__next__")]
      if len(parents) > 1:
        iters = parents if len(parents) == len(names) else iters
        break
      node = parents[0] if parents else None
    if len(names) == 1:
      iters = [self._it]
    out = {}
    for n, it in zip(names, iters, strict=True):
      at = groups.read_position(it) if it is not None else None
      out[n] = None if at is None or n not in self._sizes else [*at, self._sizes[n]]
    return out

  def set_state(self, state: Mapping[str, Any], peers=None) -> None:
    """`peers`: a callable that returns every saved process's state (a checkpoint's data files);
    needed only when the state was saved under another data group count."""
    saved = state.get("fingerprint")
    if saved is not None and _jsonable(saved) != self._fingerprint:
      self._resume_changed(_jsonable(saved), state, peers)
      return
    self._it.set_state(from_json(state["grain"]))
    self._count = int(state["count"])
    self._done = bool(state["done"])
    self._retired = _jsonable(state.get("retired", {}))

  def _resume_changed(self, saved: dict[str, Any], state: Mapping[str, Any], peers) -> None:
    """Resumes a state saved under other source weights, other sources, another global batch or
    another data group count (process count).

    Every source present in both runs continues exactly where it stopped: the same epoch, the same
    next document of its shard's permutation, even the rest of its partially packed row (its grain
    state is restored as it was), so no document is replayed and none is skipped. A source new to
    the mixture starts at its beginning (epoch 0); a source dropped from it keeps its state under
    "retired" and continues from there if it comes back. Rows are then drawn from the sources by
    the new weights, in the order a fresh run with these weights would draw them (the mixing index
    restarts at 0), and batched by the new global batch. Under another group count see `_regroup`.
    Anything else changed is refused.
    """
    now = self._fingerprint
    states = None
    if _group(saved) != _group(now):
      states = self._group_states(saved, peers)
      own = [s for s in states if _group(s["fingerprint"]) == _group(now)]
      if own:  # this group's own state: the processes were only numbered otherwise
        self.set_state(own[0])
        return
      state, saved = states[0], _jsonable(states[0]["fingerprint"])
    self._check_changes(saved, regroup=states is not None)
    known = self._known(saved, state)
    if states is not None:
      self._regroup(known, states, saved)
    new_names = source_names(now["sources"])
    slots = self._seed_slots(known, new_names)
    plans = {n: known[n]["plan"] for n in new_names if n in known and known[n]["plan"]}
    if slots != (now.get("seed_slots") or list(range(len(new_names)))) or \
       plans != (now.get("plans") or {}):
      stop_threads(self._it)
      self._ds, _, self._fingerprint, self._sizes = self._rebuild(slots, plans)
      self._it = iter(self._ds)
    if states is None and self._fingerprint == saved:  # e.g. the same changed mixture again: exact
      self.set_state(state)
      return
    if now.get("num_workers"):
      raise DataError("a changed mixture, global batch or process count resumes with "
                      "data.num_workers=0 only (grain worker processes each hold a slice of every "
                      "source)")
    self._continue(known, new_names, state)

  def _group_states(self, saved, peers) -> list[Mapping[str, Any]]:
    """Every old data group's state, in group order (the saved processes, one per group)."""
    (index, count), now = _group(saved), _group(self._fingerprint)
    if peers is None:
      raise DataError(
        f"data iterator state was saved by data group {index} of {count} (process_count), this is "
        f"group {now[0]} of {now[1]}: continuing under another data group count needs every "
        "group's saved state (a checkpoint restore passes them); or set "
        "checkpoint.restore_data=False to restart the data stream (documents already seen are "
        "seen again)")
    by_group = {}
    for s in peers():
      by_group.setdefault(_group(s["fingerprint"]), s)
    missing = [g for g in range(count) if (g, count) not in by_group]
    if missing or any(c != count for _, c in by_group):
      raise DataError(f"the saved data states are of groups {sorted(by_group)}: groups {missing} "
                      f"of {count} are missing, so their positions are unknown")
    return [by_group[(g, count)] for g in range(count)]

  def _check_changes(self, saved: dict[str, Any], *, regroup: bool) -> None:
    now = self._fingerprint
    free = ("sources", "global_batch", "chat_packing_bins", "byte_sharded_sources", "seed_slots",
            "plans") + (("process_index", "process_count") if regroup else ())
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if k not in free and saved.get(k) != now.get(k)}
    if diff or self._rebuild is None:
      raise DataError(f"data iterator state was saved by a different pipeline; (saved, now): {diff}"
                      " (only source weights, the set of sources, global_batch and the process "
                      "count may change)")
    old, new = saved["sources"], now["sources"]
    if len(old) != len(new) and not all(sc.get("name") for sc in old + new):
      raise DataError("a resumed mixture adds or removes sources: name every source "
                      "(SourceConfig.name), in the saved run and now, so that each continues "
                      f"where it stopped (saved: {[sc.get('name') for sc in old]}, now: "
                      f"{[sc.get('name') for sc in new]})")

  @staticmethod
  def _known(saved: dict[str, Any], state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {"source" (its fingerprint), "slot" (what seeds it), "grain" (its state; None = from
    the start of its plan), "plan", "consumed"} of every source the saved run knew, retired ones
    included."""
    old = saved["sources"]
    names = source_names(old)
    slots = saved.get("seed_slots") or list(range(len(old)))
    plans, consumed = saved.get("plans") or {}, _jsonable(state.get("consumed") or {})
    grain_state = _jsonable(state["grain"])
    per_source = dict(grain_state["parents"]) if len(old) > 1 else {names[0]: grain_state}
    known = {n: dict(source=sc, slot=slot, grain=per_source[n], plan=plans.get(n),
                     consumed=consumed.get(n))
             for n, sc, slot in zip(names, old, slots, strict=True)}
    for n, r in _jsonable(state.get("retired", {})).items():
      known.setdefault(n, dict(source=r["source"], slot=r["slot"], grain=r["grain"],
                               plan=r.get("plan"), consumed=r.get("consumed")))
    return known

  def _seed_slots(self, known, new_names) -> list[int]:
    """Each source's seed slot: the one it had, or the first free one for a new source; refuses a
    source whose identity changed under its name."""
    for n, sc in zip(new_names, self._fingerprint["sources"], strict=True):
      was = known[n]["source"] if n in known else sc
      d = {k: (was.get(k), sc.get(k)) for k in set(was) | set(sc)
           if k != "weight" and was.get(k) != sc.get(k)}  # paths are never stored
      if d:
        raise DataError(f"source {n!r} changed since the saved run ((saved, now): {d}); only its "
                        "weight may change on resume: give a different corpus a new name (it then "
                        "starts from its beginning)")
    taken = {k["slot"] for k in known.values()}
    slots, free_slot = [], 0
    for n in new_names:
      if n in known:
        slots.append(known[n]["slot"])
      else:
        while free_slot in taken:
          free_slot += 1
        slots.append(free_slot)
        taken.add(free_slot)
    return slots

  @staticmethod
  def _regroup(known, states, saved) -> None:
    """Under another data group count: each source's plan (groups.merge) from where every old group
    stopped, and its state the start of that plan. The new groups deal among themselves the
    documents of each epoch that no old group had read: none is read twice within its epoch and
    none is skipped, except the rest of a document an old group had cut at a row boundary (its part
    in that group's last row was trained; the rest is dropped: at most one document per source per
    old group). A document an old group had read but not yet put in any row counts as not read."""
    count, chunk, num_epochs = saved["process_count"], saved["tokenize_batch"], saved["num_epochs"]
    for n, k in known.items():
      per_group = [_known_consumed(s, n) for s in states]
      if any(c is None for c in per_group):
        raise DataError(f"source {n!r}: the saved state does not say how far each data group had "
                        "read it (saved by an older version, with data.num_workers > 0, or a chat "
                        "source packed several conversations to a row), so it cannot continue "
                        "under another data group count; resume with the saved process count")
      size = per_group[0][2]
      plans = [groups.EpochPlan(size, g, count, chunk, plan=k["plan"]) for g in range(count)]
      at = [p.position(c, num_epochs) for p, c in zip(plans, per_group, strict=True)]
      k.update(plan=groups.merge(plans, at, num_epochs), grain=None, consumed=[0, 0, size])

  def _continue(self, known, new_names, state) -> None:
    """Sets the per-source states: known sources where they stopped, new ones from the start."""
    fresh = _jsonable(self._it.get_state())
    fresh_parents = fresh["parents"] if len(new_names) > 1 else {new_names[0]: fresh}
    parents = {n: known[n]["grain"] if n in known and known[n]["grain"] is not None
               else fresh_parents[n] for n in new_names}
    self._retired = {n: {k: known[n][k] for k in ("grain", "slot", "source", "plan", "consumed")}
                     for n in known if n not in new_names}
    new_state = (parents[new_names[0]] if len(new_names) == 1 else
                 {"parents": parents, "index": 0, "stop": False})
    self._it.set_state(from_json(new_state))
    self._count = int(state["count"])
    self._done = False
    added = [n for n in new_names if n not in known]
    log.info("data: resumed under a changed mixture / global batch / process count: %s continue "
             "where they stopped%s%s; rows are mixed afresh by the new weights",
             [n for n in new_names if n in known] or "no sources",
             f", {added} start from their beginning" if added else "",
             f", {sorted(self._retired)} are set aside (kept in the state)" if self._retired else "")


def _group(fingerprint: Mapping[str, Any]) -> tuple[Any, Any]:
  return fingerprint.get("process_index"), fingerprint.get("process_count")


def _known_consumed(state: Mapping[str, Any], name: str) -> list[int] | None:
  """One group's [chunk, read, size] of source `name`, live or retired (None if not recorded)."""
  if name in (state.get("consumed") or {}):
    return state["consumed"][name]
  return (state.get("retired") or {}).get(name, {}).get("consumed")


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
           seed_slots: list[int] | None = None, plans: Mapping[str, dict] | None = None):
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
  sizes: dict[str, int] = {}
  ds = rows(cfg, tok, process_index=process_index, process_count=process_count,
            num_epochs=num_epochs, shuffle=shuffle, presharded=presharded, seed_slots=seed_slots,
            plans=plans, sizes=sizes)
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
  if plans:  # only after a resume under another process count (absent otherwise)
    fingerprint["plans"] = dict(plans)
  return ds, batch, fingerprint, sizes


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
  ds, batch, fp, sizes = _build(cfg, **kw)
  return DataIterator(ds, batch_size=batch, seq_len=cfg.seq_len, fingerprint=fp, sizes=sizes,
                      rebuild=lambda slots, plans: _build(cfg, seed_slots=slots, plans=plans, **kw))


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
  ds, batch, fp, sizes = _build(cfg, **kw)
  return DataIterator(ds, batch_size=batch, seq_len=cfg.seq_len, pad_to=num_batches,
                      fingerprint=fp, sizes=sizes,
                      rebuild=lambda slots, plans: _build(cfg, seed_slots=slots, plans=plans, **kw))
