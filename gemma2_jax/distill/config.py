"""Distillation settings: the divergence, alpha / temperature schedules, on-policy sampling, the teacher."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from gemma2_jax.model.losses import DISTILL_LOSSES, DistillLoss


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
  """Which divergence, and alpha / temperature as constants or linear ramps over the first steps.

  alpha (weight of the distillation term; 1 - alpha goes to hard-label CE) goes linearly from `alpha`
  at step 0 to `alpha_end` at step `alpha_steps` and stays there; likewise the temperature. Leave the
  `_end` at None (and steps at 0) for a constant.

  On-policy distillation (GKD; gemma2_jax/onpolicy.py): with probability `onpolicy_lambda` per step,
  the final model turn of every row is replaced by the student's own sample (up to
  `onpolicy_max_new_tokens` tokens at `onpolicy_temperature`, filtered by `onpolicy_top_k` (0: off) and
  `onpolicy_top_p` (1: off)), and the divergence is taken on the sampled tokens only. 0 = off-policy
  distillation on the data's responses (the same program as without the feature).

  EMA anchor (WARP, Rame et al. 2024, stage 1; online distillation only): `anchor_kl_weight` > 0 adds
  anchor_kl_weight * KL(P_S || P_EMA) to the objective, P_EMA the distribution of the student's own
  EMA (train.ema_decay, required), at temperature 1, token-weighted like the other terms and logged as
  `anchor_kl`. The reverse direction, as in RLHF's KL(policy || reference): the anchor gets no
  gradient. 0 = off (the same program as without the feature).
  """

  loss: DistillLoss = "soft_ce"
  beta: float = 0.5  # jsd only: 0 = forward KL, 1 = reverse KL (see the module docstring)
  alpha: float = 1.0
  alpha_end: float | None = None
  alpha_steps: int = 0
  temperature: float = 1.0
  temperature_end: float | None = None
  temperature_steps: int = 0
  onpolicy_lambda: float = 0.0
  onpolicy_max_new_tokens: int = 128
  onpolicy_temperature: float = 1.0
  onpolicy_top_k: int = 0
  onpolicy_top_p: float = 1.0
  anchor_kl_weight: float = 0.0

  def __post_init__(self):
    checks = [
      (0.0 <= self.onpolicy_lambda <= 1.0,
       f"onpolicy_lambda must be in [0, 1], got {self.onpolicy_lambda}"),
      (self.onpolicy_max_new_tokens > 0,
       f"onpolicy_max_new_tokens must be positive, got {self.onpolicy_max_new_tokens}"),
      (self.onpolicy_temperature >= 0,
       f"onpolicy_temperature must be >= 0 (0 = greedy), got {self.onpolicy_temperature}"),
      (self.onpolicy_top_k >= 0, f"onpolicy_top_k must be >= 0 (0 = off), got {self.onpolicy_top_k}"),
      (0.0 < self.onpolicy_top_p <= 1.0,
       f"onpolicy_top_p must be in (0, 1] (1 = off), got {self.onpolicy_top_p}"),
      (self.anchor_kl_weight >= 0, f"anchor_kl_weight must be >= 0 (0 = off), got {self.anchor_kl_weight}"),
      (self.loss in DISTILL_LOSSES, f"loss must be one of {DISTILL_LOSSES}, got {self.loss!r}"),
      (0.0 <= self.beta <= 1.0, f"beta must be in [0, 1], got {self.beta}"),
      (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
      (self.alpha_end is None or 0.0 <= self.alpha_end <= 1.0,
       f"alpha_end must be in [0, 1], got {self.alpha_end}"),
      (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
      (self.temperature_end is None or self.temperature_end > 0,
       f"temperature_end must be positive, got {self.temperature_end}"),
    ]
    for name in ("alpha", "temperature"):
      end, steps = getattr(self, f"{name}_end"), getattr(self, f"{name}_steps")
      checks.append(((end is None) == (steps == 0) and steps >= 0,
                     f"{name}_steps must be > 0 when {name}_end is set and 0 when it is not, got "
                     f"{name}_end={end}, {name}_steps={steps}"))
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)


def _ramp(start: float, end: float | None, steps: int, step):
  if end is None:
    return start
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
  return start + (end - start) * frac


def distill_schedule(cfg: DistillConfig, step):
  """(alpha, temperature) at `step` (an int or a traced integer). A constant comes back as a Python
  float, so the T = 1 fast path and shape specializations stay static; a ramp as a float32 scalar."""
  return (_ramp(cfg.alpha, cfg.alpha_end, cfg.alpha_steps, step),
          _ramp(cfg.temperature, cfg.temperature_end, cfg.temperature_steps, step))

@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig:
  """A frozen teacher for online distillation: loaded once, no gradients, no optimizer state."""

  checkpoint: str = ""  # HF safetensors dir, Kaggle Flax or native checkpoint (or a training workdir)
  dtype: str = "bfloat16"  # params and compute
  preset: str = ""  # model preset to read the checkpoint with (Kaggle trees of non-release shapes)
  sharding_rules: list | None = None  # logical rules for the teacher's params; None = the student's
