"""Gemma 2 attention: a reference XLA implementation and a portable blockwise one (flash-style VJP:
memory linear in T; only block pairs inside the causal band / window are computed).

Both take rotated, pre-scaled queries and return the same values (see tests). Masks are by index in the
row: causal, same segment id, and for local layers `t - s < window` (query t sees keys t-W+1..t).
Attention logits are soft-capped before masking, as in Gemma 2.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma2_jax.model.config import resolve_attention_impl
from gemma2_jax.model.layers import soft_cap
from gemma2_jax.parallel.sharding import current_platform

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


@functools.cache
def _band_schedule(nb: int, n_off: int):
  """The visible block pairs `(Q, kb)`, `0 <= Q - kb < n_off`, as `n_off` steps of `L` lanes.

  Q is a query block, kb a key block, L the pairs one step computes at once (lanes). Pair (Q, kb) runs
  at step `(Q + kb) % n_off`. A query block's key blocks are consecutive (at most n_off of them), so
  they land on distinct steps, and so do a key block's query blocks: within a step no two lanes share a
  query block or a key block, so per-block accumulators are gathered and scattered without collisions
  (deterministic, no atomics). The residues split the band about evenly (>= 75% of lanes valid, >= 90%
  from 8 blocks on), where an offset-per-step scan over all query blocks spends half of a global
  layer's work on the masked upper triangle. Short steps are padded with lanes pointing at blocks that
  step does not use, marked invalid: their updates are exact no-ops. Returns int32 q_idx, k_idx and
  bool valid, each [n_off, L].
  """
  steps = [[] for _ in range(n_off)]
  for qb in range(nb):
    for kb in range(max(0, qb - n_off + 1), qb + 1):
      steps[(qb + kb) % n_off].append((qb, kb))
  L = max(len(pairs) for pairs in steps)
  q_idx = np.zeros((n_off, L), np.int32)
  k_idx = np.zeros((n_off, L), np.int32)
  valid = np.zeros((n_off, L), bool)
  for i, pairs in enumerate(steps):
    used_q = {qb for qb, _ in pairs}
    used_k = {kb for _, kb in pairs}
    spare_q = [qb for qb in range(nb) if qb not in used_q]
    spare_k = [kb for kb in range(nb) if kb not in used_k]
    pad = L - len(pairs)
    pairs = pairs + list(zip(spare_q[:pad], spare_k[:pad], strict=True))
    q_idx[i], k_idx[i] = np.array(pairs, np.int32).T
    valid[i, :L - pad] = True
  for a in (q_idx, k_idx, valid):
    a.flags.writeable = False  # shared by every caller through the cache
  return q_idx, k_idx, valid


def _n_offsets(nb: int, b: int, window: int | None) -> int:
  """Key blocks a query block can see: all up to the diagonal on global layers; on local ones only
  those within `window`: block distance d holds keys down to (d-1)*b + 1 positions away."""
  return nb if window is None else min(nb, math.ceil((window - 1) / b) + 1)


def _to_blocks(x, nb: int):
  """[B, nb*b, ...] -> [nb, B, b, ...]: block-major, so gathering blocks reads contiguous slabs."""
  B, Tp = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, nb, Tp // nb, *x.shape[2:]), 1, 0)


def _pair_logits(q_LBtKGH, k_LBsKH, seg_t_LBt, seg_s_LBs, qi_L, ki_L, valid_L, *, b: int,
                 window: int | None, softcap: float | None):
  """Soft-capped fp32 logits of one step's block pairs, and their visibility (broadcasts over K, G)."""
  logits_LBKGts = jnp.einsum("LBtKGH,LBsKH->LBKGts", q_LBtKGH, k_LBsKH,
                             preferred_element_type=jnp.float32)
  logits_LBKGts = soft_cap(logits_LBKGts, softcap)
  t_idx_Lt = qi_L[:, None] * b + jnp.arange(b)
  s_idx_Ls = ki_L[:, None] * b + jnp.arange(b)
  visible_LBts = _mask(t_idx_Lt[:, None, :, None], s_idx_Ls[:, None, None, :],
                       seg_t_LBt[..., :, None], seg_s_LBs[..., None, :], window)
  visible_LBts &= valid_L[:, None, None, None]
  return logits_LBKGts, visible_LBts[:, :, None, None]


