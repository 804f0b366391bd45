"""Weights import/export: HF safetensors, Kaggle Flax (Orbax), and our native Orbax layout."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from gemma2_jax import paths
from gemma2_jax.checkpoint import hf, kaggle, native, workdir
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.checkpoint.mapping import export_tensors
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import Transformer
from gemma2_jax.parallel.deadline import deadline

FORMATS = ("hf", "native", "kaggle")
_MODULES = {"hf": hf, "native": native, "kaggle": kaggle, "workdir": workdir}  # workdir: read only


def detect_format(path: str | os.PathLike) -> str:
  path = epath.Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if not path.is_dir():
    raise CheckpointError(f"checkpoint path {path} is not a directory (expected an HF, Kaggle or "
                          "native checkpoint directory)")
  if native.is_native_dir(path):
    return "native"
  if workdir.is_workdir(path):
    return "workdir"
  if hf.is_hf_dir(path):
    return "hf"
  if kaggle.is_orbax_dir(path):
    return "kaggle"
  raise CheckpointError(f"{path} is not a recognised checkpoint: expected config.json + "
                        "*.safetensors (HF), an Orbax tree (Kaggle), gemma2_jax.json (native) or a "
                        "training workdir")


def read_config(path: str | os.PathLike) -> ModelConfig:
  """A checkpoint's model config, from its config file or tensor metadata (no weights are read)."""
  path = epath.Path(path)
  return _MODULES[detect_format(path)].read_config(path)


# ModelConfig fields that a checkpoint's config may hold differently from the run reading it: they set
# numerics and memory of the run (param_dtype: the weights are cast on load), not what the model is.
# The vocabulary may differ by padding only (see check_config).
RUNTIME_FIELDS = ("param_dtype", "dtype", "attention_impl", "attention_block_size", "remat",
                  "scan_layers")


def check_config(path: str | os.PathLike, cfg: ModelConfig, *, what: str = "init_from",
                 fix: str = "set model.{name} to match, or point init_from at a checkpoint of this "
                            "model") -> None:
  """Refuses a checkpoint whose own model config differs from `cfg`, naming the first field (`what`
  names the option that gave the path, `fix` is how to resolve it, with {name} the field).

  Tensor shapes alone do not pin a model: the query scalar, the window, the soft-caps, RoPE's base
  and the norm epsilon change nothing in them, and even a different hidden size can go unnoticed
  when the checkpoint's tensors happen to match the run. Formats that store a config (HF, native, a
  training workdir) are compared field by field, except RUNTIME_FIELDS and vocabulary padding: the
  checkpoint may hold the run's vocab_size rows or only its num_real_tokens (HF stores the 256000
  real rows of a 256128-row model), and num_real_tokens (which padding rows the run masks) is the
  run's to set (the data pipeline checks it against the tokenizer). A Kaggle tree stores no config;
  its shapes are checked tensor by tensor when it is read.
  """
  path = epath.Path(path)
  if detect_format(path) == "kaggle":
    return
  theirs = read_config(path)
  for f in dataclasses.fields(ModelConfig):
    name = f.name
    if name in RUNTIME_FIELDS or name in ("vocab_size", "num_real_tokens"):
      continue
    a, b = getattr(theirs, name), getattr(cfg, name)
    if a != b:
      raise CheckpointError(f"{what} {path}: the checkpoint's config has {name}={a!r}, the model "
                            f"config given has {name}={b!r}; {fix.format(name=name)}")
  if theirs.vocab_size not in (cfg.vocab_size, cfg.num_real_tokens):
    raise CheckpointError(
      f"{what} {path}: the checkpoint's config has vocab_size={theirs.vocab_size}, the model config "
      f"given has vocab_size={cfg.vocab_size} (num_real_tokens={cfg.num_real_tokens}): a model of "
      f"another tokenizer; {fix.format(name='vocab_size')}")


def stored_dtype(path: str | os.PathLike) -> np.dtype:
  """The dtype a checkpoint stores its weights in (read from headers/metadata only)."""
  path = epath.Path(path)
  return np.dtype(_MODULES[detect_format(path)].stored_dtype(path))


def load_params(path: str | os.PathLike, dtype="float32", *, config: ModelConfig | None = None,
                progress=None) -> tuple[ModelConfig, dict]:
  """Reads any supported checkpoint into (config, host numpy params in `dtype`)."""
  path = epath.Path(path)
  fmt = detect_format(path)
  dtype = np.dtype(dtype)
  cfg, params = _MODULES[fmt].load(path, dtype, config=config, progress=progress)
  return cfg.replace(param_dtype=dtype.name), params


