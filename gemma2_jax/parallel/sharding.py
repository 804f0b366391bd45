"""Device mesh, logical-axis rules, and helpers to shard pytrees and constrain activations.

Mesh axes: `dcn` (data parallel across slices / hosts groups), `data`, `fsdp`, `tensor`. Parameters and
activations are annotated with logical axis names (see `gemma2_jax.model.transformer.LOGICAL_AXES`);
a rules table (data, from the experiment config) maps each logical name to mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma2_jax.errors import UserError

MESH_AXES = ("dcn", "data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("dcn", "data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("embed_act", None),  # d_model of activations: replicated (batch carries the sharding)
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("norm", None),
  # The chunked loss is vocab-parallel: rows gathered over FSDP, the embedding split by vocabulary.
  ("loss_batch", ("dcn", "data")),
  ("loss_vocab", ("fsdp", "tensor")),
)


class MeshError(UserError):
  """A mesh the devices cannot form, or a batch it cannot split evenly: every command's one check."""


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Fills the single -1 entry with the remaining devices; checks the product."""
  unknown = [k for k in MESH_AXES if sizes.get(k, 1) == -1]
  if len(unknown) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(sizes.get(k, 1) for k in MESH_AXES if k not in unknown)
  if any(sizes.get(k, 1) < 1 and k not in unknown for k in MESH_AXES):
    raise MeshError(f"mesh: axis sizes must be positive or -1, got {dict(sizes)}")
  out = {k: sizes.get(k, 1) for k in MESH_AXES}
  if unknown:
    if num_devices % known:
      raise MeshError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"({known} = product of {dict(sizes)})")
    out[unknown[0]] = num_devices // known
  if math.prod(out.values()) != num_devices:
    raise MeshError(f"mesh: axes {out} hold {math.prod(out.values())} devices but "
                     f"{num_devices} are present; set one axis to -1 or fix the sizes")
  return out


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many slices (TPU multislice: ICI islands joined by DCN) the devices span; 1 elsewhere."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def check_slices(shape: Mapping[str, int], devices: Sequence[jax.Device]) -> None:
  """A MeshError unless `dcn` spans exactly the devices' slices (TPU), or their processes when the
  devices have no slices (GPU / CPU hosts): any other axis over DCN would move FSDP all-gathers or
  tensor-parallel collectives onto the slow links without a word."""
  slices = num_slices(devices)
  if slices > 1 and shape["dcn"] != slices:
    raise MeshError(f"mesh {_mesh_str(shape)}: the {len(devices)} devices span {slices} slices, so "
                    f"mesh.dcn must be {slices} (data parallel across slices over DCN; the other axes "
                    f"within a slice), got {shape['dcn']}")
  processes = len({d.process_index for d in devices})
  if slices == 1 and shape["dcn"] > 1 and processes % shape["dcn"]:
    raise MeshError(f"mesh {_mesh_str(shape)}: dcn={shape['dcn']} groups whole processes (the devices "
                    f"have no slices), but there are {processes}; use a divisor of {processes}")


def _mesh_str(shape: Mapping[str, int]) -> str:
  return ",".join(f"{k}={v}" for k, v in shape.items() if v != 1) or "of one device"


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `sizes` (see resolve_mesh_shape) over `devices`, laid out on the physical topology
  (ICI axes within a slice, `dcn` across slices or process groups); a MeshError naming the mesh when
  it cannot be, never a silent fallback to device order."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(sizes, len(devices))
  check_slices(shape, devices)
  ici = [shape[k] for k in MESH_AXES]
  try:
    if shape["dcn"] > 1:
      ici[0] = 1
      device_array = mesh_utils.create_hybrid_device_mesh(
        ici, [shape["dcn"], 1, 1, 1], devices, process_is_granule=num_slices(devices) == 1,
        allow_split_physical_axes=True)
    else:
      try:
        device_array = mesh_utils.create_device_mesh(ici, devices)
      except (AssertionError, NotImplementedError, ValueError):
        # An axis that does not follow the chips' physical axes: split them (still a physical layout).
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError, ValueError) as e:
    raise MeshError(f"mesh {_mesh_str(shape)} cannot be laid out on the {len(devices)} "
                    f"{devices[0].device_kind} devices ({' '.join(str(e).split())[:200]}); choose axis "
                    "sizes that follow the topology (see python -m gemma2_jax.aot)") from None
  return Mesh(device_array, MESH_AXES)


def normalize_rules(rules) -> tuple:
  """Rules as written in a config (lists from JSON/ConfigDict) -> hashable tuples."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_to_spec(logical: Sequence[str | None], rules) -> PartitionSpec:
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim at most
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Rows of a [B, T, ...] batch over the batch axes (trailing dims replicated)."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def logical_to_sharding(logical_tree, mesh: Mesh, rules):
  return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
                      logical_tree, is_leaf=_is_axes)


# Activation constraints are a no-op unless a trainer installs a mesh and rules.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("gemma2_jax_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh_and_rules() -> tuple[Mesh, tuple] | None:
  """The (mesh, rules) that `activation_sharding` installed, or None outside it."""
  return _ACTIVE.get()


