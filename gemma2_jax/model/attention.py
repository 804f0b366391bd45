"""Gemma 2 attention: a reference XLA implementation and a blockwise one with local-window skipping.

Both take rotated, pre-scaled queries and return the same values (see tests). Masks are by index in the
row: causal, same segment id, and for local layers `t - s < window` (query t sees keys t-W+1..t).
Attention logits are soft-capped before masking, as in Gemma 2.
"""

import math

import jax
import jax.numpy as jnp

from gemma2_jax.model.layers import soft_cap

_MASKED = -2.3819763e38  # large finite negative: fully masked blocks never produce NaN.


def _mask(t_idx, s_idx, seg_t, seg_s, window: int | None):
  """Visibility of key s from query t; all arguments broadcast against each other."""
  visible = (s_idx <= t_idx) & (seg_t == seg_s)
  if window is not None:
    visible &= t_idx - s_idx < window
  return visible


def attention_xla(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None,
                  softcap: float | None):
  """Materializes [B,K,G,T,S] logits: simple, exact, O(T*S) memory."""
  T = q_BTNH.shape[1]
  idx = jnp.arange(T)
  visible_BTS = _mask(idx[:, None], idx[None, :], segment_ids_BT[:, :, None],
                      segment_ids_BT[:, None, :], window)
  return _dense(q_BTNH, k_BSKH, v_BSKH, visible_BTS, softcap)


def _dense(q_BTNH, k_BSKH, v_BSKH, visible_BTS, softcap: float | None):
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(q_BTNH.dtype),
                            preferred_element_type=jnp.float32)
  logits_BKGTS = soft_cap(logits_BKGTS, softcap)
  logits_BKGTS = jnp.where(visible_BTS[:, None, None], logits_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(q_BTNH.dtype)
  out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH.astype(q_BTNH.dtype))
  return out_BTKGH.reshape(B, T, N, H)


def attention_blockwise(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None,
                        softcap: float | None, block_size: int):
  """Online-softmax attention over key blocks, for all query blocks at once.

  Query block i visits key blocks i, i-1, ..., i-n+1: n = all blocks for global layers, and only the
  ceil((W-1)/b)+1 blocks that can hold keys inside the window for local layers, so a local layer
  costs O(T*W) compute and memory instead of O(T^2).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  b = min(block_size, T)
  nb = -(-T // b)
  pad = nb * b - T
  if pad:
    q_BTNH, k_BSKH, v_BSKH = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
                              for a in (q_BTNH, k_BSKH, v_BSKH))
    segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=-1)
  # Q: query block, t: position in a query block, s: position in a key block.
  q_BQtKGH = q_BTNH.reshape(B, nb, b, K, G, H)
  k_BQsKH = k_BSKH.reshape(B, nb, b, K, H)
  v_BQsKH = v_BSKH.reshape(B, nb, b, K, H)
  seg_BQt = segment_ids_BT.reshape(B, nb, b)
  t_idx_Qt = jnp.arange(nb * b).reshape(nb, b)
  n_offsets = nb if window is None else min(nb, math.ceil((window - 1) / b) + 1)

  def step(carry, offset):
    m_BQKGt, l_BQKGt, acc_BQtKGH = carry
    kb_Q = jnp.arange(nb) - offset  # key block visited by each query block
    kb_clipped_Q = jnp.maximum(kb_Q, 0)
    k_blk = jnp.take(k_BQsKH, kb_clipped_Q, axis=1)
    v_blk = jnp.take(v_BQsKH, kb_clipped_Q, axis=1)
    seg_s_BQs = jnp.take(seg_BQt, kb_clipped_Q, axis=1)
    s_idx_Qs = kb_Q[:, None] * b + jnp.arange(b)
    visible_BQts = _mask(t_idx_Qt[None, :, :, None], s_idx_Qs[None, :, None, :],
                         seg_BQt[..., :, None], seg_s_BQs[..., None, :], window)
    visible_BQts &= (kb_Q >= 0)[None, :, None, None]
    logits = jnp.einsum("BQtKGH,BQsKH->BQKGts", q_BQtKGH, k_blk,
                        preferred_element_type=jnp.float32)
    logits = soft_cap(logits, softcap)
    visible = visible_BQts[:, :, None, None]
    logits = jnp.where(visible, logits, _MASKED)
    m_new = jnp.maximum(m_BQKGt, logits.max(-1))
    p = jnp.exp(logits - m_new[..., None]) * visible
    correction = jnp.exp(m_BQKGt - m_new)
    l_new = l_BQKGt * correction + p.sum(-1)
    pv_BQtKGH = jnp.einsum("BQKGts,BQsKH->BQtKGH", p.astype(v_BSKH.dtype), v_blk,
                           preferred_element_type=jnp.float32)
    acc_new = acc_BQtKGH * jnp.moveaxis(correction, -1, 2)[..., None] + pv_BQtKGH
    return (m_new, l_new, acc_new), None

  init = (jnp.full((B, nb, K, G, b), _MASKED, jnp.float32),
          jnp.zeros((B, nb, K, G, b), jnp.float32),
          jnp.zeros((B, nb, b, K, G, H), jnp.float32))
  (_, l_BQKGt, acc_BQtKGH), _ = jax.lax.scan(step, init, jnp.arange(n_offsets))
  out = acc_BQtKGH / jnp.moveaxis(l_BQKGt, -1, 2)[..., None]
  return out.reshape(B, nb * b, N, H)[:, :T].astype(v_BSKH.dtype)


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None,
              softcap: float | None, impl: str, block_size: int):
  if impl == "xla":
    return attention_xla(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window, softcap=softcap)
  return attention_blockwise(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window,
                             softcap=softcap, block_size=block_size)


def attention_cached(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, *, window: int | None,
                     softcap: float | None):
  """Attention of T new queries over S cache slots, masked by token positions, not slot indices.

  `kv_pos_BS` is the position of the token each slot holds (-1: empty or padding), so a ring cache
  of `window` slots and left-padded rows both see exactly the keys within `window` real tokens.
  """
  valid_BS = kv_pos_BS >= 0
  visible_BTS = _mask(q_pos_BT[:, :, None], kv_pos_BS[:, None, :], True, valid_BS[:, None, :], window)
  return _dense(q_BTNH, k_BSKH, v_BSKH, visible_BTS, softcap)
