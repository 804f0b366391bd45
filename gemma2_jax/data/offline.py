"""Offline distillation records: a teacher's per-token top-k log-probs stored with the packed rows.

Written once by `python -m gemma2_jax.teacher_logits` (`TopKWriter`), read by the trainer through
`make_offline_iterator`, which yields the data pipeline's batch layout (see gemma2_jax.data.pipeline)
plus the teacher:
  topk_logprobs [B, T, k] float32  teacher log-probs at temperature 1, sorted descending
  topk_ids      [B, T, k] int32    their token ids (distinct)
The teacher's tail mass (every token outside the k kept ones) is not stored: it is 1 - sum(exp(
topk_logprobs)), which `losses.topk_distill_sums` computes itself (the tail bucket).

Layout of one ArrayRecord record = one packed row of T + 1 tokens, little-endian:
  int32  n_runs
  int32  runs [n_runs, 3]   (start, segment_id, first position) of each maximal stretch where the
                            segment id is constant and the position grows by one; segment ids and
                            positions of the T + 1 tokens are rebuilt from these exactly
  int32  tokens [T + 1]
  uint64 entries            T * k bit-packed entries of W = id_bits + logprob_bits bits each:
                            (token_id << logprob_bits) | q, token by token, best first
targets, loss_mask and target_bytes derive from the row exactly as in pipeline._ToModelBatch
(target_bytes from `piece_bytes.npy`, the tokenizer's UTF-8 bytes per piece, beside the shards).

Quantization: q = round((max(logp, logprob_min) - logprob_min) / step), step = -logprob_min /
(2^logprob_bits - 1): uniform in log space, so the relative error of every kept probability is at
most step / 2 (defaults: 13 bits over [-32, 0], |error| <= 0.00195 nats, 0.2%); log-probs below
logprob_min are clamped (e^-32 ~ 1e-14 is no mass). With Gemma's 256128-row vocabulary id_bits = 18,
so an entry is 31 bits: 496 bytes/token at k = 128, about 500 with the row (MaxText: 12 bytes an entry,
>= 1.5 KB/token, and no tail bucket).

Each ArrayRecord shard also carries a fixed ~128 KB (its size grows in 64 KiB steps) of padding and
index, so a tiny output's file bytes/token is higher than `record_bytes_per_token` (the records
alone); at thousands of rows a shard the two agree to within a percent.

`meta.json` beside the shards records k, seq_len, vocab_size, the bit layout, the tokenizer hash, the
counts and the measured quantization error.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import grain.python as gp
import numpy as np

from gemma2_jax.data.pipeline import from_json, model_batch, stop_threads  # the pipeline's own
from gemma2_jax.data.sources import ArrayRecords, DataError
from gemma2_jax.paths import as_path, glob, is_remote

FORMAT = "gemma2_jax.teacher_topk"
VERSION = 1
SHARD_PREFIX = "teacher_topk.array_record-"
ARRAY_RECORD_OPTIONS = "group_size:1"
LOGPROB_BITS = 13
LOGPROB_MIN = -32.0


def id_bits_for(vocab_size: int) -> int:
  return max(1, math.ceil(math.log2(vocab_size)))


class _Codec:
  """Bit layout of the T * k entries of one row; the index arithmetic is shared by all rows."""

  def __init__(self, *, seq_len: int, k: int, vocab_size: int, logprob_bits: int = LOGPROB_BITS,
               logprob_min: float = LOGPROB_MIN):
    self.seq_len, self.k, self.vocab_size = seq_len, k, vocab_size
    self.id_bits = id_bits_for(vocab_size)
    self.logprob_bits = logprob_bits
    self.width = self.id_bits + logprob_bits
    if not 1 <= logprob_bits or self.width > 64:
      raise ValueError(f"id_bits {self.id_bits} + logprob_bits {logprob_bits} must be in [2, 64]")
    if not logprob_min < 0:
      raise ValueError(f"logprob_min must be < 0, got {logprob_min}")
    self.logprob_min = float(logprob_min)
    self.qmax = (1 << logprob_bits) - 1
    self.step = -self.logprob_min / self.qmax
    n = seq_len * k
    self.num_words = -(-n * self.width // 64)
    offset = np.arange(n, dtype=np.uint64) * np.uint64(self.width)
    self._word = (offset >> np.uint64(6)).astype(np.int64)
    self._shift = offset & np.uint64(63)
    self._spill = (self._shift + np.uint64(self.width)) > 64  # the entry continues in the next word
    self._next = np.minimum(self._word + 1, self.num_words - 1)
    self._back = (np.uint64(64) - self._shift) & np.uint64(63)  # 0 only where nothing spills
    self._mask = np.uint64((1 << self.width) - 1) if self.width < 64 else np.uint64(2**64 - 1)
    # reduceat group starts: the word indices are non-decreasing, so each word's entries are a run.
    self._lo_starts = np.flatnonzero(np.r_[True, self._word[1:] != self._word[:-1]])
    self._spill_idx = np.flatnonzero(self._spill)

  def quantize(self, logp):
    x = (np.maximum(np.asarray(logp, np.float64), self.logprob_min) - self.logprob_min) / self.step
    return np.clip(np.rint(x), 0, self.qmax).astype(np.uint64)

  def dequantize(self, q):
    return (self.logprob_min + q.astype(np.float64) * self.step).astype(np.float32)

  def pack(self, logp_Tk, ids_Tk) -> np.ndarray:
    """[T, k] log-probs and ids -> uint64 [num_words]."""
    ids = np.asarray(ids_Tk).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"token ids outside [0, {self.vocab_size})")
    e = (ids.astype(np.uint64) << np.uint64(self.logprob_bits)) | self.quantize(logp_Tk).reshape(-1)
    words = np.zeros(self.num_words, np.uint64)
    # Entries never share bits, so OR-reducing each word's run of contributions is exact.
    lo = e << self._shift
    words[self._word[self._lo_starts]] |= np.bitwise_or.reduceat(lo, self._lo_starts)
    s = self._spill_idx
    if s.size:
      words[self._word[s] + 1] |= e[s] >> self._back[s]  # at most one spill lands in each word
    return words

  def unpack(self, words_BW) -> tuple[np.ndarray, np.ndarray]:
    """uint64 [B, num_words] -> (log-probs float32 [B, T, k], ids int32 [B, T, k])."""
    lo = words_BW[:, self._word] >> self._shift
    hi = np.where(self._spill, words_BW[:, self._next] << self._back, np.uint64(0))
    e = (lo | hi) & self._mask
    shape = (words_BW.shape[0], self.seq_len, self.k)
    ids = (e >> np.uint64(self.logprob_bits)).astype(np.int32).reshape(shape)
    q = e & np.uint64(self.qmax)
    return self.dequantize(q).reshape(shape), ids


def _runs(seg, pos) -> np.ndarray:
  """int32 [n, 3] (start, segment id, first position) of stretches of one segment, positions + 1."""
  seg = np.asarray(seg, np.int64)
  pos = np.asarray(pos, np.int64)
  new = np.ones(len(seg), bool)
  new[1:] = (seg[1:] != seg[:-1]) | (pos[1:] != pos[:-1] + 1)
  starts = np.flatnonzero(new)
  return np.stack([starts, seg[starts], pos[starts]], axis=1).astype("<i4")


def _from_runs(runs, n: int) -> tuple[np.ndarray, np.ndarray]:
  starts = runs[:, 0].astype(np.int64)
  lengths = np.diff(np.r_[starts, n])
  seg = np.repeat(runs[:, 1], lengths).astype(np.int32)
  offset = np.arange(n) - np.repeat(starts, lengths)
  pos = (np.repeat(runs[:, 2], lengths) + offset).astype(np.int32)
  return seg, pos


def encode_row(codec: _Codec, tokens, segment_ids, positions, topk_logprobs_Tk, topk_ids_Tk) -> bytes:
  """One record: the row's T + 1 tokens / segment ids / positions and the teacher's [T, k] top-k."""
  T = codec.seq_len
  for name, a in (("tokens", tokens), ("segment_ids", segment_ids), ("positions", positions)):
    if np.shape(a) != (T + 1,):
      raise ValueError(f"{name} must be [seq_len + 1] = [{T + 1}], got {np.shape(a)}")
  for name, a in (("topk_logprobs", topk_logprobs_Tk), ("topk_ids", topk_ids_Tk)):
    if np.shape(a) != (T, codec.k):
      raise ValueError(f"{name} must be [seq_len, k] = [{T}, {codec.k}], got {np.shape(a)}")
  runs = _runs(segment_ids, positions)
  return b"".join([np.asarray([len(runs)], "<i4").tobytes(), runs.tobytes(),
                   np.asarray(tokens, "<i4").tobytes(),
                   codec.pack(topk_logprobs_Tk, topk_ids_Tk).astype("<u8").tobytes()])


def _decode_row(codec: _Codec, record: bytes) -> dict[str, np.ndarray]:
  T = codec.seq_len
  n_runs = int(np.frombuffer(record, "<i4", count=1)[0]) if len(record) >= 4 else -1
  expected = 4 + 12 * n_runs + 4 * (T + 1) + 8 * codec.num_words
  if n_runs < 1 or len(record) != expected:
    raise DataError(f"corrupt teacher top-k record: {len(record)} bytes, expected {expected} for "
                    f"seq_len={T}, k={codec.k} ({n_runs} runs)")
  runs = np.frombuffer(record, "<i4", count=3 * n_runs, offset=4).reshape(n_runs, 3)
  off = 4 + 12 * n_runs
  tokens = np.frombuffer(record, "<i4", count=T + 1, offset=off).astype(np.int32)
  words = np.frombuffer(record, "<u8", count=codec.num_words, offset=off + 4 * (T + 1))
  seg, pos = _from_runs(runs, T + 1)
  return {"row": tokens, "seg": seg, "pos": pos, "words": words.astype(np.uint64)}


def decode_records(codec: _Codec, piece_bytes: np.ndarray, records: Sequence[bytes]) -> dict:
  """Records -> the batch dict of the module docstring (numpy, [len(records), T, ...])."""
  rows = [_decode_row(codec, r) for r in records]
  full = np.stack([r["row"] for r in rows])
  seg = np.stack([r["seg"] for r in rows])
  pos = np.stack([r["pos"] for r in rows])
  logp, ids = codec.unpack(np.stack([r["words"] for r in rows]))
  return model_batch(full, seg, pos, piece_bytes) | {"topk_logprobs": logp, "topk_ids": ids}




# ----------------------------------------------------------------------------------------------------
# Writing


class TopKWriter:
  """Writes rows + top-k to `output_dir/teacher_topk.array_record-NNNNN` shards and `meta.json`.

  A new shard starts every `rows_per_shard` rows (the row count is not known in advance). `close()`
  writes meta.json last, so a directory without it is an unfinished run. Use as a context manager.

  Resumable: when a shard is complete, `progress.json` records the counts so far (and `run`, what
  the caller says the records depend on). `resume=True` on an unfinished directory keeps its
  complete shards, drops the one in progress, and continues after `rows` rows; a directory of a
  different `run` is refused.
  """

  def __init__(self, output_dir: str | os.PathLike, *, k: int, seq_len: int, vocab_size: int,
               piece_bytes: np.ndarray, tokenizer: str | None = None,
               tokenizer_sha256: str | None = None, logprob_bits: int = LOGPROB_BITS,
               logprob_min: float = LOGPROB_MIN, rows_per_shard: int = 8192,
               extra_meta: Mapping[str, Any] | None = None, run: Mapping[str, Any] | None = None,
               resume: bool = False):
    if not 1 <= k <= vocab_size:
      raise ValueError(f"k must be in [1, vocab_size={vocab_size}], got {k}")
    self.dir = os.fspath(output_dir)
    if is_remote(self.dir):
      # array_record writes local files only (its bundled GCS client reads, it does not write).
      raise DataError(f"output_dir {self.dir}: teacher top-k records are written to a local "
                      "directory (or a gcsfuse mount); copy it to the bucket afterwards, the trainer "
                      "reads gs:// directly")
    os.makedirs(self.dir, exist_ok=True)
    self.codec = _Codec(seq_len=seq_len, k=k, vocab_size=vocab_size, logprob_bits=logprob_bits,
                        logprob_min=logprob_min)
    self._meta = dict(tokenizer=tokenizer, tokenizer_sha256=tokenizer_sha256, **(extra_meta or {}))
    self._rows_per_shard = rows_per_shard
    np.save(os.path.join(self.dir, "piece_bytes.npy"), np.asarray(piece_bytes, np.int32))
    self._writer = None
    self._shards: list[str] = []
    self.rows = 0
    self.record_bytes = 0
    self.loss_tokens = 0
    self.max_abs_error = 0.0  # over kept log-probs >= logprob_min (lower ones are clamped)
    self.clamped = 0
    self._run = json.loads(json.dumps(dict(run or {})))
    if resume:
      self._resume()

  _COUNTS = ("rows", "record_bytes", "loss_tokens", "max_abs_error", "clamped")

  def _progress_path(self) -> str:
    return os.path.join(self.dir, "progress.json")

  def _resume(self):
    done = {}
    if os.path.exists(self._progress_path()):
      with open(self._progress_path()) as f:
        done = json.load(f)
      if done.get("run") != self._run:
        raise DataError(f"{self.dir} holds an unfinished run with other settings ({done.get('run')} "
                        f"there, {self._run} now); use a new output directory")
      for key in self._COUNTS:
        setattr(self, key, done[key])
      self._shards = list(done["shards"])
    for name in os.listdir(self.dir):  # the shard in progress when the run stopped
      if name.startswith(SHARD_PREFIX) and name not in self._shards:
        os.remove(os.path.join(self.dir, name))

  def _open_shard(self):
    from array_record.python.array_record_module import ArrayRecordWriter

    if self._writer is not None:
      self._writer.close()
      state = {key: getattr(self, key) for key in self._COUNTS}
      tmp = self._progress_path() + ".tmp"
      with open(tmp, "w") as f:
        json.dump(dict(state, shards=self._shards, run=self._run), f)
      os.replace(tmp, self._progress_path())  # a complete shard is recorded atomically
    name = f"{SHARD_PREFIX}{len(self._shards):05d}"
    self._shards.append(name)
    self._writer = ArrayRecordWriter(os.path.join(self.dir, name), ARRAY_RECORD_OPTIONS)

  def write(self, tokens, segment_ids, positions, topk_logprobs_Tk, topk_ids_Tk) -> None:
    """One packed row: tokens / segment_ids / positions [T + 1], top-k of its T inputs [T, k]."""
    if self._writer is None or self.rows % self._rows_per_shard == 0:
      self._open_shard()
    logp = np.asarray(topk_logprobs_Tk, np.float32)
    record = encode_row(self.codec, tokens, segment_ids, positions, logp, topk_ids_Tk)
    self._writer.write(record)
    self.record_bytes += len(record)
    inside = logp >= self.codec.logprob_min
    err = np.abs(self.codec.dequantize(self.codec.quantize(logp)) - logp)[inside]
    if err.size:
      self.max_abs_error = max(self.max_abs_error, float(err.max()))
    self.clamped += int(np.sum(~inside))
    seg = np.asarray(segment_ids)
    self.loss_tokens += int(np.sum((seg[:-1] != 0) & (seg[1:] == seg[:-1])))
    self.rows += 1

  def close(self) -> dict:
    """Closes the last shard and writes meta.json; returns the meta dict."""
    if self._writer is None:
      self._open_shard()  # zero rows still make a readable (empty) dataset
    self._writer.close()
    self._writer = None
    c = self.codec
    nbytes = sum(os.path.getsize(os.path.join(self.dir, s)) for s in self._shards)
    tokens = self.rows * c.seq_len
    meta = dict(
        format=FORMAT, version=VERSION, k=c.k, seq_len=c.seq_len, vocab_size=c.vocab_size,
        **self._meta, rows=self.rows, tokens=tokens, loss_tokens=self.loss_tokens,
        bytes=nbytes, bytes_per_token=nbytes / max(tokens, 1),
        record_bytes_per_token=self.record_bytes / max(tokens, 1), shards=self._shards,
        quantization=dict(scheme="uniform in log-prob; entry = (id << logprob_bits) | q",
                          id_bits=c.id_bits, logprob_bits=c.logprob_bits, logprob_min=c.logprob_min,
                          step=c.step, max_abs_error=self.max_abs_error, clamped=self.clamped),
        tail="implicit: 1 - sum(exp(topk_logprobs)) per token")
    with open(os.path.join(self.dir, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(self._progress_path()):
      os.remove(self._progress_path())
    self.meta = meta
    return meta

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    elif self._writer is not None:
      self._writer.close()  # no meta.json: the directory is visibly unfinished


def write_teacher_topk(output_dir, batches, *, k: int, seq_len: int, vocab_size: int,
                       piece_bytes: np.ndarray, **writer_kw) -> dict:
  """Writes an iterable of row batches; each is a dict of `tokens`, `segment_ids`, `positions`
  [B, T + 1] and `topk_logprobs`, `topk_ids` [B, T, k]. Returns meta.json's dict."""
  with TopKWriter(output_dir, k=k, seq_len=seq_len, vocab_size=vocab_size, piece_bytes=piece_bytes,
                  **writer_kw) as w:
    for b in batches:
      for i in range(len(b["tokens"])):
        w.write(b["tokens"][i], b["segment_ids"][i], b["positions"][i], b["topk_logprobs"][i],
                b["topk_ids"][i])
  return w.meta


