"""AdamW with warmup + cosine / linear / WSD / constant schedules, clipping and a decay mask."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "wsd", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  end_learning_rate: float = 3e-5
  schedule: str = "cosine"
  warmup_steps: int = 100
  decay_steps: int = 0  # steps of the whole schedule incl. warmup; 0 = the run's train.steps
  wsd_decay_fraction: float = 0.2  # WSD: the last fraction of decay_steps decays linearly
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embedding: bool = False  # norms are never decayed
  clip_norm: float = 1.0  # global-norm clipping; 0 disables

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.learning_rate <= 0 or self.end_learning_rate < 0:
      raise ValueError("optimizer.learning_rate must be > 0 and end_learning_rate >= 0")
    if self.warmup_steps < 0 or not 0 <= self.wsd_decay_fraction <= 1:
      raise ValueError("optimizer.warmup_steps must be >= 0 and wsd_decay_fraction in [0, 1]")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  total = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
  peak, end, warm = cfg.learning_rate, cfg.end_learning_rate, cfg.warmup_steps
  warmup = optax.linear_schedule(0.0, peak, warm) if warm else optax.constant_schedule(peak)
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, total - warm, alpha=end / peak)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(peak, end, total - warm)
  elif cfg.schedule == "constant":
    main = optax.constant_schedule(peak)
  else:  # warmup-stable-decay
    decay = max(1, round(cfg.wsd_decay_fraction * total))
    stable = max(0, total - warm - decay)
    main = optax.join_schedules([optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, end, decay)], [stable])
  return optax.join_schedules([warmup, main], [warm])


def decay_mask(params: dict, decay_embedding: bool) -> dict:
  """True where weight decay applies: projections (and the embedding if asked), never norms."""
  def mask(path, _):
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[-1] == "scale":
      return False
    if keys[-1] == "input_embedding":
      return decay_embedding
    return True
  return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=lambda p: decay_mask(p, cfg.decay_embedding))
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw
  return tx, schedule


def apply_updates(cfg: OptimizerConfig, params, updates, step: jax.Array):
  """params + updates, in the params' dtype: the one place the train step applies an update."""
  del cfg, step
  return optax.apply_updates(params, updates)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
