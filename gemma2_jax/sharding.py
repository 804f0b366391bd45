"""Device mesh, logical-axis rules, and helpers to shard pytrees and constrain activations.

Mesh axes: `dcn` (data parallel across slices / hosts groups), `data`, `fsdp`, `tensor`. Parameters and
activations are annotated with logical axis names (see `gemma2_jax.model.transformer.LOGICAL_AXES`);
a rules table (data, from the experiment config) maps each logical name to mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Fills the single -1 entry with the remaining devices; checks the product."""
  unknown = [k for k in MESH_AXES if sizes.get(k, 1) == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(sizes.get(k, 1) for k in MESH_AXES if k not in unknown)
  if any(sizes.get(k, 1) < 1 and k not in unknown for k in MESH_AXES):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(sizes)}")
  out = {k: sizes.get(k, 1) for k in MESH_AXES}
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"({known} = product of {dict(sizes)})")
    out[unknown[0]] = num_devices // known
  if math.prod(out.values()) != num_devices:
    raise ValueError(f"mesh: axes {out} hold {math.prod(out.values())} devices but "
                     f"{num_devices} are present; set one axis to -1 or fix the sizes")
  return out


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(sizes, len(devices))
  if shape["dcn"] > 1:
    ici = [1, shape["data"], shape["fsdp"], shape["tensor"]]
    dcn = [shape["dcn"], 1, 1, 1]
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      device_array = mesh_utils.create_device_mesh([shape[k] for k in MESH_AXES], devices)
    except (AssertionError, NotImplementedError, ValueError):
      device_array = np.asarray(devices).reshape([shape[k] for k in MESH_AXES])
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


def constrain(x, logical: Sequence[str | None]):
  """`with_sharding_constraint` by logical names, when a mesh is active (at trace time)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, rules)))
