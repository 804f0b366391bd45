"""Streaming safetensors reader and writer (no pickle, one tensor in memory at a time).

Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. We parse it ourselves so that bf16 reads need no framework,
a truncated file is reported by tensor name, and writing never builds the whole file in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from etils import epath

from gemma2_jax.checkpoint.errors import CheckpointError

_DTYPES = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


def is_local(path: epath.Path) -> bool:
  """False for a URL (gs://...): no memory map, no np.fromfile."""
  return "://" not in str(path)


def _read_bytes(path: epath.Path, start: int, stop: int) -> bytes:
  """Bytes [start, stop) of a file (fewer at its end). A remote one: one ranged GET (fsspec's
  `cat_file`), not a file object, whose read-ahead would fetch megabytes past the range."""
  if is_local(path):
    with open(os.fspath(path), "rb") as f:
      f.seek(start)
      return f.read(stop - start)
  import fsspec

  fs, key = fsspec.core.url_to_fs(str(path))
  try:
    return fs.cat_file(key, start=start, end=stop)
  except Exception as e:  # gcsfs / aiohttp errors after their retries: name the file
    raise CheckpointError(f"{path}: cannot read bytes {start}-{stop} ({type(e).__name__}: {e})") from None


def _read_header(path: epath.Path) -> tuple[dict, int]:
  size = path.stat().length
  raw = _read_bytes(path, 0, min(8, size))
  if len(raw) < 8:
    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
  (n,) = struct.unpack("<Q", raw)
  if n > size - 8:
    raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file is "
                          f"{size} bytes)")
  try:
    header = json.loads(_read_bytes(path, 8, 8 + n))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  header.pop("__metadata__", None)
  data_start, data_size = 8 + n, size - 8 - n
  # Report the first tensor (in file order) that the truncation cut, so the message names it.
  try:
    ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    for name, info in ordered:
      begin, end = info["data_offsets"]
      if not 0 <= begin <= end:
        raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {[begin, end]}")
      if end > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} needs bytes up "
                              f"to {end} of the data section but only {data_size} are present")
      if info["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
      if not isinstance(info["shape"], list):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {info['shape']!r}")
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{path}: corrupt safetensors header ({e!r})") from None
  return header, data_start


class SafetensorsReader:
  """Random access to the tensors of one file, a sharded index, or every *.safetensors in a dir."""

  def __init__(self, path: str | os.PathLike):
    path = epath.Path(path)
    if path.is_file():
      files = [path]
    elif (path / INDEX_FILE).exists():
      try:
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
      except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index ({e!r})") from None
      files = sorted({path / f for f in weight_map.values()})
      missing = [str(f) for f in files if not f.exists()]
      if missing:
        raise CheckpointError(f"{path / INDEX_FILE} names missing shard files: {missing}")
    else:
      files = sorted(path.glob("*.safetensors"))
    if not files:
      raise CheckpointError(f"{path}: no *.safetensors files found")
    self._where: dict[str, tuple[epath.Path, dict, int]] = {}
    for f in files:
      header, start = _read_header(f)
      for name, info in header.items():
        self._where[name] = (f, info, start)

  def keys(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self._where[name][1]["dtype"]]

  def _locate(self, name: str) -> tuple[epath.Path, np.dtype, list, int, int]:
    """(file, little-endian dtype, shape, absolute byte offset, element count) of a tensor."""
    if name not in self._where:
      raise CheckpointError(f"tensor {name!r} is missing from the safetensors checkpoint")
    f, info, start = self._where[name]
    dtype = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    if count != int(np.prod(info["shape"], dtype=np.int64)):
      raise CheckpointError(f"{f}: tensor {name!r}: {end - begin} bytes do not hold shape "
                            f"{info['shape']} of {info['dtype']}")
    return f, dtype.newbyteorder("<"), info["shape"], start + begin, count

  def get(self, name: str) -> np.ndarray:
    """The whole tensor, read into memory."""
    f, dtype, shape, offset, count = self._locate(name)
    if is_local(f):
      arr = np.fromfile(os.fspath(f), dtype=dtype, count=count, offset=offset)
    else:  # np.fromfile needs an OS file; the result is read-only (callers copy out of it)
      data = _read_bytes(f, offset, offset + count * dtype.itemsize)
      if len(data) != count * dtype.itemsize:
        raise CheckpointError(f"{f}: tensor {name!r}: read {len(data)} of its "
                              f"{count * dtype.itemsize} bytes: the file changed while being read")
      arr = np.frombuffer(data, dtype=dtype)
    return arr.astype(dtype.newbyteorder("="), copy=False).reshape(shape)

  def view(self, name: str) -> np.ndarray | RemoteTensor:
    """The tensor as a read-only memory map of its bytes: pages are read only when touched, and
    released when the map is dropped, so slicing it costs the slice, not the tensor.

    A remote file (gs://...) cannot be mapped: it is a `RemoteTensor`, whose row ranges are read
    with one ranged GET each (`rows`, `window`, or slicing along the first axis).
    """
    f, dtype, shape, offset, count = self._locate(name)
    if count == 0 or not shape:  # np.memmap refuses an empty range; a scalar is read whole
      return self.get(name)
    if not is_local(f):
      return RemoteTensor(f, dtype, tuple(shape), offset)
    return np.memmap(os.fspath(f), dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


class RemoteTensor:
  """A tensor of a remote safetensors file, read by ranges of rows (its first axis) on demand.

  Stored tensors are row-major, so a range of rows is one contiguous byte range: one ranged GET
  (fsspec `cat_file`, no read-ahead). A range of columns is not contiguous: whoever needs columns
  reads the rows that hold them.
  """

  def __init__(self, path: epath.Path, dtype: np.dtype, shape: tuple[int, ...], offset: int):
    self.path, self.dtype, self.shape, self.offset = path, dtype, shape, offset
    self.ndim = len(shape)
    self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

  def _read(self, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the tensor: one ranged read."""
    begin, end = self.offset + start, self.offset + stop
    data = _read_bytes(self.path, begin, end)
    if len(data) != stop - start:
      raise CheckpointError(f"{self.path}: read {len(data)} of bytes {begin}-{end}: the file is "
                            "truncated or changed while being read")
    return data

  def rows(self, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) (clipped to the tensor), read with one ranged GET."""
    lo = max(0, lo)
    hi = max(lo, min(self.shape[0], hi))
    data = self._read(lo * self.row_bytes, hi * self.row_bytes) if hi > lo else b""
    return np.frombuffer(data, self.dtype).reshape(hi - lo, *self.shape[1:])

  def window(self, ranges: Iterable[tuple[int, int]]) -> np.ndarray:
    """The whole tensor's shape, backed by an anonymous memory map, with only the rows in `ranges`
    (merged where they touch) read; the other rows are never read and, untouched, take no memory.
    A caller must only look at the rows it asked for (the others read as zeros)."""
    import mmap

    spans: list[list[int]] = []
    for lo, hi in sorted((max(0, a), min(self.shape[0], b)) for a, b in ranges):
      if hi <= lo:
        continue
      if spans and lo <= spans[-1][1]:
        spans[-1][1] = max(spans[-1][1], hi)
      else:
        spans.append([lo, hi])
    if spans == [[0, self.shape[0]]]:
      return self.rows(0, self.shape[0])
    nbytes = self.shape[0] * self.row_bytes
    buf = mmap.mmap(-1, max(nbytes, 1))
    for lo, hi in spans:
      buf[lo * self.row_bytes:hi * self.row_bytes] = self._read(lo * self.row_bytes, hi * self.row_bytes)
    return np.frombuffer(buf, self.dtype, count=nbytes // self.dtype.itemsize).reshape(self.shape)

  def __array__(self, dtype=None, copy=None):
    whole = self.rows(0, self.shape[0]) if self.ndim else np.frombuffer(
      self._read(0, self.dtype.itemsize), self.dtype).reshape(())
    return whole if dtype is None else whole.astype(dtype)

  def __getitem__(self, index):
    """Slicing: the rows the first index selects are read (one range), then sliced in memory."""
    index = index if isinstance(index, tuple) else (index,)
    if not self.ndim or not index or index[0] is Ellipsis:
      return np.asarray(self)[index]
    first, rest = index[0], index[1:]
    if isinstance(first, slice) and first.step in (None, 1):
      lo, hi, _ = first.indices(self.shape[0])
      return self.rows(lo, hi)[(slice(None), *rest)]
    if isinstance(first, (int, np.integer)):
      i = int(first) + (self.shape[0] if first < 0 else 0)
      if not 0 <= i < self.shape[0]:
        raise IndexError(f"index {first} is out of bounds for axis 0 with size {self.shape[0]}")
      return self.rows(i, i + 1)[(0, *rest)]
    return np.asarray(self)[index]


def write_sharded(path: epath.Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                  produce: Iterator[np.ndarray], *, max_shard_bytes: int = 5 * 10**9,
                  metadata: dict | None = None, progress=None,
                  single: str = "model.safetensors") -> list[epath.Path]:
  """Writes tensors (declared up front, produced one at a time, in order) to safetensors shards.

  One shard is written as `single` (`model.safetensors`; a PEFT adapter's is
  `adapter_model.safetensors`); more get HF's `model-0000i-of-0000n.safetensors` names and an index
  file.
  """
  specs = [(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in tensors]
  shards: list[list] = [[]]
  size = 0
  for spec in specs:
    nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  n = len(shards)
  names = ([single] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  weight_map, total, written = {}, 0, []
  for fname, shard in zip(names, shards, strict=True):
    header, offset = {}, 0
    for name, shape, dtype in shard:
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = fname
    total += offset
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with (path / fname).open("wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for name, shape, dtype in shard:
        arr = np.ascontiguousarray(next(produce))
        if arr.shape != shape or arr.dtype != dtype:
          raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared {shape} "
                               f"{dtype}")
        f.write(memoryview(arr.view(np.uint8).reshape(-1)))
        if progress is not None:
          progress.update(1)
    written.append(path / fname)
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
  return written
