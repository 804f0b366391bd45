"""Analytic model FLOPs (counting causal and sliding-window savings) and accelerator peaks."""

from __future__ import annotations

import dataclasses
import math

import jax

from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.lora import LoraConfig, adapter_shapes

# Per chip, by `device.device_kind`: dense bf16 peak FLOP/s, HBM bandwidth and interconnect bandwidth
# (all ICI links of a TPU chip / NVLink of a GPU), bytes/s, from the vendors' published figures.
_V4 = {"flops": 275e12, "hbm": 1228e9, "ici": 300e9}
_V5E = {"flops": 197e12, "hbm": 819e9, "ici": 200e9}
_V5P = {"flops": 459e12, "hbm": 2765e9, "ici": 600e9}
_V6E = {"flops": 918e12, "hbm": 1640e9, "ici": 448e9}
_H100 = {"flops": 989e12, "hbm": 3350e9, "ici": 900e9}
CHIPS = {
  "TPU v4": _V4, "TPU v5 lite": _V5E, "TPU v5e": _V5E, "TPU v5": _V5P, "TPU v5p": _V5P,
  "TPU v6 lite": _V6E, "TPU v6e": _V6E,
  "NVIDIA H100 80GB HBM3": _H100, "NVIDIA H100": _H100, "NVIDIA H200": {**_H100, "hbm": 4800e9},
  "NVIDIA A100-SXM4-80GB": {"flops": 312e12, "hbm": 2039e9, "ici": 600e9},
  "NVIDIA A100-SXM4-40GB": {"flops": 312e12, "hbm": 1555e9, "ici": 600e9},
}
PEAK_FLOPS = {kind: chip["flops"] for kind, chip in CHIPS.items()}


def mean_keys(seq_len: int, window: int | None) -> float:
  """Mean number of keys a query attends to in a causal row of seq_len (within the window)."""
  T = seq_len
  if window is None or window >= T:
    return (T + 1) / 2
  return (window * (window + 1) / 2 + (T - window) * window) / T


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward QK^T and PV over the visible keys only (the part attention kernels compute)."""
  windows = [cfg.sliding_window if layer % 2 == 0 else None for layer in range(cfg.num_layers)]
  return sum(4 * cfg.num_heads * cfg.head_dim * mean_keys(seq_len, w) for w in windows)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  D, F, N, K, H = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer_dense = 2 * (N * D * H + 2 * K * D * H + N * H * D + 3 * D * F)
  logits = 2 * D * cfg.vocab_size
  return cfg.num_layers * per_layer_dense + logits + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward (2x forward); rematerialisation is not counted (model FLOPs, not HW)."""
  return 3 * forward_flops_per_token(cfg, seq_len)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Model FLOPs of a train step, by part: what `mfu` counts (all of them) and `student_mfu` (the
  student's forward and backward alone). Per slot: per position of the batch's rows, padding
  included (the chips compute it); sampling: per token the student generated on-policy."""

  student: float  # forward + backward per slot
  teacher: float = 0.0  # the frozen forwards per slot: the online teacher's, the EMA anchor's
  sample: float = 0.0  # one decode forward per generated token

  def total(self, slots: float, generated: float = 0.0) -> float:
    return (self.student + self.teacher) * slots + self.sample * generated


def lora_train_flops_per_token(cfg: ModelConfig, seq_len: int, lora: LoraConfig) -> float:
  """Forward + backward of a LoRA student: the frozen base's matmuls need only their input gradient
  in the backward (1x their forward, not 2x: no weight gradient), attention its usual 2x, the
  adapters (and a trained embedding's gradient) 2x; rematerialisation not counted."""
  D, F, N, K, H = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dense = cfg.num_layers * 2 * (N * D * H + 2 * K * D * H + N * H * D + 3 * D * F)
  logits = 2 * D * cfg.vocab_size
  adapters = 2 * sum(math.prod(s["a"]) + math.prod(s["b"]) for s in adapter_shapes(cfg, lora).values())
  return (2 * dense + (3 if lora.train_embeddings else 2) * logits
          + 3 * attention_flops_per_token(cfg, seq_len) + 3 * adapters)


def step_flops(model: ModelConfig, seq_len: int, teacher: ModelConfig | None = None,
               onpolicy: bool = False, lora: LoraConfig | None = None,
               anchor: bool = False) -> StepFlops:
  """The StepFlops of training `model` on rows of seq_len (with an online `teacher`, on-policy
  sampling, as a LoRA student, with the student's EMA as a KL anchor: one more forward of the
  student); a generated token's forward is counted as one of a row's tokens (attention over the
  mean causal context)."""
  forward = forward_flops_per_token(model, seq_len)
  student = 3 * forward if lora is None else lora_train_flops_per_token(model, seq_len, lora)
  frozen = forward_flops_per_token(teacher, seq_len) if teacher is not None else 0.0
  return StepFlops(student=student, teacher=frozen + (forward if anchor else 0.0),
                   sample=forward if onpolicy else 0.0)


def peak_flops_per_device(override: float = 0.0) -> float | None:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return PEAK_FLOPS.get(kind)
