"""Random-access document sources: text lines/files, JSONL, Parquet, pre-tokenized ArrayRecord, TFDS.

Every source is a grain `RandomAccessDataSource`: `len(src)` documents, `src[i]` is a `str` (raw
text), an int32 token array (pre-tokenized), a `chat.Conversation` (a chat source: JSONL / Parquet
with `chat=True`), or None when a bad record was skipped. Random access
is what makes global shuffling, per-process sharding and exact resume cheap. Raw text sources build
a line-offset index at start-up (one sequential scan); for corpora of hundreds of GB, tokenize once
with `python -m gemma2_jax.prepare_data` and train from the ArrayRecord shards instead.

Remote (gs://) text / JSONL / Parquet sources are sharded by bytes (`RemoteLinesSource`,
`ParquetSource` with a shard): data group g of G takes the g-th G-th of the corpus's bytes (the files'
sizes come from the listing, in file order) and holds only the documents that start in it, so each
host reads and indexes only its own part, in blocks, with bounded memory. Their documents are read
with concurrent ranged GETs, neighbours coalesced (`_Files.read_ranges`); see `RemoteReads`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gemma2_jax import paths
from gemma2_jax.data.chat import RESPONSE_FIELDS, ChatError, Conversation, conversation
from gemma2_jax.data.config import REMOTE_READ_BLOCK_BYTES, REMOTE_READ_CONCURRENCY, SourceConfig
from gemma2_jax.errors import UserError

log = logging.getLogger(__name__)

# Per-process counts of bad input that was repaired or skipped (reported by prepare_data / bench).
STATS: collections.Counter = collections.Counter()
_LOG_FIRST = 10  # log each kind of problem for the first few occurrences, then every 1000th


class DataError(UserError):
  """Bad data or configuration; the message is one line naming the file (and line) at fault."""


def note(kind: str, msg: str) -> None:
  """Counts a problem that was repaired or skipped in STATS; logs the first few of each kind."""
  STATS[kind] += 1
  n = STATS[kind]
  if n <= _LOG_FIRST or n % 1000 == 0:
    log.warning("%s (%s #%d)", msg, kind, n)


def _is_remote(path: str) -> bool:
  return "://" in path


def expand_paths(patterns: Sequence[str] | str) -> list[str]:
  """Expands globs (local, or gs:// etc. via etils.epath) into a sorted, de-duplicated file list."""
  if isinstance(patterns, str):
    patterns = [patterns]
  files: list[str] = []
  for pat in patterns:
    has_glob = any(c in pat for c in "*?[")
    if _is_remote(pat):
      from etils import epath

      root = epath.Path(pat)
      if not has_glob and root.is_dir():  # every file under it, as for a local directory
        found = sorted(_remote_files(root))
      else:
        found = paths.glob(pat)
    elif has_glob:
      found = [p for p in paths.glob(pat) if os.path.isfile(p)]
    else:
      p = os.path.expanduser(pat)
      if os.path.isdir(p):
        found = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs
                       if not f.startswith("."))
      else:
        found = [p] if os.path.exists(p) else []
    if not found:
      what = "no files match glob" if has_glob else "path does not exist"
      raise DataError(f"{what}: {pat!r}")
    files.extend(found)
  return sorted(dict.fromkeys(files))


def _remote_files(directory) -> list[str]:
  # Not epath's walk(): on gcsfs it yields directories without their gs:// prefix.
  out = []
  for p in directory.iterdir():
    if p.is_dir():
      out += _remote_files(p)
    elif not p.name.startswith("."):
      out.append(str(p))
  return out


def infer_format(files: Sequence[str]) -> str:
  exts = {_ext(f) for f in files}
  fmts = {_EXT_FORMAT.get(e) for e in exts}
  if len(fmts) != 1 or None in fmts:
    raise DataError(f"cannot infer format from extensions {sorted(exts)}; set format= explicitly")
  return fmts.pop()


_EXT_FORMAT = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl",
               ".parquet": "parquet", ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord"}


def _ext(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".gz", ".zst"):
    if name.endswith(suffix):
      raise DataError(f"compressed input is not supported, decompress first: {path}")
  # ArrayRecord shards are often named foo.array_record-00000-of-00008.
  if ".array_record" in name or ".arrayrecord" in name:
    return ".arrayrecord"
  return os.path.splitext(name)[1].lower()


