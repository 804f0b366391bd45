"""Export of (sharded) training params as HF safetensors, one tensor at a time."""

from __future__ import annotations

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from gemma2_jax import checkpoint
from gemma2_jax.model.config import ModelConfig


class _OneSliceAtATime:
  """A sharded param whose `[index]` (or whole value) is gathered only when the writer asks for it.

  Each request replicates just that slice (one layer's tensor) and copies it to the host, so an
  export holds one tensor in host RAM and on each device, never the whole model. Every process makes
  the same requests in the same order (they are collectives); only process 0 writes.
  """

  def __init__(self, x: jax.Array):
    self._x = x
    self.shape, self.dtype = x.shape, x.dtype
    # The index is traced: one compile per parameter, not one per layer.
    self._take = jax.jit(lambda x, idx: x[tuple(idx)],
                         out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))

  def _fetch(self, index):
    if self._x.is_fully_addressable:  # one process: assemble the slice's shards on the host directly
      return np.asarray(self._x[index] if index else self._x)
    # Several processes: replicate just this slice (device memory), read this host's copy.
    return np.asarray(self._take(self._x, np.asarray(index, np.int32)).addressable_data(0))

  def __getitem__(self, index):
    return self._fetch(index)

  def __array__(self, dtype=None, copy=None):
    out = self._fetch(())
    return out if dtype is None else out.astype(dtype)


def export_hf(params: dict, model_cfg: ModelConfig, path: epath.Path) -> epath.Path:
  """Writes the (sharded) params as HF safetensors from process 0, tensor by tensor."""
  from jax.experimental import multihost_utils

  from gemma2_jax.parallel import distributed
  from gemma2_jax.parallel.deadline import deadline

  with deadline("checking the HF export", path):
    here = path.exists()
  # One decision for all processes (each one's view of a local path may differ).
  exists = bool(multihost_utils.broadcast_one_to_all(np.int32(here)))
  if exists:  # a finished run re-run: already exported
    return path
  # Leaves that already fetch their slices lazily (a LoRA run's merged weights) go as they are.
  lazy = jax.tree.map(lambda x: _OneSliceAtATime(x) if isinstance(x, jax.Array) else x, params)
  if jax.process_index() == 0:
    checkpoint.save_params(lazy, model_cfg, path, "hf")
  else:
    checkpoint.export_collectives(lazy, model_cfg, "hf")
  distributed.barrier("export_hf", timeout_s=3 * 3600)  # the others wait for the write to end
  return path
