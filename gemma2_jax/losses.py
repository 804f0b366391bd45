"""Token losses computed from final hidden states in sequence chunks.

A full fp32 [B, T, V] logits tensor never exists: `chunked_sum` scans over T in chunks, builds each
chunk's logits from the hidden states (tied embedding + final soft-cap), reduces it to a few scalars,
and is rematerialized in the backward pass, so peak loss memory is O(B x chunk x V), independent of T.
Every token loss (cross-entropy now, distillation losses later) is one per-chunk function plugged
into the same loop.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import logits_from_hidden


def chunked_sum(fn: Callable[..., dict], chunk_size: int, *arrays_BT):
  """sum over chunks c of fn(*[a[:, c] for a in arrays_BT]) -> dict of scalars.

  Every array has leading axes [B, T]; T is padded up to a multiple of chunk_size with zeros, so `fn`
  must give zero for rows whose weight is zero.
  """
  T = arrays_BT[0].shape[1]
  c = min(chunk_size, T)
  n = -(-T // c)
  pad = n * c - T

  def split(a):
    if pad:
      a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(a.shape[0], n, c, *a.shape[2:]), 1, 0)

  chunks = tuple(split(a) for a in arrays_BT)
  body = jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)

  def step(total, xs):
    out = body(*xs)
    return jax.tree.map(jnp.add, total, out), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, *(x[0] for x in chunks)))
  total, _ = jax.lax.scan(step, zeros, chunks)
  return total


def cross_entropy_sums(cfg: ModelConfig, embedding_VD, hidden_BTD, targets_BT, weights_BT, *,
                       chunk_size: int = 1024, z_loss: float = 0.0) -> dict:
  """Weighted sums over tokens: `nll`, `z_loss` (weight * logsumexp^2), `correct`, `weight`.

  Divide by `weight` for token-weighted means; summing (not averaging) per micro-batch keeps
  gradient accumulation exact.
  """
  def fn(hidden_BcD, targets_Bc, weights_Bc):
    logits_BcV = logits_from_hidden(cfg, embedding_VD, hidden_BcD)
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    target_logit_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
    w = weights_Bc.astype(jnp.float32)
    correct = (jnp.argmax(logits_BcV, axis=-1) == targets_Bc).astype(jnp.float32)
    out = {"nll": jnp.sum(w * (lse_Bc - target_logit_Bc)), "correct": jnp.sum(w * correct),
           "weight": jnp.sum(w)}
    if z_loss:
      out["z_loss"] = z_loss * jnp.sum(w * jnp.square(lse_Bc))
    return out

  return chunked_sum(fn, chunk_size, hidden_BTD, targets_BT.astype(jnp.int32), weights_BT)