def _blockwise_prepare(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block_size: int):
  """Pads T to whole blocks (padding keys sit after every real query: causally invisible) and
  splits into block-major [Q, B, b, ...] arrays."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  b = min(block_size, T)
  nb = -(-T // b)
  pad = nb * b - T
  if pad:
    q_BTNH, k_BSKH, v_BSKH = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
                              for a in (q_BTNH, k_BSKH, v_BSKH))
    segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=-1)
  q_QBtKGH = _to_blocks(q_BTNH.reshape(B, nb * b, K, N // K, H), nb)
  return q_QBtKGH, _to_blocks(k_BSKH, nb), _to_blocks(v_BSKH, nb), _to_blocks(segment_ids_BT, nb), b, nb


def _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, block_size):
  """Online softmax over the band schedule. Returns the output [B, T, N, H] and the per-row
  logsumexp [Q, B, K, G, t] (fp32, padded rows included), the one residual the backward needs."""
  B, T, N, H = q_BTNH.shape
  q_QBtKGH, k_QBsKH, v_QBsKH, seg_QBt, b, nb = _blockwise_prepare(
    q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block_size)
  K, G = q_QBtKGH.shape[3:5]
  schedule = tuple(jnp.asarray(a) for a in _band_schedule(nb, _n_offsets(nb, b, window)))

  def step(carry, xs):
    m_QBKGt, l_QBKGt, acc_QBtKGH = carry
    qi_L, ki_L, valid_L = xs
    logits, visible = _pair_logits(q_QBtKGH[qi_L], k_QBsKH[ki_L], seg_QBt[qi_L], seg_QBt[ki_L],
                                   qi_L, ki_L, valid_L, b=b, window=window, softcap=softcap)
    logits = jnp.where(visible, logits, _MASKED)
    m_LBKGt = m_QBKGt[qi_L]
    m_new = jnp.maximum(m_LBKGt, logits.max(-1))
    p = jnp.exp(logits - m_new[..., None]) * visible
    correction = jnp.exp(m_LBKGt - m_new)
    l_new = l_QBKGt[qi_L] * correction + p.sum(-1)
    pv_LBtKGH = jnp.einsum("LBKGts,LBsKH->LBtKGH", p.astype(v_QBsKH.dtype), v_QBsKH[ki_L],
                           preferred_element_type=jnp.float32)
    acc_new = acc_QBtKGH[qi_L] * jnp.moveaxis(correction, -1, 2)[..., None] + pv_LBtKGH
    return (m_QBKGt.at[qi_L].set(m_new, unique_indices=True),
            l_QBKGt.at[qi_L].set(l_new, unique_indices=True),
            acc_QBtKGH.at[qi_L].set(acc_new, unique_indices=True)), None

  init = (jnp.full((nb, B, K, G, b), _MASKED, jnp.float32),
          jnp.zeros((nb, B, K, G, b), jnp.float32),
          jnp.zeros((nb, B, b, K, G, H), jnp.float32))
  # Every row sees at least itself (the diagonal pair is always scheduled), so l > 0.
  (m_QBKGt, l_QBKGt, acc_QBtKGH), _ = jax.lax.scan(step, init, schedule)
  out_QBtKGH = acc_QBtKGH / jnp.moveaxis(l_QBKGt, -1, 2)[..., None]
  out_BTNH = jnp.moveaxis(out_QBtKGH, 0, 1).reshape(B, nb * b, N, H)[:, :T].astype(v_BSKH.dtype)
  return out_BTNH, m_QBKGt + jnp.log(l_QBKGt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, block_size):
  return _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, block_size)[0]


def _blockwise_fwd(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, block_size):
  out_BTNH, lse_QBKGt = _blockwise_forward(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap,
                                           block_size)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_QBKGt)


def _blockwise_bwd(window, softcap, block_size, residuals, dout_BTNH):
  """Flash-attention-2 backward: per block pair, P = exp(capped logits - lse) is recomputed, and
  dC = P * (dP - rowsum(dO * O)) with dP = dO V^T; the soft-cap's derivative 1 - tanh^2(x/cap)
  = 1 - (capped/cap)^2 turns dC into dS before the dQ = dS K and dK = dS^T Q matmuls; dV = P^T dO.
  Memory is the fp32 dQ/dK/dV accumulators plus one step's block pairs: linear in T."""
  q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_QBKGt = residuals
  B, T, N, H = q_BTNH.shape
  q_QBtKGH, k_QBsKH, v_QBsKH, seg_QBt, b, nb = _blockwise_prepare(
    q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block_size)
  K, G = q_QBtKGH.shape[3:5]
  pad = nb * b - T
  do_BTNH, o_BTNH = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (dout_BTNH, out_BTNH))
  do_QBtKGH, o_QBtKGH = (_to_blocks(a.reshape(B, nb * b, K, G, H), nb) for a in (do_BTNH, o_BTNH))
  delta_QBKGt = jnp.einsum("QBtKGH,QBtKGH->QBKGt", do_QBtKGH.astype(jnp.float32),
                           o_QBtKGH.astype(jnp.float32))
  schedule = tuple(jnp.asarray(a) for a in _band_schedule(nb, _n_offsets(nb, b, window)))

  def step(carry, xs):
    dq_QBtKGH, dk_QBsKH, dv_QBsKH = carry
    qi_L, ki_L, valid_L = xs
    q_LBtKGH, k_LBsKH, v_LBsKH, do_LBtKGH = (
      q_QBtKGH[qi_L], k_QBsKH[ki_L], v_QBsKH[ki_L], do_QBtKGH[qi_L])
    logits, visible = _pair_logits(q_LBtKGH, k_LBsKH, seg_QBt[qi_L], seg_QBt[ki_L], qi_L, ki_L,
                                   valid_L, b=b, window=window, softcap=softcap)
    p = jnp.where(visible, jnp.exp(logits - lse_QBKGt[qi_L][..., None]), 0.0)
    dp = jnp.einsum("LBtKGH,LBsKH->LBKGts", do_LBtKGH, v_LBsKH, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_QBKGt[qi_L][..., None])
    if softcap is not None:
      ds = ds * (1.0 - jnp.square(logits / softcap))
    dq_LBtKGH = jnp.einsum("LBKGts,LBsKH->LBtKGH", ds.astype(k_LBsKH.dtype), k_LBsKH,
                           preferred_element_type=jnp.float32)
    dk_LBsKH = jnp.einsum("LBKGts,LBtKGH->LBsKH", ds.astype(q_LBtKGH.dtype), q_LBtKGH,
                          preferred_element_type=jnp.float32)
    dv_LBsKH = jnp.einsum("LBKGts,LBtKGH->LBsKH", p.astype(do_LBtKGH.dtype), do_LBtKGH,
                          preferred_element_type=jnp.float32)
    return (dq_QBtKGH.at[qi_L].add(dq_LBtKGH, unique_indices=True),
            dk_QBsKH.at[ki_L].add(dk_LBsKH, unique_indices=True),
            dv_QBsKH.at[ki_L].add(dv_LBsKH, unique_indices=True)), None

  init = (jnp.zeros(q_QBtKGH.shape, jnp.float32), jnp.zeros(k_QBsKH.shape, jnp.float32),
          jnp.zeros(v_QBsKH.shape, jnp.float32))
  (dq_QBtKGH, dk_QBsKH, dv_QBsKH), _ = jax.lax.scan(step, init, schedule)

  def unblock(x, like):
    return jnp.moveaxis(x, 0, 1).reshape(B, nb * b, *like.shape[2:])[:, :T].astype(like.dtype)

  return unblock(dq_QBtKGH, q_BTNH), unblock(dk_QBsKH, k_BSKH), unblock(dv_QBsKH, v_BSKH), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def attention_blockwise(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None,
                        softcap: float | None, block_size: int):
  """Online-softmax attention over (query block, key block) pairs, flash-style custom VJP.

  Only pairs that hold a visible key are visited (`_band_schedule`): the lower triangle on global
  layers, the ceil((W-1)/b)+1 diagonals inside the window on local ones, so a local layer costs
  O(T*W) compute. The forward keeps the output and the per-row logsumexp; the backward recomputes
  each pair's probabilities, so forward and backward memory are linear in T.
  """
  return _blockwise(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window, softcap, block_size)


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None,
              softcap: float | None, impl: str, block_size: int):
  # Resolved while tracing, against the devices the program is compiled for (see current_platform).
  impl = resolve_attention_impl(impl, current_platform())
  if impl == "xla":
    return attention_xla(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window, softcap=softcap)
  if impl == "splash":
    from gemma2_jax.model.splash import attention_splash  # Pallas TPU imports only when used

    return attention_splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window, softcap=softcap,
                            block_size=block_size)
  if impl == "gpu_flash":
    # Pallas Triton imports only when used; its tiles are its own (block_size is for the XLA paths).
    from gemma2_jax.model.gpu_attention import attention_gpu_flash

    return attention_gpu_flash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window, softcap=softcap)
  if impl != "blockwise":
    raise ValueError(f"attention_impl {impl!r} has no kernel here")
  return attention_blockwise(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window,
                             softcap=softcap, block_size=block_size)


