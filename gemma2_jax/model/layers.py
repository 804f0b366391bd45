"""Stateless Gemma 2 building blocks: RMSNorm, RoPE, soft-cap, GeGLU feed-forward."""

import jax
import jax.numpy as jnp


def rms_norm(x, scale, eps: float):
  """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`, computed in fp32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def soft_cap(x, cap: float | None):
  """`cap * tanh(x / cap)` in at least fp32 (float64 stays float64); identity when cap is None."""
  if cap is None:
    return x
  return cap * jnp.tanh(x.astype(jnp.promote_types(x.dtype, jnp.float32)) / cap)


def apply_rope(x_BTNH, positions_BT, base: float):
  """Rotary embedding, half-split layout: dims [0, H/2) pair with [H/2, H)."""
  H = x_BTNH.shape[-1]
  inv_freq_h = 1.0 / (base ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
  sin_BT1h = jnp.sin(angle_BTh)[:, :, None, :]
  cos_BT1h = jnp.cos(angle_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], axis=-1)
  return out.astype(x_BTNH.dtype)


def feed_forward(x_BTD, gating_CFD, linear_FD, gating_spec: str = "CFD"):
  """GeGLU: gelu_tanh(x W_gate) * (x W_up) W_down; gating index 0 is the gelu branch.

  `gating_spec` names the gating weight's axis order (the checkpoint's CFD, or DCF for decoding).
  """
  # C after the batch axes: the dot's natural output layout (no transpose copy; faster on CPU).
  gate_BTCF = jnp.einsum(f"BTD,{gating_spec}->BTCF", x_BTD, gating_CFD)
  act_BTF = jax.nn.gelu(gate_BTCF[..., 0, :], approximate=True) * gate_BTCF[..., 1, :]
  return jnp.einsum("BTF,FD->BTD", act_BTF, linear_FD)


def positions_from_segments(segment_ids_BT):
  """Positions that restart at 0 at every change of segment id (packed documents)."""
  B, T = segment_ids_BT.shape
  idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  is_start_BT = jnp.concatenate(
    [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start_BT = jax.lax.cummax(jnp.where(is_start_BT, idx_BT, 0), axis=1)
  return idx_BT - start_BT
