"""Kaggle / google-deepmind `gemma` Flax checkpoints: an Orbax tree with raw keys
`transformer/layer_{i}/attn/q_einsum/w` etc. (nested or '/'-joined; both are read)."""

from __future__ import annotations

import numpy as np
from etils import epath

from gemma2_jax.checkpoint import orbax_io, sharded
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.checkpoint.mapping import Entry, Slot, export_tensors, plan, read_params, transposed
from gemma2_jax.model.config import ModelConfig, gemma2_2b, gemma2_9b, gemma2_27b

_T = "transformer/"
_L = _T + "layer_{i}/"


def _is_2b_layout(cfg: ModelConfig) -> bool:
  """The released 2B stores gating as (2, D, F); 9B/27B as (2, F, D)."""
  return (cfg.d_model, cfg.num_layers, cfg.ffn_dim) == (2304, 26, 9216)


def entries(cfg: ModelConfig, gating_transposed: bool | None = None) -> list[Entry]:
  """`gating_transposed`: gating stored as (2, D, F) (the released 2B) instead of (2, F, D)."""
  if gating_transposed is None:
    gating_transposed = _is_2b_layout(cfg)
  norms = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
  return [
    Entry(_T + "embedder/input_embedding", ("embedder", "input_embedding")),
    Entry(_L + "attn/q_einsum/w", ("layers", "attn", "q_einsum")),
    Entry(_L + "attn/kv_einsum/w", ("layers", "attn", "kv_einsum")),
    Entry(_L + "attn/attn_vec_einsum/w", ("layers", "attn", "attn_vec_einsum")),
    (transposed(_L + "mlp/gating_einsum", ("layers", "mlp", "gating_einsum"), (0, 2, 1))
     if gating_transposed else Entry(_L + "mlp/gating_einsum", ("layers", "mlp", "gating_einsum"))),
    Entry(_L + "mlp/linear", ("layers", "mlp", "linear")),
    *[Entry(_L + f"{n}/scale", ("layers", n, "scale")) for n in norms],
    Entry(_T + "final_norm/scale", ("final_norm", "scale")),
  ]


def _flatten(tree, prefix="") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}/"))
    return out
  return {prefix[:-1]: tree}


def infer_config(shapes: dict[str, tuple], path=None) -> ModelConfig:
  """Shapes -> the Gemma 2 release of those shapes (its query_pre_attn_scalar, window, soft-caps).

  A Kaggle tree stores no config, and those fields leave no trace in the shapes: a tree of shapes
  that match no release is refused (guessing them would load another model without a word).
  """
  try:
    V, D = shapes[_T + "embedder/input_embedding"]
    N, _, H = shapes[_T + "layer_0/attn/q_einsum/w"]
    K = shapes[_T + "layer_0/attn/kv_einsum/w"][1]
    F = shapes[_T + "layer_0/mlp/linear"][0]
  except KeyError as e:
    raise CheckpointError(f"Kaggle checkpoint lacks tensor {e.args[0]!r}") from None
  L = sum(1 for k in shapes if k.endswith("/attn/q_einsum/w"))
  for preset in (gemma2_2b, gemma2_9b, gemma2_27b):
    p = preset()
    if (p.num_layers, p.d_model, p.num_heads, p.num_kv_heads, p.head_dim, p.ffn_dim) == (
        L, D, N, K, H, F):
      return p.replace(vocab_size=V, num_real_tokens=min(V, 256000))
  raise CheckpointError(
    f"{path or 'Kaggle checkpoint'}: a Kaggle checkpoint of shapes L={L} D={D} N={N} K={K} H={H} "
    f"F={F} V={V} matches no Gemma 2 release, and it stores no config: its query_pre_attn_scalar, "
    "sliding_window and soft-caps cannot be read from it. Give its model config (convert: --preset "
    "or --model_config; teacher: teacher.preset; Python: config=)")


def read_config(path: epath.Path) -> ModelConfig:
  return infer_config({k: tuple(v.shape) for k, v in _flatten(orbax_io.metadata(path)).items()}, path)


