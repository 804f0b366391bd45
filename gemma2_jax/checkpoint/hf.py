"""HF transformers `Gemma2ForCausalLM` checkpoints: config.json + (sharded) safetensors."""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from gemma2_jax.checkpoint import sharded
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.checkpoint.mapping import Entry, Slot, export_tensors, plan, read_params
from gemma2_jax.checkpoint.safetensors_io import SafetensorsReader, write_sharded
from gemma2_jax.model.config import ModelConfig

# Tensors HF may store that carry no information of their own (tied head, cached RoPE tables).
_IGNORED = ("lm_head.weight",)


def entries(cfg: ModelConfig) -> list[Entry]:
  N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
  layer = "model.layers.{i}."

  def heads(n):  # HF (n*H, D) <-> ours (n, D, H)
    return dict(to_native=lambda w: w.reshape(n, H, D).transpose(0, 2, 1),
                from_native=lambda w: w.transpose(0, 2, 1).reshape(n * H, D))

  norms = {"input_layernorm": "pre_attention_norm",
           "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "pre_ffw_norm",
           "post_feedforward_layernorm": "post_ffw_norm"}
  return [
    Entry("model.embed_tokens.weight", ("embedder", "input_embedding")),
    Entry(layer + "self_attn.q_proj.weight", ("layers", "attn", "q_einsum"), **heads(N)),
    Entry(layer + "self_attn.k_proj.weight", ("layers", "attn", "kv_einsum"), (0,), **heads(K)),
    Entry(layer + "self_attn.v_proj.weight", ("layers", "attn", "kv_einsum"), (1,), **heads(K)),
    Entry(layer + "self_attn.o_proj.weight", ("layers", "attn", "attn_vec_einsum"),
          to_native=lambda w: w.T.reshape(N, H, D),
          from_native=lambda w: w.reshape(N * H, D).T),
    Entry(layer + "mlp.gate_proj.weight", ("layers", "mlp", "gating_einsum"), (0,)),
    Entry(layer + "mlp.up_proj.weight", ("layers", "mlp", "gating_einsum"), (1,)),
    Entry(layer + "mlp.down_proj.weight", ("layers", "mlp", "linear"),
          to_native=lambda w: w.T, from_native=lambda w: w.T),
    *[Entry(layer + f"{hf}.weight", ("layers", ours, "scale")) for hf, ours in norms.items()],
    Entry("model.norm.weight", ("final_norm", "scale")),
  ]


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  if hf.get("model_type") != "gemma2":
    raise CheckpointError(f"config.json has model_type={hf.get('model_type')!r}; only 'gemma2' "
                          "checkpoints are supported")
  layer_types = hf.get("layer_types")
  L = hf.get("num_hidden_layers")
  if not isinstance(L, int):
    raise CheckpointError(f"config.json num_hidden_layers={L!r}; expected an integer")
  expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
  if layer_types is not None and list(layer_types) != expected:
    raise CheckpointError("config.json layer_types must alternate sliding/full attention starting "
                          "with sliding (Gemma 2); got a different pattern")
  act = hf.get("hidden_activation") or hf.get("hidden_act")
  if act not in (None, "gelu_pytorch_tanh"):
    raise CheckpointError(f"config.json hidden_activation={act!r}; Gemma 2 uses gelu_pytorch_tanh")
  try:
    kw = dict(
      vocab_size=hf["vocab_size"], num_layers=L, d_model=hf["hidden_size"],
      num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
      head_dim=hf["head_dim"], ffn_dim=hf["intermediate_size"],
      query_pre_attn_scalar=hf["query_pre_attn_scalar"], sliding_window=hf["sliding_window"],
      attn_softcap=hf.get("attn_logit_softcapping"),
      final_softcap=hf.get("final_logit_softcapping"),
      rope_base=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
      rms_eps=hf.get("rms_norm_eps", 1e-6),
    )
  except KeyError as e:
    raise CheckpointError(f"config.json lacks {e.args[0]!r}") from None
  kw.update(overrides)
  try:
    return ModelConfig(**kw)
  except ValueError as e:
    raise CheckpointError(f"config.json: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
  return {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
    "vocab_size": cfg.num_real_tokens or cfg.vocab_size, "hidden_size": cfg.d_model,
    "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
    "intermediate_size": cfg.ffn_dim, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
    "sliding_window": cfg.sliding_window, "attn_logit_softcapping": cfg.attn_softcap,
    "final_logit_softcapping": cfg.final_softcap, "rope_theta": cfg.rope_base,
    "rms_norm_eps": cfg.rms_eps, "hidden_activation": "gelu_pytorch_tanh",
    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                    for i in range(cfg.num_layers)],
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "dtype": dtype,
  }


