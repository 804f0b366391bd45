"""The optimizer: AdamW (or Adafactor) with warmup + cosine / linear / WSD / constant schedules,
global-norm clipping and a decay mask, and the one place an update is applied to the params.

Bytes per parameter beyond the params (the 9B has 9.24e9) and what each memory-lean choice costs:
- `name="adamw"`, fp32 moments (the default): 8 (mu and nu).
- `moment_dtype="bfloat16"`: 4. Same arithmetic (in fp32), moments stored rounded to 8 mantissa
  bits (relative 2^-9 per step); fine for b2 <= ~0.99; with b2 nearer 1 the per-step change of nu
  falls under half a bf16 ulp and nu stalls.
- `name="adafactor"` (optax.adafactor): ~0 (one row and one column mean per matrix; a few MB for
  the 9B) without momentum, 2 or 4 with `adafactor_momentum` in bf16 / fp32. The second moment is a
  rank-1 estimate per matrix and, without momentum, each step moves by a clipped g / rms(g):
  noisier than Adam at the same learning rate.
- bf16 params (`model.param_dtype="bfloat16"`) halve the params and gradients (2 + 2 instead of
  4 + 4) but lose updates smaller than half an ulp (2^-9 of the weight) under round-to-nearest;
  `stochastic_rounding=True` rounds p + u up or down at random with the probabilities that make
  the expectation exact, so small updates survive on average.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "wsd", "constant")
OPTIMIZERS = ("adamw", "adafactor")
MOMENT_DTYPES = ("float32", "bfloat16")
# Stochastic rounding's key is fold_in(key(ROUNDING_SEED), step): a function of the step alone, so a
# resumed run rounds exactly as the uninterrupted one.
ROUNDING_SEED = 0x5EED


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  name: str = "adamw"  # or "adafactor" (factored second moments; see the module docstring)
  learning_rate: float = 3e-4
  end_learning_rate: float = 3e-5
  schedule: str = "cosine"
  warmup_steps: int = 100
  decay_steps: int = 0  # steps of the whole schedule incl. warmup; 0 = the run's train.steps
  wsd_decay_fraction: float = 0.2  # WSD: the last fraction of decay_steps decays linearly
  b1: float = 0.9  # AdamW only
  b2: float = 0.95  # AdamW only
  eps: float = 1e-8  # AdamW only
  weight_decay: float = 0.1  # decoupled, scaled by the learning rate (both optimizers)
  decay_embedding: bool = False  # norms are never decayed
  clip_norm: float = 1.0  # global-norm clipping; 0 disables
  moment_dtype: str = "float32"  # AdamW's mu and nu, Adafactor's momentum: float32 or bfloat16
  stochastic_rounding: bool = False  # bf16 params: p + u rounded stochastically (unbiased)
  # Adafactor (optax.adafactor's arguments of the same names):
  adafactor_decay_rate: float = 0.8  # second-moment decay 1 - (t + 1)^-0.8
  adafactor_min_dim_to_factor: int = 128  # matrices with two dims >= this are factored
  adafactor_clip_threshold: float = 1.0  # per-tensor update RMS clipping; 0 disables
  adafactor_momentum: float = 0.0  # 0: none (no first moment at all); e.g. 0.9 adds one
  adafactor_param_scale: bool = False  # True: the learning rate is relative to each tensor's RMS

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.moment_dtype not in MOMENT_DTYPES:
      raise ValueError(f"optimizer.moment_dtype must be one of {MOMENT_DTYPES}, got "
                       f"{self.moment_dtype!r}")
    if self.learning_rate <= 0 or self.end_learning_rate < 0:
      raise ValueError("optimizer.learning_rate must be > 0 and end_learning_rate >= 0")
    if self.warmup_steps < 0 or not 0 <= self.wsd_decay_fraction <= 1:
      raise ValueError("optimizer.warmup_steps must be >= 0 and wsd_decay_fraction in [0, 1]")
    if not 0 <= self.adafactor_momentum < 1 or self.adafactor_clip_threshold < 0:
      raise ValueError("optimizer.adafactor_momentum must be in [0, 1) and adafactor_clip_threshold "
                       ">= 0")

  def check_param_dtype(self, param_dtype: str):
    """Raises ValueError (one line) when the options do not suit params of `param_dtype`."""
    if self.stochastic_rounding and param_dtype != "bfloat16":
      raise ValueError(f"optimizer.stochastic_rounding needs bfloat16 params, but model.param_dtype is "
                       f"{param_dtype!r}: set --config.model.param_dtype=bfloat16 or "
                       "stochastic_rounding=False")


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


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored in `moment_dtype` (optax keeps nu in the params'
  dtype). The arithmetic is fp32 whatever the storage, and the update is fp32; with float32 moments
  it is optax's, operation for operation."""
  moment_dtype = jnp.dtype(moment_dtype)

  def init(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=optax.tree.zeros_like(params, dtype=moment_dtype),
                                  nu=optax.tree.zeros_like(params, dtype=moment_dtype))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1, c2 = 1 - b1 ** count, 1 - b2 ** count

    def one(g, m, v):
      g = g.astype(jnp.float32)
      m = (1 - b1) * g + b1 * m.astype(jnp.float32)
      v = (1 - b2) * g ** 2 + b2 * v.astype(jnp.float32)
      u = (m / c1) / (jnp.sqrt(v / c2 + 0.0) + eps)
      return u, m.astype(moment_dtype), v.astype(moment_dtype)

    treedef = jax.tree.structure(updates)
    out = [one(g, m, v) for g, m, v in zip(treedef.flatten_up_to(updates),
                                           treedef.flatten_up_to(state.mu),
                                           treedef.flatten_up_to(state.nu), strict=True)]
    u, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
    return u, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