def attention_cached(q_BTNH, k_BKHS, v_BKSH, q_pos_BT, kv_pos_BS, *, window: int | None,
                     softcap: float | None):
  """Attention of T new queries over S cache slots, masked by token positions, not slot indices.

  `kv_pos_BS` is the position of the token each slot holds (-1: empty or padding), so a ring cache
  of `window` slots and left-padded rows both see exactly the keys within `window` real tokens.
  Cache layouts: keys [B, K, H, S], values [B, K, S, H], so both dots contract the cache's major
  axis (H for q.k, S for p.v), the operand layout XLA:CPU's dots read as it lies: the transposed
  ones re-lay-out every layer's cache at every decode step (about 3x slower dots). The same math as
  `_dense`, with q moved to [B, K, G, T, H] first: the einsums written against `_dense`'s q layout
  decode 1.4x slower on XLA:CPU (scripts/bench_sample.py: 1.17x vs 1.61x HF).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BKHS.shape[1]
  valid_BS = kv_pos_BS >= 0
  visible_BTS = _mask(q_pos_BT[:, :, None], kv_pos_BS[:, None, :], True, valid_BS[:, None, :], window)
  q_BKGTH = jnp.moveaxis(q_BTNH.reshape(B, T, K, N // K, H), 1, 3)
  logits_BKGTS = jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, k_BKHS.astype(q_BTNH.dtype),
                            preferred_element_type=jnp.float32)
  logits_BKGTS = soft_cap(logits_BKGTS, softcap)
  logits_BKGTS = jnp.where(visible_BTS[:, None, None], logits_BKGTS, _MASKED)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(q_BTNH.dtype)
  out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH.astype(q_BTNH.dtype))
  return jnp.moveaxis(out_BKGTH, 3, 1).reshape(B, T, N, H)
