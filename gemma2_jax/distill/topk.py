"""The teacher's top-k next-token log-probs of packed rows: what offline distillation stores."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma2_jax.model.transformer import forward_hidden, logits_from_hidden


def make_topk_fn(cfg, k: int, chunk: int):
  """(params, tokens, positions, segment_ids [B, T]) -> (log-probs float32, ids int32) [B, T, k].

  The teacher's logits exist one [B, chunk, V] chunk at a time (lax.map over T chunks).
  """
  def fn(params, tokens_BT, positions_BT, segment_ids_BT):
    hidden_BTD = forward_hidden(cfg, params, tokens_BT, positions_BT, segment_ids_BT)
    B, T, D = hidden_BTD.shape
    c = min(chunk, T)
    n = -(-T // c)
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, n * c - T), (0, 0)))
    hidden_nBcD = jnp.moveaxis(hidden_BTD.reshape(B, n, c, D), 1, 0)
    embedding_VD = params["embedder"]["input_embedding"]

    def one(hidden_BcD):
      logp_BcV = jax.nn.log_softmax(logits_from_hidden(cfg, embedding_VD, hidden_BcD), axis=-1)
      return jax.lax.top_k(logp_BcV.astype(jnp.float32), k)

    logp_nBck, ids_nBck = jax.lax.map(one, hidden_nBcD)
    def back(x):
      return jnp.moveaxis(x, 0, 1).reshape(B, n * c, k)[:, :T]
    return back(logp_nBck), back(ids_nBck).astype(jnp.int32)

  return fn