def decode_utf8(raw: bytes, where: str, bad_utf8: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if bad_utf8 == "fail":
      raise DataError(f"{where}: invalid UTF-8 at byte {e.start} (set bad_utf8='replace' to "
                      "repair)") from None
    note("bad_utf8", f"{where}: invalid UTF-8 at byte {e.start}, replaced with U+FFFD")
    return raw.decode("utf-8", errors="replace")


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def reader_error(path: str, what: str, e: BaseException) -> DataError:
  """A reader library's exception as one DataError line naming the file (the libraries name none)."""
  return DataError(f"{path}: {what} ({_first_line(e)})")


@dataclasses.dataclass(frozen=True)
class RemoteReads:
  """How remote sources read (DataConfig.remote_read_concurrency / remote_read_block_bytes).

  concurrency: ranged GETs in flight per process, shared by every remote source of the process.
  block_bytes: size of each read of a text / JSONL shard's index scan (so at most concurrency x
    block_bytes of read buffers while indexing), and the largest read that neighbouring documents
    are coalesced into.
  """

  concurrency: int = REMOTE_READ_CONCURRENCY
  block_bytes: int = REMOTE_READ_BLOCK_BYTES


# Documents of one file at most this many bytes apart (a newline, blank lines) are read with one
# ranged GET: an unshuffled pass reads blocks; shuffled reads merge only true neighbours, so no bytes
# of other documents are read (they are some other chunk's, and would be read again there).
_COALESCE_GAP = 64
# An index scan reads this far past its shard's end (at most block_bytes) with the shard's last
# block, for the rest of the line crossing the end; a longer line is read on in growing blocks.
_TAIL_BYTES = 64 << 10

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(concurrency: int) -> ThreadPoolExecutor:
  """The process's reader threads for `concurrency` requests in flight (shared by all sources)."""
  with _POOLS_LOCK:
    pool = _POOLS.get(concurrency)
    if pool is None:
      pool = _POOLS[concurrency] = ThreadPoolExecutor(concurrency,
                                                      thread_name_prefix="remote-read")
    return pool


os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the threads


class _Files:
  """Thread-safe positional reads, local or remote (fsspec, as epath uses for gs:// without
  TensorFlow); handles are reopened lazily after pickling (grain workers)."""

  def __init__(self, files: Sequence[str]):
    self.files = list(files)
    self._handles: dict[int, object] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"files": self.files}

  def __setstate__(self, state):
    self.__init__(state["files"])

  def _fs(self, f: int):
    """(fsspec filesystem, key) of remote file f."""
    fs_path = self._handles.get(f)
    if fs_path is None:
      import fsspec

      with self._lock:
        fs_path = self._handles.setdefault(f, fsspec.core.url_to_fs(self.files[f]))
    return fs_path

  def read(self, f: int, start: int, stop: int) -> bytes:
    path = self.files[f]
    if not _is_remote(path):
      fd = self._handles.get(f)
      if fd is None:
        with self._lock:
          fd = self._handles.setdefault(f, os.open(path, os.O_RDONLY))
      return os.pread(fd, stop - start, start)
    # One ranged GET and no open handle: a gcsfs file's read-ahead is wasted on shuffled reads,
    # and its pending prefetch tasks are logged as errors at interpreter exit.
    fs, key = self._fs(f)
    try:
      data = fs.cat_file(key, start=start, end=stop)
    except Exception as e:  # gcsfs / aiohttp errors after their retries: name the file
      raise reader_error(path, f"cannot read bytes {start}-{stop}", e) from None
    if len(data) != stop - start:
      raise DataError(f"{path}: read {len(data)} of bytes {start}-{stop}: the file changed since "
                      "start-up")
    return data

  def read_ranges(self, ranges: Sequence[tuple[int, int, int]], reads: RemoteReads) -> list[bytes]:
    """The bytes of each (file, start, stop), read concurrently (reads.concurrency in flight): the
    ranges of a file at most _COALESCE_GAP apart are read with one request of up to
    reads.block_bytes."""
    order = sorted(range(len(ranges)), key=ranges.__getitem__)
    groups: list[list] = []  # [file, start, stop, members]
    for k in order:
      f, a, b = ranges[k]
      g = groups[-1] if groups else None
      if (g is not None and g[0] == f and a - g[2] <= _COALESCE_GAP
          and max(b, g[2]) - g[1] <= reads.block_bytes):
        g[2] = max(g[2], b)
        g[3].append(k)
      else:
        groups.append([f, a, b, [k]])
    if len(groups) == 1:
      datas = [self.read(*groups[0][:3])]
    else:
      datas = list(_pool(reads.concurrency).map(lambda g: self.read(g[0], g[1], g[2]), groups))
    out = [b""] * len(ranges)
    for (_, a, _, members), data in zip(groups, datas, strict=True):
      for k in members:
        _, start, stop = ranges[k]
        out[k] = data[start - a:stop - a]
    return out

  def size(self, f: int) -> int:
    path = self.files[f]
    if _is_remote(path):
      from etils import epath

      return epath.Path(path).stat().length
    return os.path.getsize(path)

  def sizes(self) -> list[int]:
    """Every file's size: remote ones from one listing of each directory (fsspec's listing cache
    often has it from expand_paths already), not one request per file."""
    out = [0] * len(self.files)
    by_dir: dict[str, list[int]] = collections.defaultdict(list)
    for f, path in enumerate(self.files):
      if _is_remote(path):
        by_dir[path.rsplit("/", 1)[0]].append(f)
      else:
        out[f] = os.path.getsize(path)
    for members in by_dir.values():
      fs, key = self._fs(members[0])
      try:
        listed = {e["name"].rstrip("/"): e["size"] for e in fs.ls(key.rsplit("/", 1)[0], detail=True)
                  if e.get("type") != "directory"}
      except Exception:  # e.g. no permission to list: ask for each file
        listed = {}
      for f in members:
        key = self._fs(f)[1]
        out[f] = int(listed[key]) if key in listed else int(fs.size(key))
    return out

  def read_all(self, f: int) -> bytes:
    path = self.files[f]
    if _is_remote(path):
      from etils import epath

      return epath.Path(path).read_bytes()
    with open(path, "rb") as fh:
      return fh.read()


