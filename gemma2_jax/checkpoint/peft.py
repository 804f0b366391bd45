"""PEFT (Hugging Face) LoRA adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

What peft 0.x writes for a `Gemma2ForCausalLM` (checked against peft 0.21 in tests/test_lora.py):
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]   (= our a^T)
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]  (= our b^T)
  ... k_proj, v_proj, o_proj, mlp.gate_proj, up_proj, down_proj
  base_model.model.model.embed_tokens.weight, ...layers.{i}.input_layernorm.weight, ...model.norm.weight
                                                   (modules_to_save: whole trained weights)
HF's flattened dims are ours in row-major order (q_proj's out = n * H + h, o_proj's in likewise), so a
and b map by a reshape and a transpose. The scale is PEFT's: lora_alpha / r (/ sqrt(r) with
use_rslora). Adapters for other modules, DoRA, biases, per-module ranks or alphas are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
from etils import epath

from gemma2_jax.checkpoint import hf
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.checkpoint.mapping import EMBEDDING
from gemma2_jax.checkpoint.safetensors_io import SafetensorsReader, write_sharded
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.lora import TARGETS, LoraConfig, adapter_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
_HF_TO_TARGET = {t.hf: name for name, t in TARGETS.items()}


def is_peft_dir(path: str | os.PathLike) -> bool:
  return (epath.Path(path) / CONFIG_FILE).exists()


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A PEFT LoRA adapter in our layout: adapters[t] = {"a": [L, *in, r], "b": [L, r, *out]} (fp32,
  zeros for layers the file leaves out); `modules` = whole weights it saves (modules_to_save) by
  their path in our params tree, the embedding with only the rows it stores."""

  rank: int
  alpha: float
  rslora: bool
  adapters: dict
  modules: dict
  config: dict  # the adapter_config.json as read

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _modules_by_key(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
  """PEFT key of a modules_to_save weight -> (our leaf path, its layer or None): the embedding and
  the norms, as hf.entries names them."""
  out = {}
  for e in hf.entries(cfg):
    if e.path == EMBEDDING or e.path[-1] == "scale":
      for key, index in e.keys(cfg):
        out[PREFIX + key] = (e.path, index[0] if index else None)
  return out


def _hf_modules(paths: list[tuple[str, ...]]) -> list[str]:
  """modules_to_save names of our leaf paths (PEFT matches them as name suffixes)."""
  names = {("embedder", "input_embedding"): "embed_tokens", ("final_norm", "scale"): "norm",
           ("layers", "pre_attention_norm", "scale"): "input_layernorm",
           ("layers", "post_attention_norm", "scale"): "post_attention_layernorm",
           ("layers", "pre_ffw_norm", "scale"): "pre_feedforward_layernorm",
           ("layers", "post_ffw_norm", "scale"): "post_feedforward_layernorm"}
  return sorted({names[p] for p in paths})


def save_adapter(path: str | os.PathLike, cfg: ModelConfig, lcfg: LoraConfig, adapters: dict,
                 modules: dict | None = None, *, base: str = "") -> epath.Path:
  """Writes a PEFT adapter directory (a new one) from host arrays: `adapters` as in the trainable
  tree, `modules` = {our leaf path: whole trained weight} for modules_to_save (embedding rows past
  num_real_tokens are cut, as in the HF export). `base`: base_model_name_or_path."""
  path = epath.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise CheckpointError(f"output path {path} already exists and is not empty; choose a new directory")
  modules = modules or {}
  specs, values = [], []
  for name, ad in adapters.items():
    hf_name = TARGETS[name].hf
    a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
    for i in range(cfg.num_layers):
      stem = f"{PREFIX}model.layers.{i}.{hf_name}"
      A = a[i].reshape(-1, lcfg.rank).T  # [r, in]
      B = b[i].reshape(lcfg.rank, -1).T  # [out, r]
      for suffix, w in (("lora_A", A), ("lora_B", B)):
        specs.append((f"{stem}.{suffix}.weight", w.shape, np.float32))
        values.append(np.ascontiguousarray(w))
  for key, (leaf_path, layer) in _modules_by_key(cfg).items():
    if leaf_path not in modules:
      continue
    w = np.asarray(modules[leaf_path], np.float32)
    w = w[layer] if layer is not None else w
    if leaf_path == EMBEDDING:
      w = w[:cfg.num_real_tokens or cfg.vocab_size]
    specs.append((key, w.shape, np.float32))
    values.append(w)
  config = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or None,
    "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout, "use_rslora": lcfg.rslora,
    "target_modules": sorted(TARGETS[n].hf.split(".")[-1] for n in adapters),
    "modules_to_save": _hf_modules(list(modules)) or None,
    "ensure_weight_tying": EMBEDDING in modules,  # the tied lm_head follows the trained embedding
    "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
    "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    "use_dora": False, "lora_bias": False, "revision": None,
  }
  path.mkdir(parents=True, exist_ok=True)
  write_sharded(path, specs, iter(values), max_shard_bytes=1 << 62, single=WEIGHTS_FILE)
  # The config last: it is what makes the directory an adapter (is_peft_dir).
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
  return path


