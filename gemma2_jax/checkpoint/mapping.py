"""One table per external format maps its tensors onto our stacked parameter tree.

The same table drives import (`read_params`) and export (`export_tensors`), so a format's layout is
written down once. Tensors move one at a time: peak host memory stays near one copy of the model.
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

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.key

  def keys(self, cfg: ModelConfig) -> list[tuple[str, tuple]]:
    if self.per_layer:
      return [(self.key.format(i=i), (i, *self.index)) for i in range(cfg.num_layers)]
    return [(self.key, self.index)]


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


def read_params(cfg: ModelConfig, entries: list[Entry], get: Callable[[str], np.ndarray],
                dtype, progress=None) -> dict:
  """Fills a parameter tree for `cfg` from `get(key)`, checking every stored shape."""
  params = empty_params(cfg, dtype)
  for entry in entries:
    target = _leaf(params, entry.path)
    for key, index in entry.keys(cfg):
      slot = target[index] if index else target
      value = get(key)
      # Check the stored shape before to_native: a wrong size would otherwise surface as a bare
      # reshape error, and a same-size wrong layout (e.g. a transposed square q_proj) would load.
      stored = _stored_shape(entry, slot.shape)
      if entry.path == EMBEDDING and value.shape != stored:
        value = _pad_vocab(cfg, key, value, slot.shape)
      elif tuple(value.shape) != stored:
        raise CheckpointError(f"tensor {key!r}: shape {tuple(value.shape)} does not match "
                              f"{stored} expected by the model config")
      else:
        value = entry.to_native(value)
      slot[...] = value
      del value
      if progress is not None:
        progress.update(1)
  return params


def _stored_shape(entry: Entry, native_shape: tuple) -> tuple:
  """The external shape of a tensor whose native slot has `native_shape`."""
  return tuple(jax.eval_shape(entry.from_native,
                              jax.ShapeDtypeStruct(native_shape, np.float32)).shape)


def _pad_vocab(cfg: ModelConfig, key: str, value: np.ndarray, shape) -> np.ndarray:
  """HF checkpoints carry the real 256000 rows; a 256128-row config gets zero padding rows."""
  if (value.ndim != 2 or value.shape[1:] != tuple(shape[1:])
      or not (cfg.num_real_tokens == value.shape[0] < shape[0])):
    raise CheckpointError(
      f"tensor {key!r}: shape {tuple(value.shape)} does not match the model config "
      f"(vocab_size={cfg.vocab_size}, num_real_tokens={cfg.num_real_tokens}, "
      f"d_model={cfg.d_model})")
  padded = np.zeros(shape, value.dtype)
  padded[: value.shape[0]] = value
  return padded


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
