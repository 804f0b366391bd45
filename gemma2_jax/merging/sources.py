"""The models of a merge as sources of tensors in one layout, HF's (mergekit's names, shapes and
filters), read a block of rows at a time whatever the format on disk.

HF safetensors are memory-mapped and only the requested rows are copied out. Orbax trees (native,
a training workdir's newest checkpoint, Kaggle) are read through TensorStore: our writers store
uncompressed zarr chunks in an OCDBT database, so a layer's slice (or a block of embedding rows) is
one byte-range read of the chunk that holds it, never the stacked [layers, ...] array. Any other
Orbax layout (compressed chunks, a pre-OCDBT tree) is restored one stored array at a time. A tensor
that must be transposed into HF layout (native q_einsum -> q_proj) is read whole, once, and kept
while its blocks are asked for: at most one tensor per model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import ml_dtypes
import numpy as np
from etils import epath

from gemma2_jax import checkpoint, paths
from gemma2_jax.checkpoint import hf, kaggle, native, orbax_io, peft, workdir
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.checkpoint.mapping import Entry, export_tensors, plan
from gemma2_jax.checkpoint.safetensors_io import SafetensorsReader
from gemma2_jax.merging.config import MergeError
from gemma2_jax.model import lora
from gemma2_jax.model.config import ModelConfig

# Fields that may differ between merged models: how a run computes, not what the model is.
IGNORED_FIELDS = (*checkpoint.RUNTIME_FIELDS, "vocab_size", "num_real_tokens")


def real_vocab(cfg: ModelConfig) -> int:
  """Rows of the embedding that are tokens (HF stores only these; Kaggle adds 128 padding rows)."""
  return cfg.num_real_tokens or cfg.vocab_size


def hf_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of every tensor of an HF Gemma 2 checkpoint of `cfg`, in the order we write them."""
  specs, _ = export_tensors(cfg, hf.entries(cfg), None, np.float32, vocab_rows=real_vocab(cfg))
  return [(name, tuple(shape)) for name, shape, _ in specs]


def _hf_table(cfg: ModelConfig) -> dict[str, tuple[Entry, tuple]]:
  return {key: (e, index) for e in hf.entries(cfg) for key, index in e.keys(cfg)}


class Source:
  """One model of a merge. `read(name, r0, r1)` gives rows r0:r1 of HF tensor `name` (a 1-D tensor
  whole) as float32, rounded through `dtype` first when the merge config sets one."""

  fmt = ""

  def __init__(self, path: str, cfg: ModelConfig, stored: np.dtype):
    self.path, self.cfg, self.stored = path, cfg, np.dtype(stored)
    self.dtype: np.dtype | None = None

  def read(self, name: str, r0: int, r1: int) -> np.ndarray:
    x = self._read(name, r0, r1)
    if self.dtype is not None and self.dtype != x.dtype:
      x = x.astype(self.dtype)
    return x.astype(np.float32, copy=False)

  def _read(self, name: str, r0: int, r1: int) -> np.ndarray:
    raise NotImplementedError


class HFSource(Source):
  fmt = "hf"

  def __init__(self, path: str):
    p = paths.as_path(path)
    self.path = path
    cfg = hf.read_config(p)
    self.reader = SafetensorsReader(p)
    expected = [key for e in hf.entries(cfg) for key, _ in e.keys(cfg)]
    plan(cfg, hf.entries(cfg), self._shape)  # each tensor present, of the config's shape
    extra = sorted(set(self.reader.keys()) - set(expected) - {"lm_head.weight"})
    if extra:
      raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} for a Gemma 2 of its config.json")
    super().__init__(path, cfg, self.reader.dtype(expected[0]))

  def _shape(self, key):
    if key not in self.reader.keys():
      raise CheckpointError(f"{self.path}: tensor {key!r} is missing")
    return self.reader.shape(key)

  def _read(self, name, r0, r1):
    view = self.reader.view(name)
    try:  # a copy of the rows; the map (and the pages it touched) goes with `view`
      return np.array(view[r0:r1] if view.ndim > 1 else view)
    finally:
      del view


