"""One table per external format maps its tensors onto our stacked parameter tree.

The same table drives import (`plan` + `read_params`, or a sharded read: see sharded.py) and export
(`export_tensors`), so a format's layout is written down once. Tensors move one at a time: peak host
memory stays near one copy of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import numpy as np

from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import param_shapes

EMBEDDING = ("embedder", "input_embedding")


def _identity(x):
  return x


@dataclasses.dataclass(frozen=True)
class Entry:
  """External tensor `key` (with `{i}` for the layer) <-> params[path][i][index]."""

  key: str
  path: tuple[str, ...]
  index: tuple[int, ...] = ()
  to_native: Callable[[np.ndarray], np.ndarray] = _identity
  from_native: Callable[[np.ndarray], np.ndarray] = _identity
  # Set when to_native is `transpose(perm)` (see `transposed`): a sharded restore then reads the
  # stored tensor laid out like its native slot.
  perm: tuple[int, ...] | None = None

  @property
  def is_identity(self) -> bool:
    return self.to_native is _identity

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.key

  def keys(self, cfg: ModelConfig) -> list[tuple[str, tuple]]:
    if self.per_layer:
      return [(self.key.format(i=i), (i, *self.index)) for i in range(cfg.num_layers)]
    return [(self.key, self.index)]


def transposed(key: str, path: tuple[str, ...], perm: tuple[int, ...], index=()) -> Entry:
  """An Entry whose native slot is the stored tensor transposed by `perm`."""
  inverse = tuple(int(i) for i in np.argsort(perm))
  return Entry(key, path, index, to_native=lambda w: w.transpose(perm),
               from_native=lambda w: w.transpose(inverse), perm=tuple(perm))


def _leaf(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def empty_params(cfg: ModelConfig, dtype) -> dict:
  """Unfilled host arrays (pages are only touched, so only counted, once written)."""
  return _map_shapes(param_shapes(cfg), lambda s: np.empty(s, dtype))


def _map_shapes(tree, fn):
  if isinstance(tree, dict):
    return {k: _map_shapes(v, fn) for k, v in tree.items()}
  return fn(tree)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One external tensor `key` and its place params[entry.path][index] (native shape `shape`)."""

  entry: Entry
  key: str
  index: tuple[int, ...]
  shape: tuple[int, ...]
  pad: bool = False  # the embedding stored with only its real rows: zero rows are appended


def plan(cfg: ModelConfig, entries: list[Entry], stored_shape: Callable[[str], tuple]) -> list[Slot]:
  """Walks the table, checking every stored shape from headers/metadata, before any data is read.

  The shape is checked before `to_native` runs: a wrong size would otherwise surface as a bare
  reshape error, and a same-size wrong layout (e.g. a transposed square q_proj) would load.
  """
  shapes = param_shapes(cfg)
  slots = []
  for entry in entries:
    keys = entry.keys(cfg)
    native = tuple(_leaf(shapes, entry.path)[len(keys[0][1]):])  # the same for each layer
    expected = _stored_shape(entry, native)
    for key, index in keys:
      got = tuple(stored_shape(key))
      pad = entry.path == EMBEDDING and got != expected
      if pad:
        _check_vocab(cfg, key, got, native)
      elif got != expected:
        raise CheckpointError(f"tensor {key!r}: shape {got} does not match {expected} expected by "
                              "the model config")
      slots.append(Slot(entry, key, index, native, pad))
  return slots


def by_leaf(slots: list[Slot]) -> dict[tuple[str, ...], list[Slot]]:
  """The slots of each parameter leaf, in table order."""
  out: dict[tuple[str, ...], list[Slot]] = {}
  for slot in slots:
    out.setdefault(slot.entry.path, []).append(slot)
  return out


def fill(slot: Slot, value: np.ndarray, out: np.ndarray, block: tuple[slice, ...] | None = None):
  """Writes `block` (slices of the native slot; default all of it) of stored tensor `value` to `out`.

  `value` may be a memory map: only the pages under the block are read (to_native and the slicing
  are views), and the copy into `out` casts to its dtype.
  """
  if block is None:
    block = (slice(None),) * len(slot.shape)
  if not slot.pad:
    out[...] = slot.entry.to_native(value)[block]
    return
  start, stop, _ = block[0].indices(slot.shape[0])
  real = max(0, min(stop, value.shape[0]) - start)
  out[:real] = value[start:start + real][(slice(None), *block[1:])]
  out[real:] = 0


def read_params(cfg: ModelConfig, slots: list[Slot], get: Callable[[str], np.ndarray], dtype,
                progress=None) -> dict:
  """Fills a host parameter tree for `cfg` from `get(key)`, one tensor at a time (see `plan`)."""
  params = empty_params(cfg, dtype)
  for slot in slots:
    target = _leaf(params, slot.entry.path)
    value = get(slot.key)
    fill(slot, value, target[slot.index] if slot.index else target)
    del value
    if progress is not None:
      progress.update(1)
  return params


def _stored_shape(entry: Entry, native_shape: tuple) -> tuple:
  """The external shape of a tensor whose native slot has `native_shape`."""
  return tuple(jax.eval_shape(entry.from_native,
                              jax.ShapeDtypeStruct(native_shape, np.float32)).shape)


def _check_vocab(cfg: ModelConfig, key: str, shape: tuple, native: tuple):
  """HF checkpoints carry the real 256000 rows; a 256128-row config gets zero padding rows."""
  if (len(shape) != 2 or shape[1:] != tuple(native[1:])
      or not (cfg.num_real_tokens == shape[0] < native[0])):
    raise CheckpointError(
      f"tensor {key!r}: shape {shape} does not match the model config "
      f"(vocab_size={cfg.vocab_size}, num_real_tokens={cfg.num_real_tokens}, "
      f"d_model={cfg.d_model})")


def export_tensors(cfg: ModelConfig, entries: list[Entry], params: dict, dtype,
                   vocab_rows: int) -> tuple[list[tuple[str, tuple, np.dtype]], Iterator]:
  """Declares (key, shape, dtype) of every external tensor; a generator produces them in order."""
  dtype = np.dtype(dtype)

  def convert(entry: Entry, index) -> np.ndarray:
    value = np.asarray(_leaf(params, entry.path)[index] if index else _leaf(params, entry.path))
    if entry.path == EMBEDDING:
      value = value[:vocab_rows]
    return entry.from_native(value)

  def shape_of(entry: Entry, index) -> tuple:
    shape = param_shapes(cfg)
    for p in entry.path:
      shape = shape[p]
    shape = shape[len(index):]
    if entry.path == EMBEDDING:
      shape = (vocab_rows, *shape[1:])
    return _stored_shape(entry, shape)

  specs = [(key, shape_of(e, index), dtype) for e in entries for key, index in e.keys(cfg)]
  produce = (convert(e, index).astype(dtype, copy=False)
             for e in entries for _, index in e.keys(cfg))
  return specs, produce