def packed_rows(cfg, tokenizer_path, *, vocab_size: int | None = None,
                num_real_tokens: int | None = None, process_index: int = 0, process_count: int = 1):
  """(grain IterDataset of packed rows, Tokenizer): one epoch of `cfg`'s rows in order, unshuffled,
  of data shard `process_index` of `process_count`: the rows
  `make_train_iterator(cfg.replace(shuffle=False, num_epochs=1), process_index=, process_count=)`
  batches.

  Rows are {"tokens", "tokens_segment_ids", "tokens_positions"} int32 [seq_len + 1].
  """
  from gemma2_jax.data.pipeline import rows
  from gemma2_jax.data.tokenizer import Tokenizer

  chat = [s.label for s in cfg.sources if s.chat]
  if chat:  # the records keep tokens only: a chat loss mask would be lost, training every token
    raise DataError(f"chat sources {chat} cannot be written as offline teacher records (they do not "
                    "store the loss mask of model turns); distill chat data online (teacher.checkpoint)")
  tok = Tokenizer(tokenizer_path, num_threads=cfg.num_threads)
  tok.check(vocab_size, num_real_tokens=num_real_tokens)
  return rows(cfg, tok, process_index=process_index, process_count=process_count, num_epochs=1,
              shuffle=False), tok


