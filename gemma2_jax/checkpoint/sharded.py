"""Sharded reads: checkpoint tensors go straight onto a global device layout, and each process reads
only the blocks its addressable devices hold.

Nothing here calls `jax.device_put`: putting a host array onto a multi-host sharding first checks
that every process passed the same value (gathering process_count copies onto every device), and it
needs the whole array on every host. Arrays are built with `jax.make_array_from_callback` from
per-device blocks, or restored by Orbax onto their shardings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gemma2_jax.checkpoint.mapping import Slot, by_leaf, fill
from gemma2_jax.checkpoint.safetensors_io import RemoteTensor
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import param_shapes

Key = tuple[str, ...]  # a leaf's path in the parameter tree


def _flat(tree, is_leaf=None) -> dict[Key, object]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(str(k.key) for k in kp): v for kp, v in leaves}


def _shape_tree(cfg: ModelConfig) -> dict[Key, tuple]:
  return _flat(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def leaf_shardings(cfg: ModelConfig, shardings) -> dict[Key, jax.sharding.Sharding]:
  """{leaf path: sharding}, checking that `shardings` has the structure of param_shapes(cfg)."""
  got = _flat(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  want = _shape_tree(cfg)
  if set(got) != set(want):
    diff = sorted(set(got) ^ set(want))
    raise ValueError(f"shardings must have the structure of param_shapes(config); "
                     f"{'/'.join(diff[0])} is {'missing' if diff[0] in want else 'unexpected'}")
  bad = [k for k, s in got.items() if not isinstance(s, jax.sharding.Sharding)]
  if bad:
    raise ValueError(f"shardings: {'/'.join(bad[0])} is {type(got[bad[0]]).__name__}, not a Sharding")
  return got


def _nest(cfg: ModelConfig, flat: dict[Key, object]) -> dict:
  out: dict = {}
  for path in _shape_tree(cfg):  # the order of param_shapes
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = flat[path]
  return out


# --- sources that can be sliced on the host (safetensors) -----------------------------------------

def from_blocks(cfg: ModelConfig, slots: list[Slot], open_tensor: Callable[[str], np.ndarray], dtype,
                shardings) -> dict:
  """Params as global arrays whose addressable blocks are copied out of `open_tensor(key)`.

  `open_tensor` should return a memory map (or a tensor read whole where mapping is impossible);
  tensors are opened one at a time and dropped once every local block has its part.
  """
  dtype = np.dtype(dtype)
  sh = leaf_shardings(cfg, shardings)
  shapes = _shape_tree(cfg)
  out = {}
  for path, leaf in by_leaf(slots).items():
    if _exchange(shapes[path], sh[path], leaf, open_tensor):
      out[path] = _exchanged_array(shapes[path], sh[path], dtype, leaf, open_tensor)
    else:
      out[path] = _block_array(shapes[path], sh[path], dtype, leaf, open_tensor)
  return _nest(cfg, out)


def stored_rows(slot: Slot, stored_shape: tuple[int, ...], block: tuple[slice, ...]) -> tuple[int, int]:
  """[lo, hi): the rows (first axis) of the stored tensor that `fill(slot, value, out, block)` reads.

  Found by running the slot's `to_native` on an array of row numbers broadcast to the stored shape
  (a view: transposes and reshapes of it stay views), then taking the block of it: no tensor data is
  needed. A block of columns (e.g. an FSDP split of HF's (out, in) weights along `in`) touches every
  row, so the whole tensor is read.
  """
  if not stored_shape:
    return 0, 1
  if slot.pad:  # fill copies value[start:start + real] untransformed
    start, stop, _ = block[0].indices(slot.shape[0])
    return start, max(start, min(stop, stored_shape[0]))
  numbers = np.arange(stored_shape[0], dtype=np.int64).reshape(-1, *[1] * (len(stored_shape) - 1))
  touched = slot.entry.to_native(np.broadcast_to(numbers, stored_shape))[block]
  if touched.size == 0:
    return 0, 0
  # Axes along which the row number does not change (stride 0) need not be scanned.
  touched = touched[tuple(0 if st == 0 else slice(None) for st in touched.strides)]
  return int(touched.min()), int(touched.max()) + 1


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """A device's index (slices, None for a whole axis) as hashable (start, stop) pairs."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _aligned_empty(shape, dtype: np.dtype) -> np.ndarray:
  # 64-byte aligned: XLA's CPU client then adopts the buffer instead of copying it (CPU "devices"
  # live in host RAM, so a copy would double the peak); accelerators copy it to device anyway.
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _block_array(shape: tuple[int, ...], sharding, dtype: np.dtype, slots: list[Slot],
                 open_tensor) -> jax.Array:
  # One buffer per distinct block: a block replicated on several local devices is read once.
  blocks: dict[tuple, np.ndarray] = {}
  for index in sharding.addressable_devices_indices_map(shape).values():
    bounds = _bounds(index, shape)
    if bounds not in blocks:
      blocks[bounds] = _aligned_empty([b - a for a, b in bounds], dtype)
  for slot in slots:  # tensor-major: each stored tensor is opened once for all local blocks
    n = len(slot.index)
    targets = []
    for bounds, buf in blocks.items():
      head, tail = bounds[:n], bounds[n:]
      if all(a <= i < b for i, (a, b) in zip(slot.index, head, strict=True)):
        local = tuple(i - a for i, (a, _) in zip(slot.index, head, strict=True))
        targets.append((buf[local] if local else buf, tuple(slice(a, b) for a, b in tail)))
    if targets:
      value = open_tensor(slot.key)
      if isinstance(value, RemoteTensor):  # read only the stored rows the local blocks touch
        value = value.window([stored_rows(slot, value.shape, block) for _, block in targets])
      for out, block in targets:
        fill(slot, value, out, block)
      del value  # unmaps the tensor: its pages stop counting against this process
  return jax.make_array_from_callback(shape, sharding, lambda index: blocks[_bounds(index, shape)],
                                      dtype=dtype)


# Read each stored row once over all processes (then exchange on device) when the processes' own
# blocks would read more than this many times the tensor between them.
EXCHANGE_ABOVE = 1.25


def _exchange(shape: tuple[int, ...], sharding, slots: list[Slot], open_tensor) -> bool:
  """Whether a remote leaf is read by rows split over all devices and re-laid out on device.

  Row-major files give a block of columns (an FSDP split of HF's `in` axis, the embedding's d_model)
  or a replicated leaf only by reading every row, so each process would fetch the whole tensor:
  process_count x the checkpoint from the bucket. Instead every device reads its 1/n of the stored
  rows and one jitted re-layout (an all-to-all on the interconnect) builds the leaf's blocks. Decided
  from the global device map (the same on every process: the re-layout is a collective program).
  """
  if jax.process_count() == 1 or not isinstance(sharding, NamedSharding):
    return False
  first = open_tensor(slots[0].key)
  if not isinstance(first, RemoteTensor) or not first.shape:
    return False
  n = sharding.mesh.size
  if any(open_tensor(slot.key).shape[0] % n for slot in slots):
    return False  # rows not divisible over the devices: blocks as they come
  slot, rows = slots[0], first.shape[0]
  spans: dict[int, list[tuple[int, int]]] = {}
  for device, index in sharding.devices_indices_map(shape).items():
    bounds = _bounds(index, shape)
    k = len(slot.index)
    if all(a <= i < b for i, (a, b) in zip(slot.index, bounds[:k], strict=True)):
      block = tuple(slice(a, b) for a, b in bounds[k:])
      spans.setdefault(device.process_index, []).append(stored_rows(slot, first.shape, block))
  return sum(_covered(s) for s in spans.values()) > EXCHANGE_ABOVE * rows


def _covered(spans: list[tuple[int, int]]) -> int:
  """Rows in the union of [lo, hi) spans."""
  total, end = 0, 0
  for lo, hi in sorted(spans):
    lo = max(lo, end)
    if hi > lo:
      total, end = total + hi - lo, hi
  return total


def _exchanged_array(shape: tuple[int, ...], sharding: NamedSharding, dtype: np.dtype,
                     slots: list[Slot], open_tensor) -> jax.Array:
  """The leaf from its stored tensors read as row blocks split over every device of the mesh (each
  process fetches only its devices' rows), stacked / transposed / padded by one jitted function
  laid out on `sharding` (as `from_restored`)."""
  rows = NamedSharding(sharding.mesh, PartitionSpec(sharding.mesh.axis_names))
  inputs = []
  for slot in slots:
    value = open_tensor(slot.key)
    inputs.append(jax.make_array_from_callback(
      value.shape, rows, lambda index, value=value: value.rows(*index[0].indices(value.shape[0])[:2]),
      dtype=value.dtype))
  build = functools.partial(_assemble, tuple(slots), shape, dtype)
  return jax.jit(build, out_shardings=sharding)(inputs)


# --- sources restored by Orbax, tensor by tensor (Kaggle) ------------------------------------------

def stored_sharding(slot: Slot, sharding: NamedSharding) -> NamedSharding:
  """The layout to restore a stored tensor in: its slot's part of the leaf's sharding (the leading
  indexed axes, e.g. the layer, dropped), axes permuted back if the entry stores a transpose."""
  if not isinstance(sharding, NamedSharding):
    raise TypeError(f"{'/'.join(slot.entry.path)}: a sharded read of this format needs a "
                    f"NamedSharding, got {type(sharding).__name__}")
  if not slot.index and slot.entry.perm is None:
    return sharding  # a whole leaf (the embedding, the final norm): its own sharding
  ndim = len(slot.index) + len(slot.shape)
  spec = (*sharding.spec, *(None,) * (ndim - len(sharding.spec)))[len(slot.index):]
  if slot.entry.perm is not None:  # native axis j is stored axis perm[j]
    stored = [None] * len(spec)
    for j, axis in enumerate(slot.entry.perm):
      stored[axis] = spec[j]
    spec = tuple(stored)
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def from_restored(cfg: ModelConfig, slots: list[Slot], values: dict[str, jax.Array], dtype,
                  shardings) -> dict:
  """Params from stored tensors restored as global arrays on `stored_sharding` (a padded embedding
  already padded to its slot): stacking and transposes run in one jitted function per leaf whose
  output is laid out on the target sharding, so no host ever holds more than its shards.

  `values` is consumed: each leaf's inputs are dropped once it is built.
  """
  dtype = np.dtype(dtype)
  sh = leaf_shardings(cfg, shardings)
  shapes = _shape_tree(cfg)
  out = {}
  for path, leaf in by_leaf(slots).items():
    inputs = [values.pop(slot.key) for slot in leaf]
    if len(leaf) == 1 and not leaf[0].index and (leaf[0].pad or leaf[0].entry.is_identity):
      out[path] = inputs[0]  # restored straight onto the target sharding, in `dtype`
    else:
      build = functools.partial(_assemble, tuple(leaf), shapes[path], dtype)
      out[path] = jax.jit(build, out_shardings=sh[path])(inputs)
    del inputs
  return _nest(cfg, out)


def _assemble(slots: tuple[Slot, ...], shape: tuple[int, ...], dtype: np.dtype, values: list):
  out = jnp.zeros(shape, dtype)
  for slot, value in zip(slots, values, strict=True):
    if slot.pad:  # already padded (Orbax restores it so) or padded here with zero rows
      value = jnp.pad(value, [(0, slot.shape[0] - value.shape[0])] + [(0, 0)] * (value.ndim - 1))
    value = (value if slot.pad else slot.entry.to_native(value)).astype(dtype)
    out = out.at[slot.index].set(value) if slot.index else value
  return out