class _Float32(NamedTuple):
  inner: optax.OptState


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` fed fp32 gradients and params: its state and arithmetic fp32 even for bf16 params.
  (optax's Adafactor keeps its statistics in the params' dtype; bf16 ones would stall as its decay
  nears 1. They are small.) For fp32 params this is `tx` itself."""
  def f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def init(params):
    return _Float32(tx.init(f32(params)))

  def update(updates, state, params=None):
    updates, inner = tx.update(f32(updates), state.inner, None if params is None else f32(params))
    return updates, _Float32(inner)

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
  """(tx, schedule). Weight decay is decoupled and scaled by the learning rate for both optimizers
  (AdamW's convention; optax.adafactor's own `weight_decay_rate` is not scaled)."""
  schedule = make_schedule(cfg, total_steps)
  mask = lambda p: decay_mask(p, cfg.decay_embedding)  # noqa: E731
  if cfg.name == "adafactor":
    wd = cfg.weight_decay
    opt = in_float32(optax.adafactor(
      schedule, min_dim_size_to_factor=cfg.adafactor_min_dim_to_factor,
      decay_rate=cfg.adafactor_decay_rate, multiply_by_parameter_scale=cfg.adafactor_param_scale,
      clipping_threshold=cfg.adafactor_clip_threshold or None,
      momentum=cfg.adafactor_momentum or None, dtype_momentum=jnp.dtype(cfg.moment_dtype),
      weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None,
      weight_decay_mask=mask))
  elif cfg.moment_dtype == "float32":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=mask)
  else:
    opt = adamw(cfg, schedule, cfg.moment_dtype)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt
  return tx, schedule


def adamw(cfg: OptimizerConfig, schedule, moment_dtype) -> optax.GradientTransformation:
  """optax.adamw's chain (the same state tree) around our scale_by_adam: moments in `moment_dtype`."""
  return optax.chain(scale_by_adam(cfg.b1, cfg.b2, cfg.eps, moment_dtype),
                     optax.add_decayed_weights(cfg.weight_decay,
                                               lambda p: decay_mask(p, cfg.decay_embedding)),
                     optax.scale_by_learning_rate(schedule))


def stochastic_round(x: jax.Array, key: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
  """fp32 -> bf16 rounding up with probability (x - down) / (up - down): E[result] = x.

  Adds 16 random bits below bf16's last mantissa bit and truncates them (on the magnitude, so the
  same holds for negative x).
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
  truncated = (bits + noise) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(truncated, jnp.float32).astype(dtype)


def apply_updates(cfg: OptimizerConfig, params, updates, step: jax.Array):
  """params + updates, in the params' dtype: the one place the train step applies an update.

  With `cfg.stochastic_rounding`, bf16 leaves get p + u computed in fp32 and rounded stochastically
  with a key derived from `step` and the leaf's position (the same step always rounds the same way).
  """
  if not cfg.stochastic_rounding:
    return optax.apply_updates(params, updates)
  key = jax.random.fold_in(jax.random.key(ROUNDING_SEED), step)
  treedef = jax.tree.structure(params)

  def one(i, p, u):
    if p.dtype != jnp.bfloat16:
      return (p + u).astype(p.dtype)
    return stochastic_round(p.astype(jnp.float32) + u.astype(jnp.float32),
                            jax.random.fold_in(key, i))

  return treedef.unflatten([one(i, p, u) for i, (p, u) in enumerate(
    zip(treedef.flatten_up_to(params), treedef.flatten_up_to(updates), strict=True))])


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