# ----------------------------------------------------------------------------------------------------
# Reading


def _read_meta(directory: str) -> dict:
  path = as_path(directory) / "meta.json"
  if not path.exists():
    raise DataError(f"no meta.json in {directory}: not a finished teacher_logits output")
  try:
    meta = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e}); re-run teacher_logits") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
    meta = meta if isinstance(meta, dict) else {}
    raise DataError(f"{path} is not a {FORMAT} v{VERSION} meta.json (format={meta.get('format')!r}, "
                    f"version={meta.get('version')!r})")
  return meta


def resolve_shards(paths: str | Sequence[str]) -> tuple[list[str], dict, np.ndarray]:
  """Directories / globs (a comma-separated string or a sequence), local or gs://, -> (shard files,
  meta, piece bytes).

  Every directory involved must hold a meta.json with the same k, seq_len, vocabulary, bit layout and
  tokenizer.
  """
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p]
  if not paths:
    raise DataError("no teacher top-k paths given")
  files: list[str] = []
  for p in paths:
    if as_path(p).is_dir():
      # One teacher_logits run of several data groups writes one part directory per group.
      found = glob(os.path.join(p, SHARD_PREFIX + "*")) or glob(os.path.join(p, "part-*", SHARD_PREFIX + "*"))
    else:
      found = [f for f in glob(p) if os.path.basename(f).startswith(SHARD_PREFIX)]
    if not found:
      raise DataError(f"no teacher top-k shards ({SHARD_PREFIX}*) at {p!r}")
    files += found
  files = list(dict.fromkeys(files))
  metas = {d: _read_meta(d) for d in dict.fromkeys(os.path.dirname(f) for f in files)}
  first_dir, meta = next(iter(metas.items()))
  for d, m in metas.items():
    for key in ("k", "seq_len", "vocab_size", "quantization", "tokenizer_sha256"):
      a, b = (_layout(meta), _layout(m)) if key == "quantization" else (meta.get(key), m.get(key))
      if a != b:
        raise DataError(f"teacher top-k directories disagree on {key}: {first_dir} has {a}, {d} has {b}")
  piece_bytes = np.load(io.BytesIO((as_path(first_dir) / "piece_bytes.npy").read_bytes()))
  return files, meta, piece_bytes


