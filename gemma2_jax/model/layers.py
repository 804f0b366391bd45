"""Stateless Gemma 2 building blocks: RMSNorm, RoPE, soft-cap, GeGLU feed-forward, and the two things
a LoRA / QLoRA forward adds to a projection: adapters (`adapter_delta`) and quantized weights
(`project`). Both are absent from a plain params tree, and the forward is then the same ops as ever."""

import flax.struct
import jax
import jax.numpy as jnp

from gemma2_jax.model.quant import dequantize, is_quantized

# The projections an adapter may sit on (model/lora.py's TARGETS, in this order).
ADAPTERS = ("q", "k", "v", "o", "gate", "up", "down")


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


def feed_forward(x_BTD, gating_CFD, linear_FD, gating_spec: str = "CFD", lora=None):
  """GeGLU: gelu_tanh(x W_gate) * (x W_up) W_down; gating index 0 is the gelu branch.

  `gating_spec` names the gating weight's axis order (the checkpoint's CFD, or DCF for decoding).
  Weights may be Quantized (see `project`); `lora`: one layer's adapters (gate, up, down), if any.
  """
  # C after the batch axes: the dot's natural output layout (no transpose copy; faster on CPU).
  gate_BTCF = project(f"BTD,{gating_spec}->BTCF", x_BTD, gating_CFD)
  gate_BTF = plus(gate_BTCF[..., 0, :], adapter_delta(lora, "gate", x_BTD))
  up_BTF = plus(gate_BTCF[..., 1, :], adapter_delta(lora, "up", x_BTD))
  act_BTF = jax.nn.gelu(gate_BTF, approximate=True) * up_BTF
  return plus(project("BTF,FD->BTD", act_BTF, linear_FD), adapter_delta(lora, "down", act_BTF))


def project(spec: str, x, w, shape: tuple[int, ...] | None = None):
  """einsum(spec, x, w), `w` first reshaped to `shape` if given.

  A Quantized `w` (a frozen QLoRA base) is dequantized to x's dtype inside a `jax.checkpoint`: the
  backward recomputes the dequantization (cheap, elementwise) instead of keeping each layer's
  dequantized weight alive from the forward, so no dense copy of the model ever exists.
  """
  if not is_quantized(w):
    return jnp.einsum(spec, x, w if shape is None else w.reshape(shape))

  def dense(x, w):
    w = dequantize(w, x.dtype)
    return jnp.einsum(spec, x, w if shape is None else w.reshape(shape))

  return jax.checkpoint(dense)(x, w)


@flax.struct.dataclass
class Dropout:
  """The adapters' input dropout: one key per layer ([L, 2] key data, scanned with the layers)."""

  key: jax.Array
  rate: float = flax.struct.field(pytree_node=False)


def adapter_delta(lora: dict | None, name: str, x):
  """What adapter `name` adds to its projection's output for input x [B, T, *in]: (x . a) . b with
  one layer's a [*in, r] (already times alpha / r) and b [r, *out], x first dropped out (PEFT's
  lora_dropout; each adapter its own mask); None without that adapter."""
  if not lora or name not in lora:
    return None
  a, b = lora[name]["a"], lora[name]["b"]
  drop = lora.get("dropout")
  if drop is not None:
    key = jax.random.fold_in(jax.random.wrap_key_data(drop.key), ADAPTERS.index(name))
    keep = jax.random.bernoulli(key, 1.0 - drop.rate, x.shape)
    x = jnp.where(keep, x / jnp.asarray(1.0 - drop.rate, x.dtype), jnp.zeros((), x.dtype))
  h_BTR = jnp.tensordot(x, a, axes=a.ndim - 1)
  return jnp.tensordot(h_BTR, b, axes=1)


def plus(y, delta):
  """y + delta; y itself without an adapter (so the base forward stays bit for bit what it was)."""
  return y if delta is None else y + delta.astype(y.dtype)


def positions_from_segments(segment_ids_BT):
  """Positions that restart at 0 at every change of segment id (packed documents)."""
  B, T = segment_ids_BT.shape
  idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  is_start_BT = jnp.concatenate(
    [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start_BT = jax.lax.cummax(jnp.where(is_start_BT, idx_BT, 0), axis=1)
  return idx_BT - start_BT