def _line_index(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """uint8 file contents -> (starts, stops, 1-based line numbers) of the non-empty lines."""
  # Scan in blocks: a whole-file `buf == 10` would allocate one byte per byte of a multi-GB file.
  block = 1 << 26
  nl = np.concatenate([np.flatnonzero(buf[i:i + block] == 10) + i
                       for i in range(0, len(buf), block)] or [np.zeros(0, np.int64)])
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  stops = np.concatenate([nl, [len(buf)]]).astype(np.int64)
  # Strip CR of CRLF endings.
  has_cr = stops > starts
  has_cr[has_cr] = buf[stops[has_cr] - 1] == 13
  stops -= has_cr
  keep = stops > starts
  lines = np.flatnonzero(keep).astype(np.int64) + 1
  return starts[keep], stops[keep], lines


class LinesSource:
  """One document per non-empty line of text or JSONL files (JSONL: `text_field` of each object, or
  with `chat` the conversation each object holds)."""

  def __init__(self, files: Sequence[str], *, jsonl_field: str | None, bad_utf8: str,
               bad_records: str, chat: bool = False):
    self._files = _Files(files)
    self._field = jsonl_field
    self._chat = chat
    self._bad_utf8 = bad_utf8
    self._bad_records = bad_records
    starts, stops, lines, counts = [], [], [], []
    for f, path in enumerate(files):
      if _is_remote(path):
        buf = np.frombuffer(self._files.read_all(f), np.uint8)
      elif os.path.getsize(path) == 0:
        buf = np.zeros(0, np.uint8)
      else:
        buf = np.memmap(path, np.uint8, mode="r")
      s, e, ln = _line_index(buf)
      del buf
      starts.append(s)
      stops.append(e)
      lines.append(ln)
      counts.append(len(s))
    self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self._stops = np.concatenate(stops) if stops else np.zeros(0, np.int64)
    self._lines = np.concatenate(lines) if lines else np.zeros(0, np.int64)
    self._cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._cum[-1])

  def where(self, i: int) -> str:
    f = int(np.searchsorted(self._cum, i, side="right")) - 1
    return f"{self._files.files[f]}:{int(self._lines[i])}"

  def __getitem__(self, i: int) -> str | Conversation | None:
    f = int(np.searchsorted(self._cum, i, side="right")) - 1
    return self._doc(i, self._files.read(f, int(self._starts[i]), int(self._stops[i])))

  def _doc(self, i: int, raw: bytes) -> str | Conversation | None:
    """Line i's bytes -> its document (text, a conversation, or None for a skipped bad record)."""
    if self._field is None and not self._chat:
      return decode_utf8(raw, self.where(i), self._bad_utf8)
    try:
      obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      if isinstance(e, UnicodeDecodeError) or "surrogate" in str(e):
        # Let the UTF-8 policy decide, then parse the repaired text.
        try:
          obj = json.loads(decode_utf8(raw, self.where(i), self._bad_utf8))
        except json.JSONDecodeError as e2:
          return self._bad(i, f"malformed JSON ({e2.msg})")
      elif raw.strip():
        return self._bad(i, f"malformed JSON ({e.msg} at column {e.colno})")
      else:
        return None
    if self._chat:
      try:
        return conversation(obj)
      except ChatError as e:
        return self._bad(i, f"malformed conversation: {e}")
    if not isinstance(obj, dict) or self._field not in obj:
      keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
      return self._bad(i, f"missing text field {self._field!r} (has {keys})")
    text = obj[self._field]
    if not isinstance(text, str):
      return self._bad(i, f"text field {self._field!r} is {type(text).__name__}, not a string")
    return text

  def _bad(self, i: int, msg: str) -> None:
    where = self.where(i)
    if self._bad_records == "fail":
      raise DataError(f"{where}: {msg} (set bad_records='skip' to skip and count)")
    note("bad_records", f"{where}: {msg}; skipped")
    return None


