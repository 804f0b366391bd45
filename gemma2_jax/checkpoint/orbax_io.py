"""Orbax reads shared by the Kaggle and native formats; failures become CheckpointError."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gemma2_jax.checkpoint.errors import CheckpointError, cause_line


def _orbax_path(path: epath.Path) -> epath.Path:
  """Orbax needs absolute local paths, but `absolute()` would make gs://b/x a local gs:/b/x."""
  return epath.Path(path) if "://" in str(path) else epath.Path(path).absolute()


def _one_line(e: Exception) -> str:
  return cause_line(e, 300)


def metadata(path: epath.Path) -> dict:
  """The stored tree with ArrayMetadata leaves (shape, dtype), read without touching the data."""
  try:
    meta = ocp.PyTreeCheckpointer().metadata(_orbax_path(path))
  except Exception as e:  # orbax/tensorstore raise many types for a damaged or foreign directory
    raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({_one_line(e)})") from None
  tree = getattr(meta, "item_metadata", meta)
  return getattr(tree, "tree", tree)


def restore(path: epath.Path, tree: dict, dtype=None, *, partial: bool = False,
            restore_args: dict | None = None) -> dict:
  """Restores every leaf of `tree` (from `metadata`) as a host numpy array (cast to `dtype`).

  With `partial`, `tree` may be a subset of the stored tree (e.g. only the params of a train state).
  `restore_args` (a tree like `tree`, e.g. of `array_args`) replaces the host-numpy default.
  """
  if restore_args is None:
    dtype = None if dtype is None else np.dtype(dtype)
    if dtype is not None and all(np.dtype(m.dtype) == dtype for m in jax.tree.leaves(tree)):
      dtype = None  # no cast requested: lets Orbax read straight into the result, without a copy
    restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), tree)
  args = (ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True) if partial
          else ocp.args.PyTreeRestore(restore_args=restore_args))
  try:
    return ocp.PyTreeCheckpointer().restore(_orbax_path(path), args=args)
  except Exception as e:  # e.g. a chunk file missing or cut short
    raise CheckpointError(f"{path}: failed to read the Orbax checkpoint ({_one_line(e)})") from None


def array_args(meta, sharding: jax.sharding.Sharding, dtype, shape=None) -> ocp.ArrayRestoreArgs:
  """Restore the leaf described by `meta` as a global jax.Array on `sharding` (each process reads
  only its own shards), cast to `dtype`; with `shape`, zero-padded to that larger shape."""
  dtype = np.dtype(dtype)
  return ocp.ArrayRestoreArgs(
    restore_type=jax.Array, sharding=sharding, global_shape=shape, strict=shape is None,
    dtype=None if np.dtype(meta.dtype) == dtype else dtype)  # no cast: no copy


def map_with_keys(fn: Callable[[str, object], object], tree: dict) -> dict:
  """`fn("a/b/c", leaf)` over the leaves of a metadata tree (keys joined as `_flatten` joins them)."""
  return jax.tree_util.tree_map_with_path(
    lambda kp, leaf: fn("/".join(str(getattr(k, "key", k)) for k in kp), leaf), tree)


def leaf_dtype(tree: dict, path: tuple[str, ...]) -> np.dtype:
  for p in path:
    tree = tree[p]
  return np.dtype(tree.dtype)


def save(path: epath.Path, tree: dict):
  """Writes a tree of host numpy arrays without orbax's defensive copy of each one.

  Orbax's default numpy handler deep-copies every host array before its async write (so callers
  may mutate them meanwhile); our callers don't, and the copy doubles peak memory of a conversion.
  Compression is off for the same reason (its buffers held a second copy: 2.0x -> 1.1x peak RSS in
  scripts/bench_convert.py); float weights barely compress anyway.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(_orbax_path(path), args=ocp.args.PyTreeSave(tree))