def _layout(meta: dict) -> tuple:
  q = meta["quantization"]
  return (q["id_bits"], q["logprob_bits"], q["logprob_min"])


class _Decode(grain.transforms.Map):
  def __init__(self, codec: _Codec, piece_bytes: np.ndarray):
    self._codec, self._piece_bytes = codec, piece_bytes

  def map(self, records):
    return decode_records(self._codec, self._piece_bytes, list(records))


class OfflineIterator(Iterator[dict[str, np.ndarray]]):
  """Batches of rows + teacher top-k; get_state()/set_state() are small JSON-safe dicts."""

  def __init__(self, ds: grain.IterDataset, fingerprint: Mapping[str, Any], meta: dict):
    self._it = iter(ds)
    self._fingerprint = json.loads(json.dumps(dict(fingerprint)))
    self.meta = meta

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self._it)
    except StopIteration:
      raise
    except BaseException:
      self.close()  # no reader thread outlives the error (see pipeline.stop_threads)
      raise

  def close(self) -> None:
    stop_threads(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"grain": json.loads(json.dumps(self._it.get_state())), "fingerprint": self._fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    saved = state.get("fingerprint")
    if saved is not None and saved != self._fingerprint:
      diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
      raise DataError(f"offline iterator state was saved by a different pipeline; (saved, now): {diff}")
    self._it.set_state(from_json(state["grain"]))


def make_offline_iterator(paths: str | Sequence[str], *, global_batch: int, seq_len: int, seed: int = 0,
                          shuffle: bool = True, num_epochs: int | None = None,
                          process_index: int | None = None, process_count: int | None = None,
                          k: int | None = None, num_threads: int = 2,
                          prefetch: int = 4) -> OfflineIterator:
  """Batches of B = global_batch // process_count rows from teacher_logits output.

  The rows of all shards form one dataset; each epoch is a global permutation seeded by seed + epoch
  (identity order with shuffle=False); the epochs are concatenated and process p takes global slots
  p, p + P, ... of that stream, so the processes together read every row exactly once per epoch.
  Infinite unless num_epochs is set (then the last partial batch is dropped). `k`, when given, must
  match the records.
  """
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} not in [0, {process_count})")
  if global_batch % process_count:
    raise DataError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
  if num_epochs is not None and num_epochs < 1:
    raise DataError(f"num_epochs must be None or >= 1, got {num_epochs}")
  files, meta, piece_bytes = resolve_shards(paths)
  if meta["seq_len"] != seq_len:
    raise DataError(f"teacher top-k records hold rows of seq_len={meta['seq_len']} but training uses "
                    f"seq_len={seq_len}; re-run teacher_logits with train.seq_len={seq_len}")
  if k is not None and meta["k"] != k:
    raise DataError(f"teacher top-k records keep k={meta['k']} tokens, expected k={k}")
  q = meta["quantization"]
  codec = _Codec(seq_len=seq_len, k=meta["k"], vocab_size=meta["vocab_size"],
                 logprob_bits=q["logprob_bits"], logprob_min=q["logprob_min"])
  if codec.id_bits != q["id_bits"]:
    raise DataError(f"meta.json id_bits {q['id_bits']} != {codec.id_bits} for vocab {meta['vocab_size']}")
  source = ArrayRecords(files)
  n = len(source)
  if n < process_count:
    raise DataError(f"{n} teacher top-k rows are fewer than the {process_count} processes reading them")
  ds = grain.MapDataset.source(source)
  if shuffle and n > 1:
    ds = ds.shuffle(seed=seed % 2**32)  # reseeded per epoch (seed + epoch) by grain
  ds = ds.repeat(num_epochs)  # None = forever
  ds = ds[process_index::process_count]
  batch = global_batch // process_count
  ds = ds.batch(batch, drop_remainder=True, batch_fn=list).map(_Decode(codec, piece_bytes))
  ds = ds.to_iter_dataset(gp.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  fingerprint = dict(rows=n, k=meta["k"], seq_len=seq_len, global_batch=global_batch, seed=seed,
                     shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                     process_count=process_count)
  return OfflineIterator(ds, fingerprint, meta)