def current_platform() -> str:
  """Platform the code being traced will run on: the active mesh's devices (an AOT compile for a TPU
  topology traces on a CPU host), else the default backend."""
  active = _ACTIVE.get()
  return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def constrain(x, logical: Sequence[str | None]):
  """`with_sharding_constraint` by logical names, when a mesh is active (at trace time)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, rules)))


def constrain_tree(tree, logical_tree, *, unshard: Sequence[str] = ()):
  """`constrain` for a tree (e.g. params) by its logical axes tree, with the logical names in
  `unshard` replicated: ("embed",) gathers FSDP shards, keeping tensor parallelism."""
  active = _ACTIVE.get()
  if active is None:
    return tree
  mesh, rules = active
  rules = tuple((name, None if name in unshard else axes) for name, axes in rules)
  return jax.tree.map(jax.lax.with_sharding_constraint, tree,
                      logical_to_sharding(logical_tree, mesh, rules))


@dataclasses.dataclass(frozen=True)
class DataGroup:
  """The batch rows one process feeds, derived from the batch sharding.

  Processes whose devices address the same rows form one data group and read the same data shard
  (group `index` of `count`); when a mesh axis other than the batch axes spans hosts (e.g. tensor
  parallelism across hosts), several processes are in one group. `blocks` are the global row ranges
  [start, stop) this process addresses, in the order its local batch holds them.
  """

  index: int
  count: int
  blocks: tuple[tuple[int, int], ...]

  @property
  def rows(self) -> int:
    return sum(stop - start for start, stop in self.blocks)


def process_row_blocks(sharding: NamedSharding, global_batch: int) -> dict[int, tuple]:
  """process index -> sorted global row ranges [start, stop) that its devices address."""
  blocks: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((global_batch, 1)).items():
    start, stop, _ = index[0].indices(global_batch)
    blocks.setdefault(device.process_index, set()).add((start, stop))
  return {p: tuple(sorted(b)) for p, b in blocks.items()}


@functools.lru_cache(maxsize=64)
def data_group(sharding: NamedSharding, global_batch: int, process_index: int | None = None) -> DataGroup:
  """This process's data group under `sharding` (a [batch, ...] sharding of `global_batch` rows)."""
  per_process = process_row_blocks(sharding, global_batch)
  groups = sorted(set(per_process.values()))
  rows_of = [{r for start, stop in g for r in range(start, stop)} for g in groups]
  if len({len(r) for r in rows_of}) != 1 or sum(map(len, rows_of)) != global_batch:
    raise MeshError(
      f"the batch sharding {sharding.spec} gives processes overlapping or unequal row sets "
      f"({per_process}); make the batch axes (dcn, data, fsdp) split hosts evenly")
  pi = jax.process_index() if process_index is None else process_index
  return DataGroup(index=groups.index(per_process[pi]), count=len(groups), blocks=per_process[pi])


def host_to_global(x: np.ndarray, sharding: NamedSharding):
  """This process's rows (its data group's share, laid out as `DataGroup.blocks`) -> one global array.

  Each device's slice is cut from the local rows: nothing is sent between hosts and no equality
  check runs (unlike device_put of a host array with a global sharding).
  """
  count = data_group(sharding, batch_shards(sharding)).count
  global_batch = len(x) * count
  group = data_group(sharding, global_batch)
  offset, at = {}, 0
  for start, stop in group.blocks:
    offset[start] = at
    at += stop - start

  def rows(index):
    start, stop, _ = index[0].indices(global_batch)
    lo = offset[start]
    return x[(slice(lo, lo + stop - start), *index[1:])]

  return jax.make_array_from_callback((global_batch, *x.shape[1:]), sharding, rows)


def global_to_host(x: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded global array that this process's devices hold, in `DataGroup.blocks`
  order: the inverse of host_to_global (its other dimensions must not be sharded)."""
  pieces = {}
  for shard in x.addressable_shards:
    start, stop, _ = shard.index[0].indices(x.shape[0])
    pieces.setdefault(start, shard.data)
  return np.concatenate([np.asarray(pieces[start]) for start in sorted(pieces)])


def check_batch(rows: int, mesh_shape: Mapping[str, int], rules, what: str) -> int:
  """The number of batch shards of a mesh of `mesh_shape` (a Mesh's `.shape`, or the sizes of
  `resolve_mesh_shape`) under `rules`; a MeshError naming `what` unless `rows` splits evenly over
  them. Every command checks its batch against its mesh here, before anything is compiled."""
  shards = _ways(logical_to_spec(("batch",), rules)[0], mesh_shape)
  if rows % shards:
    raise MeshError(f"{what} of {rows} rows is not divisible by the {shards} batch shards of the "
                    f"mesh ({_mesh_str(mesh_shape)}): use a multiple of {shards}, or another mesh")
  return shards


def batch_shards(sharding: NamedSharding) -> int:
  """How many ways `sharding` splits the batch (leading) dimension."""
  return _ways(sharding.spec[0] if len(sharding.spec) else None, sharding.mesh.shape)


def _ways(entry, mesh_shape: Mapping[str, int]) -> int:
  """How many ways a PartitionSpec entry (an axis name, a tuple of them, or None) splits its dim."""
  axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return math.prod(mesh_shape[a] for a in axes)