def _segments(sizes: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
  """Bytes [lo, hi) of the files laid end to end -> (file, start, stop) within each file."""
  out, offset = [], 0
  for f, n in enumerate(sizes):
    a, b = max(lo, offset), min(hi, offset + n)
    if a < b:
      out.append((f, a - offset, b - offset))
    offset += n
  return out


class _LineScanner:
  """Streaming line index of one segment [a, b) of a file of `size` bytes: the non-empty lines that
  start in it (as `_line_index` finds them), fed its bytes in order from a - 1 (to see whether a
  starts a line) until the last such line has ended."""

  def __init__(self, a: int, b: int, size: int):
    self.a, self.b, self.size = a, b, size
    self.pos = a - 1 if a else 0  # the next byte to feed
    self.pending = 0 if a == 0 else -1  # start of the open line that starts in [a, b); -1: none
    self.prev_cr = False  # the last byte fed is CR
    self.done = False
    self.starts: list[np.ndarray] = []
    self.lens: list[np.ndarray] = []

  def feed(self, x: int, data: bytes) -> None:
    assert x == self.pos and not self.done, (x, self.pos)
    buf = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(buf == 10)
    if len(nl):
      cr = np.zeros(len(nl), bool)
      cr[nl > 0] = buf[nl[nl > 0] - 1] == 13
      cr[0] |= nl[0] == 0 and self.prev_cr
      nl = nl.astype(np.int64) + x
      # The line after newline n starts in [a, b) iff n < b - 1: those newlines begin lines of
      # this segment; the next newline after each line start ends it (CR of CRLF stripped).
      k = int(np.searchsorted(nl, self.b - 1))
      starts = np.concatenate([[self.pending], nl[:k] + 1])
      stops = nl[:k + 1] - cr[:k + 1]
      starts_done = starts[:len(stops)]
      keep = (starts_done >= 0) & (stops > starts_done)
      self._add(starts_done[keep], stops[keep])
      if k < len(nl):  # a newline at or after b - 1 ended the segment's last line
        self.pending, self.done = -1, True
      else:
        self.pending = int(starts[-1])
    self.prev_cr = bool(len(buf)) and bool(buf[-1] == 13)
    self.pos = x + len(buf)
    if self.pending < 0 and self.pos >= self.b:  # no line starts in [a, b)
      self.done = True

  def finish(self) -> None:
    """At the end of the file: its last line has no newline."""
    if not self.done and self.pending >= 0:
      assert self.pos == self.size, (self.pos, self.size)
      stop = self.size - self.prev_cr
      if stop > self.pending:
        self._add(np.array([self.pending], np.int64), np.array([stop], np.int64))
    self.done = True

  def _add(self, starts: np.ndarray, stops: np.ndarray) -> None:
    lens = stops - starts
    if len(lens) and lens.max() >= 2**32:
      raise DataError(f"a line of {int(lens.max())} bytes (4 GiB at most)")
    self.starts.append(starts.astype(np.int64))
    self.lens.append(lens.astype(np.uint32))


def _index_lines(files: _Files, sizes: Sequence[int], segments: Sequence[tuple[int, int, int]],
                 reads: RemoteReads) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """(starts int64, lengths uint32, count per segment) of the non-empty lines that start in each
  (file, a, b) segment. Each segment is read from a - 1 to b plus up to _TAIL_BYTES (the rest of the
  line crossing b, further on only if it is longer), in blocks of reads.block_bytes with
  reads.concurrency of them in flight and fed in order: memory is the index plus the blocks in
  flight, whatever the size of the corpus."""
  block = reads.block_bytes
  tail = min(block, _TAIL_BYTES)
  scanners = [_LineScanner(a, b, sizes[f]) for f, a, b in segments]
  jobs = iter([(k, x, min(x + block, end))
               for k, (f, a, b) in enumerate(segments)
               for end in [min(b + tail, sizes[f])]
               for x in range(a - 1 if a else 0, end, block)])
  pool = _pool(reads.concurrency)
  window: collections.deque = collections.deque()

  def submit():
    job = next(jobs, None)
    if job is not None:
      window.append((job, pool.submit(files.read, segments[job[0]][0], job[1], job[2])))

  for _ in range(reads.concurrency):
    submit()
  try:
    while window:
      (k, x, _), fut = window.popleft()
      data = fut.result()
      submit()
      if not scanners[k].done:
        scanners[k].feed(x, data)
  finally:
    for _, fut in window:  # after an error: nothing more is read
      fut.cancel()
  for (f, _, _), sc in zip(segments, scanners, strict=True):
    n = 2 * tail
    while not sc.done and sc.pos < sizes[f]:  # a line longer than the tail read so far
      stop = min(sc.pos + n, sizes[f])
      sc.feed(sc.pos, files.read(f, sc.pos, stop))
      n = min(2 * n, block)
    sc.finish()
  starts = [x for sc in scanners for x in sc.starts]
  lens = [x for sc in scanners for x in sc.lens]
  return (np.concatenate(starts) if starts else np.zeros(0, np.int64),
          np.concatenate(lens) if lens else np.zeros(0, np.uint32),
          [sum(len(x) for x in sc.starts) for sc in scanners])


class RemoteLinesSource(LinesSource):
  """A LinesSource of remote files holding one data group's share: data group `shard` of
  `num_shards` takes bytes [shard * S // num_shards, (shard + 1) * S // num_shards) of the S bytes
  of all files laid end to end (sizes from the listing, files in sorted order), and the non-empty
  lines that start there. Only that range (and the rest of its last line) is read, once, to index
  it (`_index_lines`); documents are read with concurrent, coalesced ranged GETs (`__getitems__`).

  Every line starts in exactly one group's range, so the groups together hold every document once.
  `where(i)` names a line by its byte offset (the line number would need the bytes before it).
  """

  presharded = True  # the pipeline shuffles all of its documents, without dealing them out again

  def __init__(self, files: Sequence[str], *, jsonl_field: str | None, bad_utf8: str,
               bad_records: str, chat: bool = False, shard: int = 0, num_shards: int = 1,
               reads: RemoteReads = RemoteReads()):
    self._files = _Files(files)
    self._field = jsonl_field
    self._chat = chat
    self._bad_utf8 = bad_utf8
    self._bad_records = bad_records
    self._reads = reads
    sizes = self._files.sizes()
    self.total_bytes = sum(sizes)
    self.shard, self.num_shards = shard, num_shards
    self.byte_range = (self.total_bytes * shard // num_shards,
                       self.total_bytes * (shard + 1) // num_shards)
    segments = _segments(sizes, *self.byte_range)
    self._starts, self._lens, counts = _index_lines(self._files, sizes, segments, reads)
    self._seg_file = np.array([f for f, _, _ in segments], np.int64)
    self._cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def _file(self, i: int) -> int:
    return int(self._seg_file[int(np.searchsorted(self._cum, i, side="right")) - 1])

  def where(self, i: int) -> str:
    return f"{self._files.files[self._file(i)]}: the line at byte {int(self._starts[i])}"

  def __getitem__(self, i: int) -> str | Conversation | None:
    return self.__getitems__([i])[0]

  def __getitems__(self, ids: Sequence[int]) -> list[str | Conversation | None]:
    ids = [int(i) for i in ids]
    segs = np.searchsorted(self._cum, ids, side="right") - 1
    ranges = [(int(self._seg_file[k]), int(self._starts[i]), int(self._starts[i] + self._lens[i]))
              for i, k in zip(ids, segs, strict=True)]
    raws = self._files.read_ranges(ranges, self._reads)
    return [self._doc(i, raw) for i, raw in zip(ids, raws, strict=True)]


class FilesSource:
  """One document per whole text file (remote ones read concurrently by `__getitems__`)."""

  def __init__(self, files: Sequence[str], *, bad_utf8: str, reads: RemoteReads = RemoteReads()):
    self._files = _Files(files)
    self._bad_utf8 = bad_utf8
    self._reads = reads

  def __len__(self) -> int:
    return len(self._files.files)

  def __getitem__(self, i: int) -> str:
    return decode_utf8(self._files.read_all(i), self._files.files[i], self._bad_utf8)

  def __getitems__(self, ids: Sequence[int]) -> list[str]:
    if len(ids) < 2 or not any(_is_remote(self._files.files[i]) for i in ids):
      return [self[i] for i in ids]
    return list(_pool(self._reads.concurrency).map(self.__getitem__, ids))


def _chat_columns(path: str, names: Sequence[str]) -> list[str]:
  """The columns a chat Parquet file's conversations are read from (see chat.conversation)."""
  if "messages" in names:
    return ["messages"]
  reply = next((f for f in RESPONSE_FIELDS if f in names), None)
  if "prompt" not in names or reply is None:
    raise DataError(f"{path}: a chat source needs a 'messages' column, or 'prompt' and 'response' "
                    f"(or 'completion') columns (columns: {list(names)})")
  return ["prompt", reply] + (["completion_ids"] if reply == "completion" and
                              "completion_ids" in names else [])


class _FetchedBytes(io.RawIOBase):
  """A read-only file of `size` bytes of which only `data` at `offset` was fetched: what pyarrow
  reads a row group from, given the file's metadata (it then reads only the column chunks)."""

  def __init__(self, size: int, offset: int, data: bytes):
    self._size, self._offset, self._data, self._pos = size, offset, data, 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def seek(self, pos: int, whence: int = 0) -> int:
    self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
    return self._pos

  def tell(self) -> int:
    return self._pos

  def readinto(self, buf) -> int:
    a, n = self._pos - self._offset, max(0, min(len(buf), self._size - self._pos))
    if a < 0 or a + n > len(self._data):
      raise OSError(f"bytes {self._pos}-{self._pos + n} were not fetched")
    buf[:n] = self._data[a:a + n]
    self._pos += n
    return n


def _parquet_footer(files: _Files, f: int, size: int):
  """The FileMetaData of remote Parquet file f from its last bytes (one ranged GET, two if the
  footer is longer than 64 KiB)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = files.files[f]
  tail = files.read(f, max(0, size - (64 << 10)), size)
  if size < 12 or tail[-4:] != b"PAR1":
    raise DataError(f"{path}: not a readable Parquet file (no PAR1 footer)")
  need = int.from_bytes(tail[-8:-4], "little") + 8
  if need > len(tail):
    tail = files.read(f, max(0, size - need), size - len(tail)) + tail
  try:
    return pq.read_metadata(pa.BufferReader(tail))
  except Exception as e:
    raise reader_error(path, "not a readable Parquet file", e) from None


def _row_group_bytes(md, g: int, columns: Sequence[str] | None = None) -> tuple[int, int]:
  """[start, stop) of row group g's column chunks (of `columns` only, when given) in its file."""
  rg = md.row_group(g)
  spans = []
  for c in range(rg.num_columns):
    col = rg.column(c)
    if columns is not None and col.path_in_schema.split(".")[0] not in columns:
      continue
    a = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    spans.append((a, a + col.total_compressed_size))  # the size includes the dictionary page
  return min(a for a, _ in spans), max(b for _, b in spans)


class ParquetSource:
  """One document per row of the `text_field` column, or with `chat` one conversation per row;
  row groups are cached (LRU).

  Remote files are sharded by bytes as RemoteLinesSource is (`presharded`): the data group holds
  the row groups that start in its share of the corpus's bytes, reads only the footers of the files
  that share overlaps (concurrently, one ranged GET each), and reads a row group's chunks of the
  columns it needs with one ranged GET; `__getitems__` reads the row groups of a batch of rows
  concurrently, reads.concurrency at a time (the memory of that many row groups' columns).
  """

  _CACHE = 8
  presharded = False

  def __init__(self, files: Sequence[str], *, text_field: str, bad_records: str,
               chat: bool = False, shard: int = 0, num_shards: int = 1,
               reads: RemoteReads = RemoteReads()):
    self._paths = list(files)
    self._field = text_field
    self._bad_records = bad_records
    self._chat = chat
    self._reads = reads
    self._columns: list[list[str] | None] = []  # per file: what is read (files may differ in layout)
    self._meta: dict[int, object] = {}  # remote: file -> FileMetaData
    self._sizes: list[int] = []
    rg_ids: list[list[int]] = []  # per file: the row groups this source holds
    rg_rows: list[list[int]] = []
    if any(_is_remote(p) for p in self._paths):
      self.presharded = True
      files_ = _Files(self._paths)
      self._sizes = files_.sizes()
      self.total_bytes = sum(self._sizes)
      self.byte_range = (self.total_bytes * shard // num_shards,
                         self.total_bytes * (shard + 1) // num_shards)
      segments = _segments(self._sizes, *self.byte_range)
      metas = _pool(reads.concurrency).map(
        lambda seg: _parquet_footer(files_, seg[0], self._sizes[seg[0]]), segments)
      owned = {}
      for (f, a, b), md in zip(segments, metas, strict=True):
        self._meta[f] = md
        owned[f] = [g for g in range(md.num_row_groups) if a <= _row_group_bytes(md, g)[0] < b]
    for f, path in enumerate(self._paths):
      if self.presharded and f not in self._meta:  # no row group of it is in this shard
        self._columns.append(None)
        rg_ids.append([])
        rg_rows.append([])
        continue
      try:
        if self.presharded:
          md = self._meta[f]
          names = md.schema.to_arrow_schema().names
          groups = owned[f]
        else:
          # Remote files never come here: pyarrow's own gs:// filesystem knows neither epath's
          # credentials nor an emulator (without network it hangs).
          import pyarrow.parquet as pq

          with pq.ParquetFile(path) as pf:
            names = pf.schema_arrow.names
            md = pf.metadata
            groups = list(range(pf.num_row_groups))
        rows = [md.row_group(g).num_rows for g in groups]
      except DataError:
        raise
      except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ... for a non-Parquet file
        raise reader_error(path, "not a readable Parquet file", e) from None
      if chat:
        self._columns.append(_chat_columns(path, names))
      elif text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {names})")
      else:
        self._columns.append([text_field])
      rg_ids.append(groups)
      rg_rows.append(rows)
    self._index = [(f, g) for f, groups in enumerate(rg_ids) for g in groups]
    sizes = [n for rows in rg_rows for n in rows]
    self._cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._init_runtime()

  def _init_runtime(self):
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._pf: dict[int, object] = {}
    self._lock = threading.Lock()
    self._files = _Files(self._paths)

  def __getstate__(self):
    d = dict(self.__dict__)
    for k in ("_cache", "_pf", "_lock", "_files"):
      d.pop(k)
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._init_runtime()

  def __len__(self) -> int:
    return int(self._cum[-1])

  def _group(self, k: int) -> list:
    with self._lock:
      if k in self._cache:
        self._cache.move_to_end(k)
        return self._cache[k]
      if not self.presharded:  # local files: one open handle each, read under the lock
        col = self._read_group(k)
    if self.presharded:  # remote: row groups are read concurrently
      col = self._read_group(k)
    with self._lock:
      self._cache[k] = col
      if len(self._cache) > self._CACHE:
        self._cache.popitem(last=False)
    return col

  def _read_group(self, k: int) -> list:
    import pyarrow.parquet as pq

    f, g = self._index[k]
    path = self._paths[f]
    try:
      if self.presharded:  # one ranged GET of the columns' chunks; the footer is known
        md = self._meta[f]
        a, b = _row_group_bytes(md, g, self._columns[f])
        data = self._files.read(f, a, b)
        pf = pq.ParquetFile(_FetchedBytes(self._sizes[f], a, data), metadata=md)
        table = pf.read_row_group(g, columns=self._columns[f])
      else:
        if f not in self._pf:
          self._pf[f] = pq.ParquetFile(path)
        table = self._pf[f].read_row_group(g, columns=self._columns[f])
      # chat: one dict of the conversation's fields per row; text: the column's values
      return table.to_pylist() if self._chat else table.column(0).to_pylist()
    except DataError:
      raise
    except Exception as e:  # e.g. a file cut short or changed after start-up
      raise reader_error(path, f"cannot read Parquet row group {g}", e) from None

  def __getitem__(self, i: int) -> str | Conversation | None:
    k = int(np.searchsorted(self._cum, i, side="right")) - 1
    return self._row(i, k, self._group(k))

  def __getitems__(self, ids: Sequence[int]) -> list[str | Conversation | None]:
    ks = np.searchsorted(self._cum, ids, side="right") - 1
    members: dict[int, list[int]] = collections.defaultdict(list)  # row group -> positions in ids
    for pos, k in enumerate(ks):
      members[int(k)].append(pos)
    groups = list(members)
    out: list = [None] * len(ids)
    step = self._reads.concurrency if self.presharded else 1
    for w in range(0, len(groups), step):  # a wave of row groups in memory at a time
      wave = groups[w:w + step]
      cols = _pool(step).map(self._group, wave) if len(wave) > 1 else [self._group(wave[0])]
      for k, col in zip(wave, cols, strict=True):
        for pos in members[k]:
          out[pos] = self._row(int(ids[pos]), k, col)
    return out

  def _row(self, i: int, k: int, col: list) -> str | Conversation | None:
    text = col[i - int(self._cum[k])]
    if self._chat:
      try:
        return conversation(text)
      except ChatError as e:
        f, g = self._index[k]
        return self._bad(f"{self._paths[f]} row group {g} row {i - int(self._cum[k])}: "
                         f"malformed conversation: {e}")
    if isinstance(text, bytes):
      text = decode_utf8(text, f"{self._paths[self._index[k][0]]} row {i}", "replace")
    if not isinstance(text, str):
      f, g = self._index[k]
      return self._bad(f"{self._paths[f]} row group {g} row {i - int(self._cum[k])}: text field "
                       f"{self._field!r} is {type(text).__name__}")
    return text

  def _bad(self, msg: str) -> None:
    if self._bad_records == "fail":
      raise DataError(msg)
    note("bad_records", msg + "; skipped")
    return None


class ArrayRecords:
  """grain's ArrayRecordDataSource whose reader errors (a truncated or corrupt shard, a file that is
  not ArrayRecord) are one DataError naming the file: array_record's own messages name none."""

  def __init__(self, files: Sequence[str]):
    import grain.python as gp

    self.files = list(files)
    self._counts = None
    try:
      self._src = gp.ArrayRecordDataSource(self.files)
    except Exception as e:  # opened on a thread pool: find which file it was
      path, err = self._first_unreadable() or (", ".join(self.files[:3]), e)
      raise reader_error(path, "not a readable ArrayRecord file", err) from None

  def _first_unreadable(self) -> tuple[str, Exception] | None:
    from array_record.python.array_record_module import ArrayRecordReader

    for path in self.files:
      try:
        ArrayRecordReader(path).close()
      except Exception as e:
        return path, e
    return None

  def _file_of(self, i: int) -> tuple[str, int | None]:
    """(file, record in it) of record i; the counts are read only on this error path."""
    from array_record.python.array_record_module import ArrayRecordReader

    if self._counts is None:
      counts = []
      for path in self.files:
        try:
          reader = ArrayRecordReader(path)
        except Exception:  # changed since start-up: this file is the one at fault
          return path, None
        counts.append(reader.num_records())
        reader.close()
      self._counts = np.cumsum(counts)
    f = int(np.searchsorted(self._counts, i, side="right"))
    return self.files[f], i - (int(self._counts[f - 1]) if f else 0)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> bytes:
    try:
      return self._src[i]
    except Exception as e:
      path, j = self._file_of(i)
      record = "records" if j is None else f"record {j}"
      raise reader_error(path, f"cannot read ArrayRecord {record}", e) from None

  def __getitems__(self, ids: Sequence[int]) -> list[bytes]:
    try:
      return list(self._src.__getitems__(ids))
    except Exception as e:
      for i in ids:  # one at a time: which record (hence which file) fails
        self[i]
      raise reader_error(", ".join(self.files[:3]), "cannot read ArrayRecord records", e) from None

  def where(self, i: int) -> str:
    path, j = self._file_of(i)
    return path if j is None else f"{path} record {j}"


class ArrayRecordTokensSource:
  """Pre-tokenized documents written by `prepare_data`: each record is little-endian int32 ids."""

  def __init__(self, files: Sequence[str]):
    self._src = ArrayRecords(files)
    self.files = list(files)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> np.ndarray:
    return self._tokens([i], [self._src[i]])[0]

  def __getitems__(self, ids: Sequence[int]) -> list[np.ndarray]:
    return self._tokens(ids, self._src.__getitems__(ids))

  def _tokens(self, ids: Sequence[int], records: Sequence[bytes]) -> list[np.ndarray]:
    try:
      return [np.frombuffer(r, dtype="<i4").astype(np.int32) for r in records]
    except ValueError:  # a record whose size is not a multiple of 4 bytes
      i, r = next((i, r) for i, r in zip(ids, records, strict=True) if len(r) % 4)
      raise DataError(f"{self._src.where(i)}: {len(r)} bytes is not a sequence of int32 token ids "
                      "(not a prepare_data shard?)") from None


class TfdsSource:
  """`tfds.data_source` (random access over ArrayRecord-prepared TFDS datasets)."""

  def __init__(self, name: str, *, split: str, data_dir: str | None, text_field: str,
               bad_utf8: str):
    import tensorflow_datasets as tfds

    try:
      self._src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many types; one line is what users need
      raise DataError(f"cannot open TFDS {name!r} split {split!r} in data_dir={data_dir!r}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    self._name = name
    self._field = text_field
    self._bad_utf8 = bad_utf8

  def __len__(self) -> int:
    return len(self._src)

  def _where(self, i: int) -> str:
    """The shard file holding example i (from the split's file instructions), for error lines."""
    where = f"TFDS {self._name!r} example {i}"
    try:
      offset = 0
      for fi in self._src.data_source._read_instructions:
        if i < offset + fi.num_records:
          return f"{fi.filename} ({where})"
        offset += fi.num_records
    except Exception:  # a tfds / grain version without these internals: the dataset name must do
      pass
    return where

  def __getitem__(self, i: int) -> str:
    try:
      ex = self._src[i]
    except Exception as e:  # a truncated shard, a record that does not decode
      raise reader_error(self._where(i), "cannot read the TFDS record", e) from None
    if self._field not in ex:
      raise DataError(f"TFDS {self._name!r}: no feature {self._field!r} (has {sorted(ex)})")
    text = ex[self._field]
    if isinstance(text, np.ndarray):
      text = text.item()
    if isinstance(text, bytes):
      text = decode_utf8(text, f"TFDS {self._name}[{i}]", self._bad_utf8)
    return text


def open_source(sc: SourceConfig, *, bad_utf8: str = "replace", bad_records: str = "skip",
                shard: int = 0, num_shards: int = 1, reads: RemoteReads = RemoteReads()):
  """SourceConfig -> random-access source. Raises DataError (one line) for missing/empty input.

  shard / num_shards: the data group that reads it. A remote text / JSONL / Parquet source then
  holds only that group's share of the documents (`presharded`, see RemoteLinesSource); any other
  source holds them all (the pipeline deals them out). `reads`: how remote sources read.
  """
  if sc.format == "tfds":
    src = TfdsSource(sc.tfds_name, split=sc.tfds_split, data_dir=sc.tfds_data_dir,
                     text_field=sc.text_field, bad_utf8=bad_utf8)
  else:
    files = expand_paths(sc.paths)
    fmt = infer_format(files) if sc.format == "auto" else sc.format
    if sc.chat and fmt not in ("jsonl", "parquet"):
      raise DataError(f"source {sc.label!r}: a chat source is JSONL or Parquet, not {fmt}")
    if fmt == "text" and sc.doc_per == "file":
      src = FilesSource(files, bad_utf8=bad_utf8, reads=reads)
    elif fmt in ("text", "jsonl") and any(_is_remote(f) for f in files):
      src = RemoteLinesSource(files, jsonl_field=sc.text_field if fmt == "jsonl" else None,
                              bad_utf8=bad_utf8, bad_records=bad_records, chat=sc.chat,
                              shard=shard, num_shards=num_shards, reads=reads)
    elif fmt in ("text", "jsonl"):
      src = LinesSource(files, jsonl_field=sc.text_field if fmt == "jsonl" else None,
                        bad_utf8=bad_utf8, bad_records=bad_records, chat=sc.chat)
    elif fmt == "parquet":
      src = ParquetSource(files, text_field=sc.text_field, bad_records=bad_records, chat=sc.chat,
                          shard=shard, num_shards=num_shards, reads=reads)
    else:
      src = ArrayRecordTokensSource(files)
  if len(src) == 0 and getattr(src, "total_bytes", 0) and num_shards > 1:
    lo, hi = src.byte_range
    raise DataError(f"source {sc.label!r}: no document starts in data group {shard}'s share of the "
                    f"corpus (bytes {lo}-{hi} of {src.total_bytes}): too few or too long documents "
                    f"for {num_shards} data groups")
  if len(src) == 0:
    raise DataError(f"source {sc.label!r}: empty corpus (no non-empty documents)")
  return src
