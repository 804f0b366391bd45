"""An HF safetensors checkpoint written a block of rows at a time.

checkpoint.safetensors_io.write_sharded takes each tensor whole; a merge produces Gemma's 256000-row
embedding in blocks and must not assemble it. The layout is the same: the shards are planned up
front from the declared shapes (HF's `model-0000i-of-0000n.safetensors` names and index past one
shard), headers padded to 8 bytes, tensors in the declared order.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma2_jax.checkpoint import hf
from gemma2_jax.checkpoint.safetensors_io import INDEX_FILE
from gemma2_jax.model.config import ModelConfig

_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


class HFWriter:
  """Writes `specs` ([(name, shape)], in order) as `dtype`; `write(name, block)` appends the next rows
  of tensor `name`; `close()` checks that every tensor is complete and writes the index."""

  def __init__(self, path: Path, cfg: ModelConfig, specs: list[tuple[str, tuple]], dtype,
               max_shard_bytes: int = 5 * 10**9):
    self.path, self.dtype = Path(path), np.dtype(dtype)
    self.specs = [(name, tuple(shape)) for name, shape in specs]
    shards: list[list] = [[]]
    size = 0
    for name, shape in self.specs:
      nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append((name, shape))
      size += nbytes
    n = len(shards)
    self.files = (["model.safetensors"] if n == 1 else
                  [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    self.shards = shards
    self.path.mkdir(parents=True)
    (self.path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg, self.dtype.name), indent=2))
    self._order = [(s, name, shape) for s, shard in enumerate(shards) for name, shape in shard]
    self._next = 0  # index into _order of the tensor being written
    self._left = None  # bytes of it still to come
    self._file = None
    self._shard = -1

  def _open(self, shard: int):
    if self._file is not None:
      self._file.close()
    header, offset = {}, 0
    for name, shape in self.shards[shard]:
      nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
      header[name] = {"dtype": _NAMES[self.dtype], "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self._file = open(self.path / self.files[shard], "wb")
    self._file.write(struct.pack("<Q", len(blob)))
    self._file.write(blob)
    self._shard = shard

  def write(self, name: str, block: np.ndarray):
    if self._next >= len(self._order):
      raise AssertionError(f"{name}: every declared tensor is already written")
    shard, expected, shape = self._order[self._next]
    if name != expected:
      raise AssertionError(f"{name}: expected the rows of {expected} next")
    if shard != self._shard:
      self._open(shard)
    if self._left is None:
      self._left = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
    block = np.ascontiguousarray(block, dtype=self.dtype)
    if block.shape[1:] != shape[1:] or block.nbytes > self._left:
      raise AssertionError(f"{name}: a block of shape {block.shape} does not fit {shape}")
    self._file.write(memoryview(block.view(np.uint8).reshape(-1)))
    self._left -= block.nbytes
    if self._left == 0:
      self._next += 1
      self._left = None

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._next != len(self._order):
      raise AssertionError(f"tensor {self._order[self._next][1]} was not written (or not whole)")
    if len(self.files) > 1:
      weight_map = {name: self.files[s] for s, name, _ in self._order}
      total = sum(int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize for _, _, shape in self._order)
      (self.path / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

  def abort(self):
    if self._file is not None:
      self._file.close()
      self._file = None