def load_sharded(path: str | os.PathLike, dtype, shardings, *,
                 config: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
  """Like load_params, but returns global jax.Arrays laid out on `shardings` (a tree of NamedSharding
  with the structure of gemma2_jax.model.transformer.param_shapes(cfg)); each process reads only the
  slices its addressable devices hold.

  Every process of a multi-host job must call it (the Orbax formats synchronise). HF safetensors
  are memory-mapped and sliced per device; native, workdir and Kaggle checkpoints are restored by
  Orbax onto the target shardings (Kaggle's per-layer tensors then stacked on device).
  """
  path = epath.Path(path)
  fmt = detect_format(path)
  dtype = np.dtype(dtype)
  cfg, params = _MODULES[fmt].load_sharded(path, dtype, shardings, config=config)
  return cfg.replace(param_dtype=dtype.name), params


def load_model(path: str | os.PathLike, dtype="float32", *, compute_dtype=None,
               config: ModelConfig | None = None, **config_overrides) -> Transformer:
  """Loads an HF safetensors dir, a Kaggle Flax checkpoint or a native checkpoint as a model.

  `dtype` is the parameter dtype (and the compute dtype unless `compute_dtype` is given); extra
  keyword arguments override ModelConfig fields that do not change shapes (e.g. attention_impl).
  """
  cfg, params = load_params(path, dtype, config=config)
  cfg = cfg.replace(dtype=np.dtype(compute_dtype or dtype).name, **config_overrides)
  # Move leaf by leaf so host and device copies never both hold the whole model.
  params = _map_pop(params, jnp.asarray)
  return Transformer.from_params(cfg, params)


def _map_pop(tree: dict, fn) -> dict:
  out = {}
  for key in list(tree):
    value = tree.pop(key)
    out[key] = _map_pop(value, fn) if isinstance(value, dict) else fn(value)
    del value
  return out


def save_params(params: dict, cfg: ModelConfig, path: str | os.PathLike, format: str = "native",
                dtype=None, *, progress=None, **kwargs) -> Path:
  """Writes params in `format` to a new directory `path` (refuses to overwrite a non-empty one).

  The files are written to a temporary sibling directory and moved into place at the end, so an
  interrupted save never leaves a half-written checkpoint at `path`.
  """
  if format not in FORMATS:
    raise CheckpointError(f"unknown format {format!r}; choose one of {FORMATS}")
  if dtype is not None and not jnp.issubdtype(np.dtype(dtype), jnp.floating):
    # A cast of weights to an integer type would write (mostly) zeros.
    raise CheckpointError(f"cannot write weights as {np.dtype(dtype).name}: use a float dtype "
                          "(float32, bfloat16, float16)")
  if paths.is_remote(path):
    return _save_remote(params, cfg, epath.Path(path), format, dtype, progress=progress, **kwargs)
  path = Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise CheckpointError(f"output path {path} already exists and is not empty; choose a new "
                          "directory (existing checkpoints are never overwritten)")
  dtype = np.dtype(dtype or cfg.param_dtype)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp_parent = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    tmp = tmp_parent / "out"  # each format's writer creates its directory
    _MODULES[format].save(params, cfg, tmp, dtype, progress=progress, **kwargs)
    if path.exists():
      path.rmdir()
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp_parent, ignore_errors=True)
  return path


def export_collectives(params: dict, cfg: ModelConfig, format: str = "hf"):
  """Reads every tensor of `params` in the order `save_params(..., format)` writes them, writing
  nothing: the other processes' side of a process-0 export whose reads are collectives."""
  for _ in export_tensors(cfg, _MODULES[format].entries(cfg), params, np.float32, cfg.vocab_size)[1]:
    pass


# Files whose presence makes a directory a checkpoint (see detect_format): uploaded last.
_MARKERS = ("config.json", native.MARKER, "_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")


def _save_remote(params, cfg, path: epath.Path, format, dtype, **kwargs) -> epath.Path:
  """A bucket has no atomic rename: write locally, then upload file by file with the files that
  mark a checkpoint last, so an interrupted upload is never taken for a checkpoint. Each storage call
  is bounded (parallel.deadline): a bucket that stops answering ends the process with one line."""
  with deadline("checking the output directory", path):
    taken = path.exists() and any(path.iterdir())
  if taken:
    raise CheckpointError(f"output path {path} already exists and is not empty; choose a new "
                          "directory (existing checkpoints are never overwritten)")
  with tempfile.TemporaryDirectory(prefix="gemma2_jax-export-") as tmp:
    local = save_params(params, cfg, Path(tmp) / "out", format, dtype, **kwargs)
    files = sorted((f for f in local.rglob("*") if f.is_file()),
                   key=lambda f: (f.name in _MARKERS, str(f)))
    for f in files:
      target = path / str(f.relative_to(local))
      with deadline(f"uploading {f.name}", target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as src, target.open("wb") as dst:
          shutil.copyfileobj(src, dst, 64 << 20)
  return path


def save_model(model: Transformer, path: str | os.PathLike, format: str = "native", dtype=None,
               **kwargs) -> Path:
  """Writes `model` as 'hf' (config.json + safetensors), 'native' or 'kaggle' to a new dir."""
  params = jax.tree.map(np.asarray, model.params())
  return save_params(params, model.config, path, format, dtype, **kwargs)


__all__ = ["FORMATS", "RUNTIME_FIELDS", "CheckpointError", "check_config", "detect_format", "load_model",
           "load_params", "load_sharded", "read_config", "save_model", "save_params", "stored_dtype"]
