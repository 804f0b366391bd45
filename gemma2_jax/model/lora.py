"""LoRA (Hu et al. 2021) on the stacked Gemma 2 params: the adapters, their config, and the tree the
forward pass runs on.

The adapters are written into this model's own forward (transformer._block and layers.feed_forward
add `layers.adapter_delta` to each chosen projection) rather than taken from a library such as qwix, which
intercepts the dot_generals of Flax modules: our forward is a function of a plain params dict whose
layers are stacked and scanned in pairs, with projections stored as fused einsum weights (k and v in
one `kv_einsum`, gate and up in one `gating_einsum`). Keeping the adapters in that dict means they
are stacked, scanned, rematerialized and sharded exactly like the weights they adapt, the train state
is a plain tree of them, and each of q, k, v, o, gate, up, down is one PEFT module with no splitting.

Adapter of projection t with input dims `in` and output dims `out` (per layer, names as in
model/__init__.py): a [L, *in, r] and b [L, r, *out]; the forward adds (dropout(x) . a) . b * scale,
scale = alpha / r (alpha / sqrt(r) with rslora), to the base projection's output. A starts random
(PEFT's kaiming-uniform, or gaussian 1/r), B at zero, so a fresh adapter leaves the model unchanged.

The trainable tree (the train state's params; its optimizer state covers only these):
  adapters/<t>/{a, b}          for each target t
  deltas/embedder/input_embedding, deltas/final_norm/scale, deltas/layers/<norm>/scale
                               (train_embeddings / train_norms): fp32 differences added to the frozen
                               base, which starts them at zero without reading it
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Literal

import jax
import jax.numpy as jnp

from gemma2_jax.errors import UserError
from gemma2_jax.model import quant
from gemma2_jax.model.config import ModelConfig, float_dtype
from gemma2_jax.model.layers import ADAPTERS, Dropout
from gemma2_jax.model.quant import CONTRACTING, KINDS, check_block, dequantize, is_quantized
from gemma2_jax.model.transformer import LOGICAL_AXES, param_shapes


class LoraError(UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Target:
  """A projection LoRA can adapt: its base leaf (under layers/), the index of its slice of a fused
  leaf (k/v of kv_einsum, gate/up of gating_einsum), the einsum of its delta in the leaf's per-layer
  layout, and its HF module (also PEFT's target name)."""

  leaf: tuple[str, str]
  index: int | None
  inputs: str  # per-layer input dims of the adapter's a
  outputs: str  # per-layer output dims of its b
  native: str  # layout of the (sliced) base weight, per layer
  hf: str


TARGETS = {
  "q": Target(("attn", "q_einsum"), None, "D", "NH", "NDH", "self_attn.q_proj"),
  "k": Target(("attn", "kv_einsum"), 0, "D", "KH", "KDH", "self_attn.k_proj"),
  "v": Target(("attn", "kv_einsum"), 1, "D", "KH", "KDH", "self_attn.v_proj"),
  "o": Target(("attn", "attn_vec_einsum"), None, "NH", "D", "NHD", "self_attn.o_proj"),
  "gate": Target(("mlp", "gating_einsum"), 0, "D", "F", "FD", "mlp.gate_proj"),
  "up": Target(("mlp", "gating_einsum"), 1, "D", "F", "FD", "mlp.up_proj"),
  "down": Target(("mlp", "linear"), None, "F", "D", "FD", "mlp.down_proj"),
}
assert tuple(TARGETS) == ADAPTERS  # the forward's order (dropout keys are folded by position)
GROUPS = {"all": tuple(TARGETS), "all-linear": tuple(TARGETS), "attn": ("q", "k", "v", "o"),
          "mlp": ("gate", "up", "down")}
DIM_AXES = {"D": "embed", "N": "q_heads", "K": "kv_heads", "H": "head_dim", "F": "mlp"}
RANK_AXIS = "lora_rank"  # in no sharding rule: replicated
NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """The `lora` config section: which projections get adapters, their size and init, what else
  trains, and how the frozen base is held."""

  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0  # on each adapter's input (PEFT's lora_dropout)
  # Projections by name (q k v o gate up down), HF module name (q_proj, ...), group (attn, mlp, all)
  # or fnmatch pattern (*_proj).
  targets: tuple[str, ...] = ("all",)
  rslora: bool = False  # scale alpha / sqrt(rank) (PEFT's use_rslora) instead of alpha / rank
  init: Literal["kaiming", "gaussian"] = "kaiming"  # A's init (PEFT's True / "gaussian"); B is zeros
  train_embeddings: bool = False  # also train the (tied) embedding: a delta on the frozen one
  train_norms: bool = False  # also train every RMSNorm scale: deltas likewise
  base_dtype: str = "bfloat16"  # the frozen base's dtype (embedding and norms too when quantized)
  quantize: Literal["none", "int8", "nf4"] = "none"  # QLoRA: the base's projections stored so
  quant_block: int = 64  # weights per scale along each weight's last axis; int8 0 = per channel
  init_adapter: str = ""  # a PEFT adapter directory (adapter_config.json) to start from

  def __post_init__(self):
    targets = self.targets
    if isinstance(targets, str):
      targets = [t for t in targets.split(",") if t]
    object.__setattr__(self, "targets", tuple(str(t).strip() for t in targets))
    object.__setattr__(self, "base_dtype", float_dtype(self.base_dtype))
    checks = [
      (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
      (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
      (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
      (self.init in ("kaiming", "gaussian"), f"init must be 'kaiming' or 'gaussian', got {self.init!r}"),
      (self.quantize in ("none", *KINDS), f"quantize must be none, int8 or nf4, got {self.quantize!r}"),
      (self.quant_block >= 0, f"quant_block must be >= 0, got {self.quant_block}"),
      (self.quantize != "nf4" or self.quant_block > 0, "quantize=nf4 needs quant_block > 0 "
                                                       "(QLoRA uses 64)"),
      (bool(self.targets), "targets is empty: name the projections to adapt (e.g. all)"),
    ]
    for ok, msg in checks:
      if not ok:
        raise LoraError(msg)
    self.target_names()  # every pattern must match

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def target_names(self) -> tuple[str, ...]:
    """The adapted projections, in TARGETS order; a LoraError for a pattern that matches none."""
    chosen = set()
    for pattern in self.targets:
      if pattern in GROUPS:
        chosen.update(GROUPS[pattern])
        continue
      hit = {name for name, t in TARGETS.items()
             if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(t.hf.split(".")[-1], pattern)}
      if not hit:
        raise LoraError(f"targets: {pattern!r} matches no projection; use names from "
                        f"{', '.join(TARGETS)}, their HF names (q_proj, ...), groups "
                        f"({', '.join(GROUPS)}) or fnmatch patterns")
      chosen.update(hit)
    return tuple(name for name in TARGETS if name in chosen)

  def check_model(self, cfg: ModelConfig):
    """What only the model's shapes decide: the quantization blocks must tile every weight (a
    LoraError naming the weight)."""
    if self.quantize == "none":
      return
    shapes = _base_layer_shapes(cfg)
    for leaf in CONTRACTING:
      why = check_block(self.quantize, self.quant_block, shapes[leaf], f"layers/{leaf}")
      if why:
        raise LoraError(f"lora.quantize={self.quantize}: {why}; choose another lora.quant_block")


def _base_layer_shapes(cfg: ModelConfig) -> dict:
  layers = param_shapes(cfg)["layers"]
  return {**layers["attn"], **layers["mlp"]}


def _dims(cfg: ModelConfig) -> dict[str, int]:
  return {"D": cfg.d_model, "N": cfg.num_heads, "K": cfg.num_kv_heads, "H": cfg.head_dim,
          "F": cfg.ffn_dim}


def adapter_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> dict:
  """{target: {"a": [L, *in, r], "b": [L, r, *out]}} as shape tuples."""
  d, L, r = _dims(cfg), cfg.num_layers, lcfg.rank
  return {name: {"a": (L, *(d[c] for c in TARGETS[name].inputs), r),
                 "b": (L, r, *(d[c] for c in TARGETS[name].outputs))}
          for name in lcfg.target_names()}


def adapter_axes(lcfg: LoraConfig) -> dict:
  """The adapters' logical axes: the rank replicated, the rest as the weight they adapt (a's inputs
  and b's outputs follow the base's fsdp / tensor sharding)."""
  return {name: {"a": ("layers", *(DIM_AXES[c] for c in TARGETS[name].inputs), RANK_AXIS),
                 "b": ("layers", RANK_AXIS, *(DIM_AXES[c] for c in TARGETS[name].outputs))}
          for name in lcfg.target_names()}


def delta_paths(lcfg: LoraConfig) -> list[tuple[str, ...]]:
  """The base leaves that train as deltas (train_embeddings, train_norms), by their params path."""
  paths = []
  if lcfg.train_embeddings:
    paths.append(("embedder", "input_embedding"))
  if lcfg.train_norms:
    paths += [("final_norm", "scale"), *(("layers", n, "scale") for n in NORMS)]
  return paths


def leaf_at(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def nest(items) -> dict:
  out: dict = {}
  for path, value in items:
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def trainable_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> dict:
  """The trainable tree (module docstring) as shape tuples."""
  base = param_shapes(cfg)
  out = {"adapters": adapter_shapes(cfg, lcfg)}
  if delta_paths(lcfg):
    out["deltas"] = nest((p, leaf_at(base, p)) for p in delta_paths(lcfg))
  return out


def trainable_axes(lcfg: LoraConfig) -> dict:
  out = {"adapters": adapter_axes(lcfg)}
  if delta_paths(lcfg):
    out["deltas"] = nest((p, leaf_at(LOGICAL_AXES, p)) for p in delta_paths(lcfg))
  return out


def base_axes(cfg: ModelConfig, lcfg: LoraConfig) -> dict:
  """The frozen base's logical axes: LOGICAL_AXES, with quantized projections as Quantized nodes."""
  if lcfg.quantize == "none":
    return LOGICAL_AXES
  shapes = _base_layer_shapes(cfg)
  layers = dict(LOGICAL_AXES["layers"])
  for group in ("attn", "mlp"):
    layers[group] = {k: quant.logical_axes(axes, shapes[k], lcfg.quantize, lcfg.quant_block, CONTRACTING[k])
                     for k, axes in LOGICAL_AXES["layers"][group].items()}
  return {**LOGICAL_AXES, "layers": layers}


def init_trainable(cfg: ModelConfig, lcfg: LoraConfig, key, dtype="float32") -> dict:
  """A fresh trainable tree: A random, B and every delta zero. All A come from one draw (sliced):
  a draw per adapter would multiply the random generator's compile time."""
  shapes = adapter_shapes(cfg, lcfg)
  sizes = [math.prod(s["a"]) for s in shapes.values()]
  if lcfg.init == "kaiming":  # PEFT's: torch's kaiming_uniform_(a=sqrt(5)) on [r, in] = U(+-1/sqrt(in))
    draw = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
  else:  # PEFT's "gaussian": N(0, 1/r)
    draw = jax.random.normal(key, (sum(sizes),), dtype)
  out, start = {"adapters": {}}, 0
  for (name, s), size in zip(shapes.items(), sizes, strict=True):
    fan_in = math.prod(s["a"][1:-1])
    scale = 1.0 / math.sqrt(fan_in) if lcfg.init == "kaiming" else 1.0 / lcfg.rank
    a = draw[start:start + size].reshape(s["a"]) * jnp.asarray(scale, dtype)
    out["adapters"][name] = {"a": a, "b": jnp.zeros(s["b"], dtype)}
    start += size
  trainable = trainable_shapes(cfg, lcfg)
  if "deltas" in trainable:
    out["deltas"] = jax.tree.map(lambda s: jnp.zeros(s, dtype), trainable["deltas"],
                                 is_leaf=lambda x: isinstance(x, tuple))
  return out


def effective_params(cfg: ModelConfig, lcfg: LoraConfig, base: dict, trainable: dict,
                     dropout_key=None) -> dict:
  """The tree the forward runs on: the frozen base (arrays or Quantized) with each delta added and
  the adapters (a pre-multiplied by the scale) under layers/lora. `dropout_key`: a key for this
  step's adapter dropout (None: no dropout, as in evaluation)."""
  params = jax.tree.map(lambda x: x, base, is_leaf=is_quantized)  # new dicts, same arrays
  for path in delta_paths(lcfg):
    node = leaf_at(params, path[:-1])
    w = node[path[-1]]
    node[path[-1]] = (w.astype(jnp.float32) + leaf_at(trainable["deltas"], path)).astype(w.dtype)
  lora = {name: {"a": ad["a"] * jnp.asarray(lcfg.scale, ad["a"].dtype), "b": ad["b"]}
          for name, ad in trainable["adapters"].items()}
  if lcfg.dropout and dropout_key is not None:
    keys = jax.random.key_data(jax.random.split(dropout_key, cfg.num_layers))
    lora["dropout"] = Dropout(key=keys, rate=lcfg.dropout)
  params["layers"]["lora"] = lora
  return params


def weight_delta(name: str, a, b, scale: float):
  """The dense change scale * a . b of target `name`'s (sliced) base weight, in its native layout;
  a, b with or without their leading L."""
  t = TARGETS[name]
  lead = "L" if a.ndim == len(t.inputs) + 2 else ""
  spec = f"{lead}{t.inputs}R,{lead}R{t.outputs}->{lead}{t.native}"
  return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)) * scale


def merged_leaf(lcfg: LoraConfig, path: tuple[str, ...], base_leaf, trainable: dict, layer=None):
  """A base leaf (`path` in the params tree; dequantized if needed) with its adapters' (and
  delta's) changes added, in fp32: the whole leaf, or its slice at `layer` (a traced index) for the
  stacked ones."""
  take = (lambda x: x) if layer is None else (lambda x: x[layer])
  if is_quantized(base_leaf):
    w = dequantize(jax.tree.map(take, base_leaf), jnp.float32)
  else:
    w = take(base_leaf).astype(jnp.float32)
  if path in delta_paths(lcfg):
    w = w + take(leaf_at(trainable["deltas"], path))
  for name, ad in trainable["adapters"].items():
    t = TARGETS[name]
    if path == ("layers", *t.leaf):
      delta = weight_delta(name, take(ad["a"]), take(ad["b"]), lcfg.scale)
      if t.index is None:
        w = w + delta
      else:  # the C axis: just after L when the whole leaf is merged
        w = w.at[(slice(None),) * (layer is None) + (t.index,)].add(delta)
  return w


def merged_params(cfg: ModelConfig, lcfg: LoraConfig, base: dict, trainable: dict, dtype) -> dict:
  """A plain params tree (every weight dense, in `dtype`) equal to base + adapters: what the sampler
  takes (on-policy distillation of a LoRA student). A whole dense copy of the model: not for the
  training forward, which keeps the adapters apart."""
  flat = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_quantized)[0]
  paths = ((tuple(str(k.key) for k in kp), leaf) for kp, leaf in flat)
  return nest((path, merged_leaf(lcfg, path, leaf, trainable).astype(dtype)) for path, leaf in paths)
