"""Our own weights format: `gemma2_jax.json` (format version + ModelConfig) and an Orbax `params/`
tree in the model's stacked layout, so restoring needs no conversion and can go straight to
shards."""

from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath

from gemma2_jax.checkpoint import orbax_io, sharded
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import param_shapes

MARKER = "gemma2_jax.json"
FORMAT_VERSION = 1


def is_native_dir(path: epath.Path) -> bool:
  return (path / MARKER).exists()


def read_config(path: epath.Path) -> ModelConfig:
  try:
    meta = json.loads((path / MARKER).read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path / MARKER}: not valid JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
    version = meta.get("format_version") if isinstance(meta, dict) else None
    raise CheckpointError(f"{path / MARKER}: format_version {version} is not supported (expected "
                          f"{FORMAT_VERSION})")
  try:
    return ModelConfig.from_dict(meta["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path / MARKER}: bad model config ({e})") from None


def stored_dtype(path: epath.Path) -> np.dtype:
  return orbax_io.leaf_dtype(orbax_io.metadata(path / "params"), ("embedder", "input_embedding"))


def check_tree(path: epath.Path, tree: dict, cfg: ModelConfig):
  """Checks a stored params tree (metadata) against the shapes of `cfg`, naming the tensor."""
  stored = {"/".join(str(getattr(k, "key", k)) for k in kp): tuple(v.shape)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  wanted = {"/".join(str(k.key) for k in kp): tuple(s)
            for kp, s in jax.tree_util.tree_flatten_with_path(
              param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]}
  for key, shape in wanted.items():
    if key not in stored:
      raise CheckpointError(f"{path}: native checkpoint lacks tensor {key!r}")
    if stored[key] != shape:
      raise CheckpointError(f"tensor {key!r}: shape {stored[key]} does not match {shape} expected "
                            "by the model config")
  extra = sorted(set(stored) - set(wanted))
  if extra:
    raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} in native checkpoint")


def sharded_args(cfg: ModelConfig, tree: dict, dtype, shardings) -> dict:
  """Orbax restore args putting each stored leaf of a checked params tree on its target sharding."""
  sh = sharded.leaf_shardings(cfg, shardings)
  return orbax_io.map_with_keys(
    lambda key, meta: orbax_io.array_args(meta, sh[tuple(key.split("/"))], dtype), tree)


def load(path: epath.Path, dtype, config: ModelConfig | None = None, progress=None):
  cfg = config or read_config(path)
  tree = orbax_io.metadata(path / "params")
  check_tree(path, tree, cfg)
  params = orbax_io.restore(path / "params", tree, dtype)
  if progress is not None:
    progress.reset(total=1)
    progress.update(1)
  return cfg, params


def load_sharded(path: epath.Path, dtype, shardings, config: ModelConfig | None = None):
  """Orbax restores each leaf straight onto its target sharding, in `dtype`."""
  cfg = config or read_config(path)
  tree = orbax_io.metadata(path / "params")
  check_tree(path, tree, cfg)
  args = sharded_args(cfg, tree, dtype, shardings)
  return cfg, orbax_io.restore(path / "params", tree, restore_args=args)


def save(params: dict, cfg: ModelConfig, path: epath.Path, dtype, progress=None):
  path.mkdir(parents=True, exist_ok=True)
  dtype = np.dtype(dtype)
  params = jax.tree.map(lambda x: np.asarray(x).astype(dtype, copy=False), params)
  orbax_io.save(path / "params", params)
  meta = {"format_version": FORMAT_VERSION, "model": cfg.replace(param_dtype=dtype.name).to_dict()}
  (path / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True))
  if progress is not None:
    progress.reset(total=1)
    progress.update(1)
