"""Random-access document sources: text lines/files, JSONL, Parquet, pre-tokenized ArrayRecord, TFDS.

Every source is a grain `RandomAccessDataSource`: `len(src)` documents, `src[i]` is a `str` (raw
text), an int32 token array (pre-tokenized), a `chat.Conversation` (a chat source: JSONL / Parquet
with `chat=True`), or None when a bad record was skipped. Random access
is what makes global shuffling, per-process sharding and exact resume cheap. Raw text sources build
a line-offset index at start-up (one sequential scan); for corpora of hundreds of GB, tokenize once
with `python -m gemma2_jax.prepare_data` and train from the ArrayRecord shards instead.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from gemma2_jax import paths
from gemma2_jax.data.chat import RESPONSE_FIELDS, ChatError, Conversation, conversation
from gemma2_jax.data.config import SourceConfig
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

  def read(self, f: int, start: int, stop: int) -> bytes:
    path = self.files[f]
    if not _is_remote(path):
      fd = self._handles.get(f)
      if fd is None:
        with self._lock:
          fd = self._handles.setdefault(f, os.open(path, os.O_RDONLY))
      return os.pread(fd, stop - start, start)
    # One ranged GET per document and no open handle: a gcsfs file's read-ahead is wasted on
    # shuffled reads, and its pending prefetch tasks are logged as errors at interpreter exit.
    fs_path = self._handles.get(f)
    if fs_path is None:
      import fsspec

      with self._lock:
        fs_path = self._handles.setdefault(f, fsspec.core.url_to_fs(path))
    fs, key = fs_path
    return fs.cat_file(key, start=start, end=stop)

  def size(self, f: int) -> int:
    path = self.files[f]
    if _is_remote(path):
      from etils import epath

      return epath.Path(path).stat().length
    return os.path.getsize(path)

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
    raw = self._files.read(f, int(self._starts[i]), int(self._stops[i]))
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


class FilesSource:
  """One document per whole text file."""

  def __init__(self, files: Sequence[str], *, bad_utf8: str):
    self._files = _Files(files)
    self._bad_utf8 = bad_utf8

  def __len__(self) -> int:
    return len(self._files.files)

  def __getitem__(self, i: int) -> str:
    return decode_utf8(self._files.read_all(i), self._files.files[i], self._bad_utf8)


@contextlib.contextmanager
def _parquet_file(path: str):
  """pyarrow's own gs:// filesystem knows neither epath's credentials nor an emulator (without
  network it hangs): remote files are read through an epath (fsspec) file object."""
  import pyarrow.parquet as pq

  if not _is_remote(path):
    with pq.ParquetFile(path) as pf:
      yield pf
    return
  from etils import epath

  with epath.Path(path).open("rb") as fh:
    yield pq.ParquetFile(fh)


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


class ParquetSource:
  """One document per row of the `text_field` column, or with `chat` one conversation per row;
  row groups are cached (LRU)."""

  _CACHE = 8

  def __init__(self, files: Sequence[str], *, text_field: str, bad_records: str,
               chat: bool = False):
    self._paths = list(files)
    self._field = text_field
    self._bad_records = bad_records
    self._chat = chat
    self._columns: list[list[str]] = []  # per file: what is read (files may differ in layout)
    rg_rows = []
    for path in self._paths:
      try:
        with _parquet_file(path) as pf:
          names = pf.schema_arrow.names
          rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
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
      rg_rows.append(rows)
    self._index = [(f, g) for f, rows in enumerate(rg_rows) for g in range(len(rows))]
    sizes = [n for rows in rg_rows for n in rows]
    self._cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self._init_runtime()

  def _init_runtime(self):
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._pf: dict[int, object] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    d = dict(self.__dict__)
    for k in ("_cache", "_pf", "_lock"):
      d.pop(k)
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._init_runtime()

  def __len__(self) -> int:
    return int(self._cum[-1])

  def _group(self, k: int) -> list:
    import pyarrow.parquet as pq

    with self._lock:
      if k in self._cache:
        self._cache.move_to_end(k)
        return self._cache[k]
      f, g = self._index[k]
      path = self._paths[f]
      try:
        if _is_remote(path):  # opened per row group: no handle is left open (see _parquet_file)
          with _parquet_file(path) as pf:
            table = pf.read_row_group(g, columns=self._columns[f])
        else:
          if f not in self._pf:
            self._pf[f] = pq.ParquetFile(path)
          table = self._pf[f].read_row_group(g, columns=self._columns[f])
        # chat: one dict of the conversation's fields per row; text: the column's values
        col = table.to_pylist() if self._chat else table.column(0).to_pylist()
      except Exception as e:  # e.g. a file cut short or changed after start-up
        raise reader_error(path, f"cannot read Parquet row group {g}", e) from None
      self._cache[k] = col
      if len(self._cache) > self._CACHE:
        self._cache.popitem(last=False)
      return col

  def __getitem__(self, i: int) -> str | Conversation | None:
    k = int(np.searchsorted(self._cum, i, side="right")) - 1
    text = self._group(k)[i - int(self._cum[k])]
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


def open_source(sc: SourceConfig, *, bad_utf8: str = "replace", bad_records: str = "skip"):
  """SourceConfig -> random-access source. Raises DataError (one line) for missing/empty input."""
  if sc.format == "tfds":
    src = TfdsSource(sc.tfds_name, split=sc.tfds_split, data_dir=sc.tfds_data_dir,
                     text_field=sc.text_field, bad_utf8=bad_utf8)
  else:
    files = expand_paths(sc.paths)
    fmt = infer_format(files) if sc.format == "auto" else sc.format
    if sc.chat and fmt not in ("jsonl", "parquet"):
      raise DataError(f"source {sc.label!r}: a chat source is JSONL or Parquet, not {fmt}")
    if fmt == "text" and sc.doc_per == "file":
      src = FilesSource(files, bad_utf8=bad_utf8)
    elif fmt in ("text", "jsonl"):
      src = LinesSource(files, jsonl_field=sc.text_field if fmt == "jsonl" else None,
                        bad_utf8=bad_utf8, bad_records=bad_records, chat=sc.chat)
    elif fmt == "parquet":
      src = ParquetSource(files, text_field=sc.text_field, bad_records=bad_records, chat=sc.chat)
    else:
      src = ArrayRecordTokensSource(files)
  if len(src) == 0:
    raise DataError(f"source {sc.label!r}: empty corpus (no non-empty documents)")
  return src