def read_config(path: str | os.PathLike) -> dict:
  file = epath.Path(path) / CONFIG_FILE
  if not file.exists():
    raise CheckpointError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE})")
  try:
    config = json.loads(file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{file}: expected a JSON object")
  return config


def _check_config(path, c: dict):
  refusals = [
    (c.get("peft_type", "LORA") != "LORA", f"peft_type {c.get('peft_type')!r} (only LORA adapters are read)"),
    (c.get("bias", "none") != "none", f"bias={c.get('bias')!r} (LoRA biases are not supported)"),
    (bool(c.get("use_dora")), "use_dora (DoRA is not supported)"),
    (bool(c.get("lora_bias")), "lora_bias (not supported)"),
    (bool(c.get("fan_in_fan_out")), "fan_in_fan_out (a Conv1D layout, not Gemma 2's)"),
    (bool(c.get("rank_pattern")) or bool(c.get("alpha_pattern")),
     "rank_pattern / alpha_pattern (one rank and alpha for every module are supported)"),
    (bool(c.get("layer_replication")), "layer_replication (not supported)"),
    (not isinstance(c.get("r"), int) or c["r"] < 1, f"r={c.get('r')!r}"),
    (not isinstance(c.get("lora_alpha"), int | float), f"lora_alpha={c.get('lora_alpha')!r}"),
  ]
  for bad, what in refusals:
    if bad:
      raise CheckpointError(f"PEFT adapter {path}: {what}")


def load_adapter(path: str | os.PathLike, cfg: ModelConfig) -> Adapter:
  """Reads a PEFT LoRA adapter of a Gemma 2 of config `cfg` into our layout (host fp32 arrays)."""
  path = epath.Path(path)
  c = read_config(path)
  _check_config(path, c)
  r = c["r"]
  files = [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).exists() else []
  if not files:
    if any(path.glob("adapter_model.bin")):
      raise CheckpointError(f"{path}: only adapter_model.bin (a pickle) found; it is never loaded: save "
                            "the adapter with safe_serialization=True (peft's default)")
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE}")
  reader = SafetensorsReader(files[0])
  modules_by_key = _modules_by_key(cfg)
  full = adapter_shapes(cfg, LoraConfig(rank=r, targets=("all",)))
  adapters: dict = {}
  modules: dict = {}
  for key in reader.keys():
    m = _LORA_KEY.match(key)
    if m is None:
      if key not in modules_by_key:
        raise CheckpointError(f"PEFT adapter {path}: tensor {key!r} is not a LoRA weight of q/k/v/o/gate/"
                              "up/down_proj nor a modules_to_save embedding or norm of a Gemma 2")
      leaf, layer = modules_by_key[key]
      value = reader.get(key).astype(np.float32)
      if layer is None:
        modules[leaf] = value
      else:
        modules.setdefault(leaf, np.zeros((cfg.num_layers, *value.shape), np.float32))[layer] = value
      continue
    layer, module, which = int(m.group(1)), m.group(2), m.group(3)
    name = _HF_TO_TARGET.get(module)
    if name is None or layer >= cfg.num_layers:
      raise CheckpointError(f"PEFT adapter {path}: tensor {key!r} adapts a module this "
                            f"{cfg.num_layers}-layer Gemma 2 does not adapt (only "
                            f"{', '.join(t.hf for t in TARGETS.values())} of its layers)")
    shapes = full[name]
    per_layer = shapes["a"][1:] if which == "A" else shapes["b"][1:]
    flat = ((r, math.prod(per_layer[:-1])) if which == "A" else (math.prod(per_layer[1:]), r))
    got = reader.shape(key)
    if tuple(got) != flat:
      raise CheckpointError(f"PEFT adapter {path}: tensor {key!r} has shape {tuple(got)}, expected {flat} "
                            f"for r={r} on this model")
    value = reader.get(key).astype(np.float32).T.reshape(per_layer)
    slot = adapters.setdefault(name, {"a": np.zeros(shapes["a"], np.float32),
                                      "b": np.zeros(shapes["b"], np.float32)})
    slot["a" if which == "A" else "b"][layer] = value
  if not adapters:
    raise CheckpointError(f"PEFT adapter {path} holds no LoRA weights")
  return Adapter(rank=r, alpha=float(c["lora_alpha"]), rslora=bool(c.get("use_rslora")),
                 adapters={n: adapters[n] for n in TARGETS if n in adapters}, modules=modules, config=c)


def merge(params: dict, cfg: ModelConfig, adapter: Adapter) -> dict:
  """Host params (numpy, any float dtype) with the adapter merged in, layer by layer in fp32 (the
  weights keep their dtype; one layer's fp32 copy at a time): W += scale * a . b, and the
  modules_to_save weights replaced."""
  for name, ad in adapter.adapters.items():
    t = TARGETS[name]
    leaf = params["layers"][t.leaf[0]][t.leaf[1]]
    spec = f"{t.inputs}R,R{t.outputs}->{t.native}"
    for i in range(cfg.num_layers):
      delta = np.einsum(spec, ad["a"][i], ad["b"][i]) * adapter.scale
      index = (i,) if t.index is None else (i, t.index)
      leaf[index] = (leaf[index].astype(np.float32) + delta).astype(leaf.dtype)
  for leaf_path, value in adapter.modules.items():
    node = params
    for p in leaf_path[:-1]:
      node = node[p]
    w = node[leaf_path[-1]]
    if leaf_path == EMBEDDING and value.shape[0] < w.shape[0]:
      w[:value.shape[0]] = value.astype(w.dtype)
      w[value.shape[0]:] = 0
    else:
      if value.shape != w.shape:
        raise CheckpointError(f"PEFT adapter: saved module {'/'.join(leaf_path)} has shape {value.shape}, "
                              f"the model {w.shape}")
      w[...] = value.astype(w.dtype)
  return params
