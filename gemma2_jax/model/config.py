"""Gemma 2 model configuration: one frozen dataclass; the three released sizes are presets (data)."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal, get_args

import jax.numpy as jnp

from gemma2_jax.errors import UserError

# "auto" picks per platform at trace time (resolve_attention_impl); "splash" is the TPU Pallas kernel
# (interpret mode elsewhere: tests only), "gpu_flash" the GPU kernel.
AttentionImpl = Literal["auto", "xla", "blockwise", "splash", "gpu_flash"]
ATTENTION_IMPLS = get_args(AttentionImpl)
Remat = Literal["none", "full", "save_dots", "offload"]

# The dtypes params, compute and KV caches may take, and the short names users type for them.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16"}


def float_dtype(name: str) -> str:
  """The canonical name of the float dtype `name` (or an alias: bf16, fp32, ...); a UserError for
  anything else, int8 included: weights, compute and caches are floats."""
  canonical = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
  if canonical not in FLOAT_DTYPES:
    raise UserError(f"{name!r} is not a float dtype: use {', '.join(FLOAT_DTYPES)} (or "
                    f"{', '.join(DTYPE_ALIASES)})")
  return canonical


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shapes and numerics of a Gemma 2 decoder.

  `vocab_size` is the number of embedding rows (the last axis of the logits). Kaggle/Flax checkpoints
  carry 256128 rows (128 TPU padding rows); HF checkpoints carry 256000. When `num_real_tokens` is set
  and smaller than `vocab_size`, logits of the padding rows are pushed to -1e9 so softmaxes, losses and
  sampling ignore them and the distribution equals the 256000-row model's.
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  query_pre_attn_scalar: float
  num_real_tokens: int | None = None
  sliding_window: int = 4096
  attn_softcap: float | None = 50.0
  final_softcap: float | None = 30.0
  rope_base: float = 10_000.0
  rms_eps: float = 1e-6
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls; norms, softmax, soft-caps are always fp32.
  attention_impl: AttentionImpl = "xla"
  attention_block_size: int = 512
  remat: Remat = "none"
  # Scan over layer pairs (compile time independent of depth). False unrolls them: slower to compile,
  # but XLA:CPU runs the unrolled backward ~1.5x faster (benchmarks, small CPU runs).
  scan_layers: bool = True

  def __post_init__(self):
    checks = [
      (self.num_layers > 0 and self.num_layers % 2 == 0,
       f"num_layers must be a positive even number (layers come in local+global pairs), "
       f"got {self.num_layers}"),
      (self.num_heads % self.num_kv_heads == 0,
       f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"),
      (self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}"),
      (self.num_real_tokens is None or 0 < self.num_real_tokens <= self.vocab_size,
       f"num_real_tokens ({self.num_real_tokens}) must be in (0, vocab_size={self.vocab_size}]"),
      (self.sliding_window > 0, f"sliding_window must be positive, got {self.sliding_window}"),
      (self.attention_impl in ATTENTION_IMPLS,
       f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"),
      (self.remat in ("none", "full", "save_dots", "offload"),
       f"remat must be 'none', 'full', 'save_dots' or 'offload', got {self.remat!r}"),
      (self.attention_block_size > 0,
       f"attention_block_size must be positive, got {self.attention_block_size}"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # raises TypeError on an unknown dtype name

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def query_scale(self) -> float:
    return self.query_pre_attn_scalar**-0.5

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(fields)}")
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def num_params(self) -> int:
    """Parameter count (embedding counted once: it is tied)."""
    D, F, N, K, H = self.d_model, self.ffn_dim, self.num_heads, self.num_kv_heads, self.head_dim
    per_layer = N * D * H + 2 * K * D * H + N * H * D + 2 * F * D + F * D + 4 * D
    return self.vocab_size * D + D + self.num_layers * per_layer


def resolve_attention_impl(impl: str, platform: str) -> str:
  """The kernel `impl` means on `platform` (a jax platform name): "auto" is splash on TPU, the GPU
  flash kernel on GPU, and the XLA reference elsewhere; any other value means itself."""
  if impl != "auto":
    return impl
  return {"tpu": "splash", "gpu": "gpu_flash", "cuda": "gpu_flash"}.get(platform, "xla")


def gemma2_2b(**overrides) -> ModelConfig:
  return ModelConfig(vocab_size=256128, num_real_tokens=256000, num_layers=26, d_model=2304,
                     num_heads=8, num_kv_heads=4, head_dim=256, ffn_dim=9216,
                     query_pre_attn_scalar=256, **overrides)


def gemma2_9b(**overrides) -> ModelConfig:
  return ModelConfig(vocab_size=256128, num_real_tokens=256000, num_layers=42, d_model=3584,
                     num_heads=16, num_kv_heads=8, head_dim=256, ffn_dim=14336,
                     query_pre_attn_scalar=256, **overrides)


def gemma2_27b(**overrides) -> ModelConfig:
  return ModelConfig(vocab_size=256128, num_real_tokens=256000, num_layers=46, d_model=4608,
                     num_heads=32, num_kv_heads=16, head_dim=128, ffn_dim=36864,
                     query_pre_attn_scalar=144, **overrides)


def tiny(**overrides) -> ModelConfig:
  """A CPU-sized Gemma 2 with every feature switched on: GQA, window < T, scalar != head_dim."""
  kw = dict(vocab_size=512, num_layers=4, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
            ffn_dim=96, query_pre_attn_scalar=24, sliding_window=8)
  kw.update(overrides)
  return ModelConfig(**kw)


PRESETS = {"gemma2_2b": gemma2_2b, "gemma2_9b": gemma2_9b, "gemma2_27b": gemma2_27b, "tiny": tiny}


def get_preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