class OrbaxArrays:
  """Slices of the arrays of one Orbax checkpoint directory, by their tree path."""

  def __init__(self, directory: epath.Path, tree: dict):
    import tensorstore as ts

    self.directory, self.tree = directory, tree
    base = str(directory) if paths.is_remote(directory) else "file://" + os.fspath(directory)
    try:
      self.kv = ts.KvStore.open({"driver": "ocdbt", "base": base.rstrip("/") + "/"}).result()
    except Exception:  # not an OCDBT tree: restore through Orbax
      self.kv = None
    self._meta: dict[str, dict | None] = {}
    self._restored: tuple[tuple, np.ndarray] | None = None

  def metadata(self, name: str) -> dict | None:
    """The zarr v2 metadata of array `name` when its chunks can be read as raw bytes, else None."""
    if name not in self._meta:
      meta = None
      if self.kv is not None:
        r = self.kv.read(f"{name}/.zarray").result()
        if r.state == "value":
          m = json.loads(bytes(r.value))
          if (m.get("zarr_format") == 2 and m.get("compressor") is None and not m.get("filters")
              and m.get("order") == "C"):
            meta = m
      self._meta[name] = meta
    return self._meta[name]

  def read(self, path: tuple[str, ...], index: tuple[int, ...], rows: tuple[int, int] | None = None):
    """array[path][index][r0:r1] (rows of the axis after `index`; None: all of it)."""
    name = ".".join(path)
    meta = self.metadata(name)
    if meta is None:
      return self._restore(path)[index][slice(*rows) if rows else slice(None)]
    shape, chunks = meta["shape"], meta["chunks"]
    dtype = (np.dtype(ml_dtypes.bfloat16) if meta["dtype"] == "bfloat16"
             else np.dtype(meta["dtype"]).newbyteorder("<"))
    sep = meta.get("dimension_separator", ".")
    k = len(index)
    r0, r1 = rows if rows else (0, shape[k])
    out = np.empty((r1 - r0, *shape[k + 1:]), dtype.newbyteorder("="))
    strides = [int(np.prod(chunks[a + 1:], dtype=np.int64)) for a in range(len(shape))]
    grid = [[index[a] // chunks[a]] for a in range(k)]
    grid.append(list(range(r0 // chunks[k], (r1 - 1) // chunks[k] + 1)) if r1 > r0 else [])
    grid += [list(range(-(-shape[a] // chunks[a]))) for a in range(k + 1, len(shape))]
    for coords in itertools.product(*grid):
      origin = [c * chunks[a] for a, c in enumerate(coords)]
      lo, hi = max(r0, origin[k]) - origin[k], min(r1, origin[k] + chunks[k]) - origin[k]
      # Fixed leading coordinates, a range of the next axis, whole trailing extents: contiguous.
      start = sum((index[a] - origin[a]) * strides[a] for a in range(k)) + lo * strides[k]
      n = (hi - lo) * strides[k]
      key = f"{name}/" + sep.join(map(str, coords))
      r = self.kv.read(key, byte_range=slice(start * dtype.itemsize, (start + n) * dtype.itemsize)).result()
      if r.state != "value" or len(r.value) != n * dtype.itemsize:
        raise CheckpointError(f"{self.directory}: array {name}: chunk {key} is missing or cut short")
      block = np.frombuffer(r.value, dtype).reshape(hi - lo, *chunks[k + 1:])
      extent = [min(chunks[a], shape[a] - origin[a]) for a in range(k + 1, len(shape))]
      block = block[(slice(None), *(slice(0, e) for e in extent))]
      target = (slice(origin[k] + lo - r0, origin[k] + hi - r0),
                *(slice(origin[a], origin[a] + e) for a, e in zip(range(k + 1, len(shape)), extent,
                                                                    strict=True)))
      out[target] = block
    return out

  def _restore(self, path: tuple[str, ...]) -> np.ndarray:
    """A whole stored array through Orbax (kept until another is asked for)."""
    if self._restored is None or self._restored[0] != path:
      self._restored = None
      sub = node = {}
      src = self.tree
      for p in path[:-1]:
        src = src[p]
        node[p] = {}
        node = node[p]
      node[path[-1]] = src[path[-1]]
      value = orbax_io.restore(self.directory, sub, partial=True)
      for p in path:
        value = value[p]
      self._restored = (path, np.asarray(value))
    return self._restored[1]


class OrbaxSource(Source):
  """A native checkpoint or a workdir (stacked [layers, ...] arrays), or a Kaggle tree (per layer)."""

  def __init__(self, path: str, fmt: str, config: ModelConfig | None = None):
    p = paths.as_path(path)
    self.fmt = fmt
    self.kaggle: dict[tuple, tuple[Entry, str]] = {}
    if fmt == "native":
      cfg, directory = native.read_config(p), p / "params"
      tree = orbax_io.metadata(directory)
      native.check_tree(directory, tree, cfg)
      self.prefix = ()
    elif fmt == "workdir":
      cfg, directory = workdir.read_config(p), workdir.latest_state(p)
      tree = orbax_io.metadata(directory)
      if "params" not in tree:
        raise CheckpointError(f"{directory} holds no params")
      native.check_tree(directory, tree["params"], cfg)
      self.prefix = ("params",)
    else:
      directory, tree = p, orbax_io.metadata(p)
      flat = _flatten(tree)
      shapes = {k: tuple(v.shape) for k, (_, v) in flat.items()}
      cfg = config or kaggle.infer_config(shapes, path)
      gating = shapes.get("transformer/layer_0/mlp/gating_einsum")
      D, F = cfg.d_model, cfg.ffn_dim  # the released 2B stores gating as (2, D, F), 9B / 27B (2, F, D)
      transposed = gating == (2, D, F) if gating and D != F else None
      table = kaggle.entries(cfg, transposed)

      def shape(key):
        if key not in shapes:
          raise CheckpointError(f"{path}: Kaggle checkpoint lacks tensor {key!r}")
        return shapes[key]

      plan(cfg, table, shape)
      for e in table:  # where each native slot is stored
        for key, index in e.keys(cfg):
          self.kaggle[(e.path, index)] = (e, flat[key][0])
      self.prefix = ()
    self.arrays = OrbaxArrays(directory, tree)
    self.table = _hf_table(cfg)
    self._kept: tuple[str, np.ndarray] | None = None
    super().__init__(path, cfg, checkpoint.stored_dtype(p))

  def _slot(self, entry: Entry, index: tuple, rows=None) -> np.ndarray:
    """The native slot params[entry.path][index] (rows r0:r1 of it when `rows`)."""
    if self.fmt != "kaggle":
      return self.arrays.read((*self.prefix, *entry.path), index, rows)
    for n in range(len(index), -1, -1):  # the stored tensor holding this slot
      if (entry.path, index[:n]) in self.kaggle:
        k_entry, stored_path = self.kaggle[(entry.path, index[:n])]
        if k_entry.is_identity and n == len(index):  # e.g. the embedding: its rows only
          return self.arrays.read(stored_path, (), rows)
        value = k_entry.to_native(self.arrays.read(stored_path, ()))[index[n:]]
        return value[slice(*rows)] if rows else value
    raise AssertionError(f"no Kaggle tensor holds {entry.path}{index}")

  def _read(self, name, r0, r1):
    entry, index = self.table[name]
    if entry.is_identity:  # e.g. the embedding, gate_proj, the norms: rows of the stored array
      return self._slot(entry, index, (r0, r1))
    if self._kept is None or self._kept[0] != name:
      self._kept = None
      self._kept = (name, np.ascontiguousarray(entry.from_native(self._slot(entry, index))))
    return self._kept[1][r0:r1]


def _flatten(tree, prefix=()) -> dict[str, tuple[tuple, object]]:
  """{'a/b/c': (('a', 'b', 'c'), leaf)} of a (possibly '/'-keyed) nested metadata tree."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, (*prefix, k)))
    return out
  return {"/".join(prefix): (prefix, tree)}


class LoraSource(Source):
  """A model with a PEFT LoRA adapter merged in as its tensors are read (mergekit's `model+adapter`):
  HF tensor `model.layers.{i}.{module}.weight` gains scale * B[r0:r1] @ A, B [out, r] and A [r, in]
  as PEFT stores them (in float32); the adapter's modules_to_save weights replace the model's. The
  merged model is never written out nor held whole."""

  fmt = "lora"

  def __init__(self, model: Source, adapter_path: str):
    super().__init__(f"{model.path}+{adapter_path}", model.cfg, model.stored)
    self.model = model
    try:
      adapter = peft.load_adapter(adapter_path, model.cfg)
    except CheckpointError as e:
      raise MergeError(f"{e} (the adapter of {self.path})") from None
    self.deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # HF name -> (scale * B, A)
    for name, ad in adapter.adapters.items():
      r = adapter.rank
      for i in range(model.cfg.num_layers):
        a, b = ad["a"][i].reshape(-1, r).T, ad["b"][i].reshape(r, -1).T
        if np.any(a) and np.any(b):  # layers the file leaves out hold zeros
          self.deltas[f"model.layers.{i}.{lora.TARGETS[name].hf}.weight"] = (adapter.scale * b, a)
    self.replaced: dict[str, np.ndarray] = {}  # HF name -> the adapter's saved weight
    for e in hf.entries(model.cfg):
      if e.path in adapter.modules:
        for key, index in e.keys(model.cfg):
          self.replaced[key] = adapter.modules[e.path][index] if index else adapter.modules[e.path]

  def _read(self, name, r0, r1):
    if name in self.replaced:
      w = self.replaced[name]
      return w[r0:r1] if w.ndim > 1 else w
    x = self.model._read(name, r0, r1)
    if name not in self.deltas:
      return x
    b, a = self.deltas[name]
    return x.astype(np.float32) + b[r0:r1] @ a


def split_lora(path: str | os.PathLike) -> tuple[str | os.PathLike, str | None]:
  """mergekit's `model+adapter` reference -> (model, adapter); a path that exists is a model."""
  text = os.fspath(path)
  if "+" not in text or paths.as_path(text).exists():
    return path, None
  for i in (i for i, ch in enumerate(text) if ch == "+"):
    if peft.is_peft_dir(text[i + 1:]):
      return text[:i], text[i + 1:]
  raise MergeError(f"{path}: neither a checkpoint nor MODEL+ADAPTER with a PEFT adapter directory "
                   f"(holding {peft.CONFIG_FILE}) after a '+'")


def open_source(path: str, config: ModelConfig | None = None) -> Source:
  """A model of the merge, its format detected (HF, native, workdir, Kaggle), with a PEFT LoRA
  adapter merged in when named as MODEL+ADAPTER."""
  model, adapter = split_lora(path)
  if adapter is not None:
    return LoraSource(open_source(model, config), adapter)
  fmt = checkpoint.detect_format(path)
  if fmt == "hf":
    return HFSource(path)
  return OrbaxSource(path, fmt, config)


@dataclasses.dataclass(frozen=True)
class Mismatch:
  field: str
  theirs: object
  ours: object


def first_difference(a: ModelConfig, b: ModelConfig) -> Mismatch | None:
  """The first ModelConfig field in which two models differ as models (not as runs), or their token
  vocabularies (the real rows: 256000 for HF's and Kaggle's 256128-row Gemma 2 alike)."""
  for f in dataclasses.fields(ModelConfig):
    if f.name in IGNORED_FIELDS:
      continue
    x, y = getattr(a, f.name), getattr(b, f.name)
    if x != y:
      return Mismatch(f.name, x, y)
  if real_vocab(a) != real_vocab(b):
    return Mismatch("vocab_size", real_vocab(a), real_vocab(b))
  return None


def check_same_model(sources: list[Source], reference: int):
  ref = sources[reference]
  for s in sources:
    diff = first_difference(s.cfg, ref.cfg)
    if diff is not None:
      raise MergeError(f"model {s.path} has {diff.field}={diff.theirs!r} but {ref.path} has "
                       f"{diff.field}={diff.ours!r}: only models of one architecture and vocabulary "
                       "can be merged")