def read_config(path: epath.Path) -> ModelConfig:
  return config_from_hf(_read_config(path))


def _read_config(path: epath.Path) -> dict:
  try:
    hf = json.loads((path / "config.json").read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
  return hf


def is_hf_dir(path: epath.Path) -> bool:
  return (path / "config.json").exists()


def _refuse_pickles(path: epath.Path):
  if not any(path.glob("*.safetensors")) and any(
      path.glob(p) for p in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
    raise CheckpointError(f"{path}: only pickle-based weights (*.bin/*.pt) found; they are never "
                          "loaded (unpickling runs arbitrary code). Convert them to safetensors "
                          "with transformers first.")


def stored_dtype(path: epath.Path) -> np.dtype:
  _refuse_pickles(path)
  reader = SafetensorsReader(path)
  name = "model.embed_tokens.weight"
  return reader.dtype(name if name in reader.keys() else reader.keys()[0])


def _open(path: epath.Path, config: ModelConfig | None) -> tuple[ModelConfig, SafetensorsReader,
                                                                  list[Slot]]:
  """Config, reader and the checked tensor plan; fails before reading any data."""
  _refuse_pickles(path)
  hf_cfg = _read_config(path)
  cfg = config or config_from_hf(hf_cfg)
  reader = SafetensorsReader(path)
  table = entries(cfg)
  expected = [key for e in table for key, _ in e.keys(cfg)]
  # A missing or extra tensor means a different architecture.
  present = set(reader.keys())
  missing = [k for k in expected if k not in present]
  if missing:
    raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing{_more(missing)} (the "
                          f"checkpoint does not match a {cfg.num_layers}-layer Gemma 2 config)")
  known = set(expected)
  unexpected = sorted(k for k in present if k not in known and k not in _IGNORED)
  if unexpected:
    raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}{_more(unexpected)} for "
                          f"this {cfg.num_layers}-layer Gemma 2 config")
  return cfg, reader, plan(cfg, table, reader.shape)


def load(path: epath.Path, dtype, config: ModelConfig | None = None, progress=None):
  cfg, reader, slots = _open(path, config)
  if progress is not None:
    progress.reset(total=len(slots))
  return cfg, read_params(cfg, slots, reader.get, dtype, progress)


def load_sharded(path: epath.Path, dtype, shardings, config: ModelConfig | None = None):
  """Each device's block is copied out of memory-mapped tensors (see SafetensorsReader.view)."""
  cfg, reader, slots = _open(path, config)
  return cfg, sharded.from_blocks(cfg, slots, reader.view, dtype, shardings)


def _more(keys: list) -> str:
  return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def save(params: dict, cfg: ModelConfig, path: epath.Path, dtype, *, max_shard_bytes=5 * 10**9,
         progress=None):
  dtype = np.dtype(dtype)
  specs, produce = export_tensors(cfg, entries(cfg), params, dtype,
                                  vocab_rows=cfg.num_real_tokens or cfg.vocab_size)
  if progress is not None:
    progress.reset(total=len(specs))
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype.name), indent=2))
  write_sharded(path, specs, produce, max_shard_bytes=max_shard_bytes, progress=progress)