def stored_dtype(path: epath.Path) -> np.dtype:
  flat = _flatten(orbax_io.metadata(path))
  key = _T + "embedder/input_embedding"
  return np.dtype((flat[key] if key in flat else next(iter(flat.values()))).dtype)


def is_orbax_dir(path: epath.Path) -> bool:
  return any((path / m).exists() for m in ("_METADATA", "manifest.ocdbt", "checkpoint",
                                           "_CHECKPOINT_METADATA"))


def _detect_gating_layout(cfg: ModelConfig, gating) -> bool | None:
  """True for a stored (2, D, F) gating, False for (2, F, D); None (the default) if D == F or the
  tensor is absent or mis-shaped, which `plan` then reports by name."""
  D, F = cfg.d_model, cfg.ffn_dim
  if gating is None or D == F:
    return None
  if tuple(gating.shape) == (2, D, F):
    return True
  if tuple(gating.shape) == (2, F, D):
    return False
  return None


def _open(path: epath.Path, config: ModelConfig | None,
          gating_transposed: bool | None) -> tuple[ModelConfig, dict, list[Slot]]:
  """Config, the stored metadata tree and the checked tensor plan; reads no tensor data."""
  tree = orbax_io.metadata(path)
  stored = _flatten(tree)
  cfg = config or infer_config({k: tuple(v.shape) for k, v in stored.items()}, path)
  if gating_transposed is None:
    gating_transposed = _detect_gating_layout(cfg, stored.get(_L.format(i=0) + "mlp/gating_einsum"))
  table = entries(cfg, gating_transposed)
  expected = {key for e in table for key, _ in e.keys(cfg)}
  unexpected = sorted(set(stored) - expected)
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} (and "
                          f"{len(unexpected) - 1} more) for this Gemma 2 config")

  def shape(key):
    if key not in stored:
      raise CheckpointError(f"Kaggle checkpoint lacks tensor {key!r}")
    return tuple(stored[key].shape)

  return cfg, tree, plan(cfg, table, shape)


def load(path: epath.Path, dtype, config: ModelConfig | None = None, progress=None,
         gating_transposed: bool | None = None):
  cfg, tree, slots = _open(path, config, gating_transposed)
  # Stored dtype: the cast happens tensor by tensor in read_params, not as a second full copy.
  raw = _flatten(orbax_io.restore(path, tree))
  if progress is not None:
    progress.reset(total=len(slots))
  # pop: each source tensor is freed once copied
  return cfg, read_params(cfg, slots, raw.pop, dtype, progress)


def load_sharded(path: epath.Path, dtype, shardings, config: ModelConfig | None = None,
                 gating_transposed: bool | None = None):
  """Each per-layer tensor is restored sharded like its slot of the stacked leaf (a padded embedding
  zero-padded by Orbax); a jitted function per leaf then stacks them onto the target sharding."""
  cfg, tree, slots = _open(path, config, gating_transposed)
  sh = sharded.leaf_shardings(cfg, shardings)
  by_key = {slot.key: slot for slot in slots}

  def args(key, meta):
    slot = by_key[key]
    return orbax_io.array_args(meta, sharded.stored_sharding(slot, sh[slot.entry.path]), dtype,
                               slot.shape if slot.pad else None)

  raw = _flatten(orbax_io.restore(path, tree, restore_args=orbax_io.map_with_keys(args, tree)))
  return cfg, sharded.from_restored(cfg, slots, raw, dtype, shardings)


def to_raw_tree(params: dict, cfg: ModelConfig, dtype, gating_transposed: bool | None = None):
  """Our params -> the released raw tree {'transformer/layer_0/attn/q_einsum': {'w': ...}, ...}."""
  specs, produce = export_tensors(cfg, entries(cfg, gating_transposed), params, dtype,
                                  vocab_rows=cfg.vocab_size)
  raw: dict = {}
  for (key, _, _), value in zip(specs, produce, strict=True):
    group, leaf = key.rsplit("/", 1)
    raw.setdefault(group, {})[leaf] = value
  return raw


def save(params: dict, cfg: ModelConfig, path: epath.Path, dtype, progress=None):
  orbax_io.save(path, to_raw_tree(params, cfg, dtype))
