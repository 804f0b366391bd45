"""Token losses computed from final hidden states in sequence chunks: cross-entropy and distillation.

A full fp32 [B, T, V] logits tensor never exists, for the student or the teacher: `chunked_sum` scans
over T in chunks, builds each chunk's logits from the hidden states (tied embedding + final soft-cap),
reduces them to a few scalars, and is rematerialized in the backward pass, so peak loss memory is
O(B x chunk x V), independent of T.

Every token loss is the one per-chunk function `_token_sums`: a divergence between a teacher
distribution and the student's, plus hard-label metrics. The teacher comes in two forms:
  dense   full-vocabulary logits of a teacher model (`distill_sums`);
  sparse  k kept token ids with their log-probs, plus one tail bucket holding the remaining mass
          (`topk_distill_sums`, offline teachers). Cross-entropy (`cross_entropy_sums`) is soft
          cross-entropy against the sparse one-hot teacher (k = 1, log-prob 0, no tail).

Divergences D(P_T || P_S), P_T the teacher's distribution and P_S the student's, per token:
  soft_ce     -sum_x P_T(x) log P_S(x)                 (Gemma 2's distillation objective)
  forward_kl  sum_x P_T(x) log(P_T(x) / P_S(x))        (soft_ce minus the teacher's entropy)
  reverse_kl  sum_x P_S(x) log(P_S(x) / P_T(x))
  jsd         beta KL(P_T || M) + (1 - beta) KL(P_S || M),  M = beta P_T + (1 - beta) P_S
              (generalized JSD of GKD, Agarwal et al. 2024, eq. 3). Its value tends to 0 at both ends;
              JSD/beta -> forward KL as beta -> 0 and JSD/(1-beta) -> reverse KL as beta -> 1, so, as in
              TRL's GKD trainer, beta = 0 and beta = 1 exactly mean forward and reverse KL. Interior
              betas use the paper's unnormalized value (finite, never NaN, however close to 0 or 1).

Numerics: every log-probability is finite (padded vocabulary rows have logit PADDED_LOGIT = -1e9, an
empty tail bucket gets log-prob PADDED_LOGIT), so `p * log p`-style terms with p = exp(-1e9) = 0 are
exactly 0 and their gradients too; no 0 * inf appears anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import PADDED_LOGIT, logits_from_hidden
from gemma2_jax.parallel.sharding import constrain

DistillLoss = Literal["soft_ce", "forward_kl", "reverse_kl", "jsd"]


DISTILL_LOSSES = ("soft_ce", "forward_kl", "reverse_kl", "jsd")


def chunked_sum(fn: Callable[..., dict], chunk_size: int, *arrays_BT):
  """sum over chunks c of fn(*[a[:, c] for a in arrays_BT]) -> dict of scalars.

  Every array has leading axes [B, T]; T is padded up to a multiple of chunk_size with zeros, so `fn`
  must give zero (and stay finite) for rows whose weight is zero.
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


def divergence(loss: str, logq_BN, logp_BN, beta: float = 0.5):
  """Per-row D(P_T || P_S) over the last axis, from student log-probs `logq` and teacher `logp`."""
  if loss == "jsd" and beta == 0.0:
    loss = "forward_kl"
  elif loss == "jsd" and beta == 1.0:
    loss = "reverse_kl"
  p_BN = jnp.exp(logp_BN)
  if loss == "soft_ce":
    return -jnp.sum(p_BN * logq_BN, axis=-1)
  if loss == "forward_kl":
    return jnp.sum(p_BN * (logp_BN - logq_BN), axis=-1)
  q_BN = jnp.exp(logq_BN)
  if loss == "reverse_kl":
    return jnp.sum(q_BN * (logq_BN - logp_BN), axis=-1)
  if loss == "jsd":
    # log M by logaddexp: exact for beta near 0 or 1, where log(beta P_T + (1-beta) P_S) would round.
    logm_BN = jnp.logaddexp(math.log(beta) + logp_BN, math.log1p(-beta) + logq_BN)
    return (beta * jnp.sum(p_BN * (logp_BN - logm_BN), axis=-1)
            + (1.0 - beta) * jnp.sum(q_BN * (logq_BN - logm_BN), axis=-1))
  raise ValueError(f"unknown distillation loss {loss!r}; choose one of {DISTILL_LOSSES}")


class _Teacher(NamedTuple):
  """A teacher distribution, seen through the buckets the student is compared on.

  buckets(student_logits_BcV, temperature) -> (student logq_BcN, teacher logp_BcN), both normalized
  over the same N buckets at that temperature. top1_Bc: the teacher's argmax token. target_logprob:
  targets_Bc -> the teacher's log-prob (temperature 1) of each target.
  """
  buckets: Callable
  top1_Bc: jax.Array
  target_logprob: Callable


def _log_softmax(logits_BcV, temperature):
  if isinstance(temperature, (int, float)) and temperature == 1:
    return jax.nn.log_softmax(logits_BcV, axis=-1)
  return jax.nn.log_softmax(logits_BcV / temperature, axis=-1)


def _dense_teacher(teacher_logits_BcV) -> _Teacher:
  """Buckets = the whole vocabulary; the teacher's logits carry no gradient."""
  teacher_logits_BcV = jax.lax.stop_gradient(teacher_logits_BcV)

  def buckets(logits_BcV, temperature):
    return _log_softmax(logits_BcV, temperature), _log_softmax(teacher_logits_BcV, temperature)

  def target_logprob(targets_Bc):
    logp_BcV = jax.nn.log_softmax(teacher_logits_BcV, axis=-1)
    return jnp.take_along_axis(logp_BcV, targets_Bc[..., None], axis=-1)[..., 0]

  return _Teacher(buckets, jnp.argmax(teacher_logits_BcV, axis=-1), target_logprob)


def _sparse_teacher(cfg: ModelConfig, ids_Bck, logp_Bck, *, tail: bool) -> _Teacher:
  """Buckets = the k kept ids (+ one tail bucket: every other real token) of a teacher known only there.

  `logp_Bck` are the teacher's temperature-1 log-probs of distinct ids `ids_Bck`; the teacher's tail
  mass is 1 - sum exp(logp), the student's is its mass on real tokens outside `ids`. Without `tail` the
  kept ids must carry all of the teacher's mass (the one-hot teacher of cross-entropy), which only
  soft_ce / forward_kl may use: they never look at student mass outside the teacher's support.

  At temperature T the kept teacher log-probs and the tail's log-mass are divided by T and renormalized
  over the k + 1 buckets: exact among the kept tokens, an approximation for the tail (the teacher's
  tempered tail would need its full distribution), exact whenever the tail is empty.
  """
  ids_Bck = ids_Bck.astype(jnp.int32)
  # Stored log-probs may hold -inf; clamp to the padded-row logit so every log stays finite.
  logp_Bck = jnp.maximum(jax.lax.stop_gradient(logp_Bck), PADDED_LOGIT)
  V = cfg.vocab_size
  n_real = V if cfg.num_real_tokens is None else cfg.num_real_tokens
  rows_Bc1 = jnp.arange(ids_Bck.shape[0])[:, None]
  if tail:
    kept_BcV = jnp.zeros((ids_Bck.shape[0], V), bool).at[rows_Bc1, ids_Bck].set(True)
    tail_BcV = ~kept_BcV & (jnp.arange(V) < n_real)
    has_tail_Bc = jnp.any(tail_BcV, axis=-1)  # False when the ids cover every real token
    mass_Bc = 1.0 - jnp.sum(jnp.exp(logp_Bck), axis=-1)
    p_tail_Bc = jnp.where(has_tail_Bc, jnp.clip(mass_Bc, 0.0, 1.0), 0.0)
    logp_tail_Bc = jnp.where(p_tail_Bc > 0, jnp.log(jnp.where(p_tail_Bc > 0, p_tail_Bc, 1.0)),
                             PADDED_LOGIT)

  def buckets(logits_BcV, temperature):
    logq_BcV = _log_softmax(logits_BcV, temperature)
    logq_Bck = jnp.take_along_axis(logq_BcV, ids_Bck, axis=-1)
    teacher_Bck = logp_Bck if isinstance(temperature, (int, float)) and temperature == 1 else (
      logp_Bck / temperature)
    if not tail:
      return logq_Bck, jax.nn.log_softmax(teacher_Bck, axis=-1)
    # The student's tail log-mass from its logits (no 1 - sum cancellation). Rows without a tail get a
    # finite dummy before logsumexp (an all -inf row would give a NaN gradient) and PADDED_LOGIT after.
    u_BcV = logits_BcV / temperature
    masked_BcV = jnp.where(tail_BcV, u_BcV, -jnp.inf)
    masked_BcV = jnp.where(has_tail_Bc[:, None], masked_BcV, 0.0)
    lse_tail_Bc = jax.nn.logsumexp(masked_BcV, axis=-1) - jax.nn.logsumexp(u_BcV, axis=-1)
    logq_tail_Bc = jnp.where(has_tail_Bc, lse_tail_Bc, PADDED_LOGIT)
    teacher_tail_Bc = jnp.where(p_tail_Bc > 0, logp_tail_Bc / temperature, PADDED_LOGIT)
    logq_BcN = jnp.concatenate([logq_Bck, logq_tail_Bc[:, None]], axis=-1)
    logp_BcN = jax.nn.log_softmax(jnp.concatenate([teacher_Bck, teacher_tail_Bc[:, None]], axis=-1),
                                  axis=-1)
    return logq_BcN, logp_BcN

  def target_logprob(targets_Bc):
    # A target outside the kept ids is charged the whole tail bucket (a lower bound on its NLL).
    match_Bck = ids_Bck == targets_Bc[:, None]
    kept_Bc = jnp.sum(jnp.where(match_Bck, logp_Bck, 0.0), axis=-1)
    return jnp.where(jnp.any(match_Bck, axis=-1), kept_Bc, logp_tail_Bc if tail else PADDED_LOGIT)

  top1_Bc = jnp.take_along_axis(ids_Bck, jnp.argmax(logp_Bck, axis=-1)[:, None], axis=-1)[:, 0]
  return _Teacher(buckets, top1_Bc, target_logprob)


def _token_sums(cfg: ModelConfig, embedding_VD, hidden_BcD, targets_Bc, weights_Bc,
                teacher: _Teacher, *, loss: str, beta: float, temperature, alpha, z_loss: float,
                metrics: bool, anchor: _Teacher | None = None) -> dict:
  """The one per-chunk loss: weighted sums of the distillation and hard-label terms of one chunk.

  loss = alpha * kd + (1 - alpha) * nll, kd = temperature^2 * D(P_T^(temp) || P_S^(temp)) (Hinton's
  T^2 keeps the gradient scale of the soft term independent of the temperature). With `metrics`: KL at
  temperature 1 (`kl`), the teacher's NLL of the targets, top-1 agreement of the argmaxes. With an
  `anchor`: `anchor_kl`, KL(P_S || P_anchor) at temperature 1 (not part of `loss`).
  """
  logits_BcV = logits_from_hidden(cfg, embedding_VD, hidden_BcD)
  w_Bc = weights_Bc.astype(logits_BcV.dtype)
  lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
  nll_Bc = lse_Bc - jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
  top1_Bc = jnp.argmax(logits_BcV, axis=-1)
  kd_Bc = divergence(loss, *teacher.buckets(logits_BcV, temperature), beta)
  if not (isinstance(temperature, (int, float)) and temperature == 1):
    kd_Bc = jnp.square(temperature) * kd_Bc

  def wsum(x_Bc):
    return jnp.sum(w_Bc * x_Bc.astype(w_Bc.dtype))

  out = {"loss": wsum(alpha * kd_Bc + (1.0 - alpha) * nll_Bc), "kd": wsum(kd_Bc),
         "nll": wsum(nll_Bc), "correct": wsum(top1_Bc == targets_Bc), "weight": jnp.sum(w_Bc)}
  if metrics:
    out["kl"] = wsum(divergence("forward_kl", *teacher.buckets(logits_BcV, 1.0)))
    out["teacher_nll"] = wsum(-teacher.target_logprob(targets_Bc))
    out["agree"] = wsum(top1_Bc == teacher.top1_Bc)
  if z_loss:
    out["z_loss"] = z_loss * wsum(jnp.square(lse_Bc))
  if anchor is not None:
    out["anchor_kl"] = wsum(divergence("reverse_kl", *anchor.buckets(logits_BcV, 1.0)))
  return out


def _check_kd_args(loss, beta, temperature, alpha):
  if loss not in DISTILL_LOSSES:
    raise ValueError(f"unknown distillation loss {loss!r}; choose one of {DISTILL_LOSSES}")
  if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be a Python float in [0, 1] (it picks the code path), got {beta!r}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def cross_entropy_sums(cfg: ModelConfig, embedding_VD, hidden_BTD, targets_BT, weights_BT, *,
                       chunk_size: int = 1024, z_loss: float = 0.0) -> dict:
  """Weighted sums over tokens: `nll`, `z_loss` (weight * logsumexp^2), `correct`, `weight`.

  Cross-entropy is soft cross-entropy against the one-hot teacher of the targets (k = 1, no tail).
  """
  embedding_VD = _vocab_parallel(embedding_VD)

  def fn(hidden_BcD, targets_Bc, weights_Bc):
    onehot = _sparse_teacher(cfg, targets_Bc[:, None], jnp.zeros(targets_Bc.shape + (1,)), tail=False)
    out = _token_sums(cfg, embedding_VD, hidden_BcD, targets_Bc, weights_Bc, onehot, loss="soft_ce",
                      beta=0.5, temperature=1, alpha=1, z_loss=z_loss, metrics=False)
    keep = {"nll": out["kd"], "correct": out["correct"], "weight": out["weight"]}
    if z_loss:
      keep["z_loss"] = out["z_loss"]
    return keep

  return _chunk_over_batch(fn, chunk_size, hidden_BTD, targets_BT, weights_BT)


def distill_sums(student_cfg: ModelConfig, student_embedding_VD, student_hidden_BTD,
                 teacher_cfg: ModelConfig, teacher_embedding_VD, teacher_hidden_BTD, targets_BT,
                 weights_BT, *, loss: DistillLoss = "soft_ce", beta: float = 0.5, temperature=1.0,
                 alpha=1.0, chunk_size: int = 1024, z_loss: float = 0.0,
                 anchor_embedding_VD=None, anchor_hidden_BTD=None) -> dict:
  """Distillation from a teacher model's final hidden states, both logits built per chunk.

  Returns weighted sums: `loss` (alpha * kd + (1 - alpha) * nll: differentiate this), `kd`
  (temperature^2 * D at the temperature), `nll` (student CE of the targets), `correct`, `teacher_nll`,
  `kl` (forward KL at temperature 1), `agree` (student argmax == teacher argmax), `weight`, and
  `z_loss` when asked. `temperature` and `alpha` may be traced (schedules); `loss`, `beta` are static.
  The teacher gets no gradient. With the anchor's embedding and hidden states (a model of the student's
  config: its EMA, WARP's KL anchor), also `anchor_kl` = KL(P_S || P_anchor) at temperature 1, its
  logits built per chunk like the teacher's; the anchor gets no gradient.
  """
  _check_kd_args(loss, beta, temperature, alpha)
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise ValueError(f"teacher vocab_size {teacher_cfg.vocab_size} != student vocab_size "
                     f"{student_cfg.vocab_size}")
  if teacher_hidden_BTD.shape[:2] != student_hidden_BTD.shape[:2]:
    raise ValueError(f"teacher hidden states {teacher_hidden_BTD.shape} and student hidden states "
                     f"{student_hidden_BTD.shape} differ in [B, T]")

  student_embedding_VD = _vocab_parallel(student_embedding_VD)
  teacher_embedding_VD = _vocab_parallel(teacher_embedding_VD)

  anchored = anchor_hidden_BTD is not None
  if anchored:
    anchor_embedding_VD = _vocab_parallel(anchor_embedding_VD)

  def fn(hidden_BcD, targets_Bc, weights_Bc, teacher_hidden_BcD, *anchor_hidden_BcD):
    teacher = _dense_teacher(logits_from_hidden(teacher_cfg, teacher_embedding_VD, teacher_hidden_BcD))
    anchor = (_dense_teacher(logits_from_hidden(student_cfg, anchor_embedding_VD, anchor_hidden_BcD[0]))
              if anchored else None)
    return _token_sums(student_cfg, student_embedding_VD, hidden_BcD, targets_Bc, weights_Bc, teacher,
                       loss=loss, beta=beta, temperature=temperature, alpha=alpha, z_loss=z_loss,
                       metrics=True, anchor=anchor)

  return _chunk_over_batch(fn, chunk_size, student_hidden_BTD, targets_BT, weights_BT,
                           teacher_hidden_BTD, *((anchor_hidden_BTD,) if anchored else ()))


def topk_distill_sums(student_cfg: ModelConfig, student_embedding_VD, student_hidden_BTD,
                      topk_logprobs_BTk, topk_ids_BTk, targets_BT, weights_BT, *,
                      loss: DistillLoss = "forward_kl", beta: float = 0.5, temperature=1.0, alpha=1.0,
                      chunk_size: int = 1024, z_loss: float = 0.0) -> dict:
  """Distillation from a stored teacher: its temperature-1 log-probs of k distinct kept ids per token.

  The divergence is taken over k + 1 buckets (the kept ids and one tail bucket with the remaining mass),
  a proper divergence: >= 0, and 0 iff the student's bucket masses equal the teacher's. With k = V (or
  every real token kept) the tail is empty and it is the full-vocabulary divergence. Same outputs as
  `distill_sums`; `kl` and `agree` are over the buckets, `teacher_nll` charges a target outside the
  kept ids the whole tail (a lower bound).
  """
  _check_kd_args(loss, beta, temperature, alpha)
  if topk_ids_BTk.shape != topk_logprobs_BTk.shape or topk_ids_BTk.shape[:2] != targets_BT.shape:
    raise ValueError(f"topk_ids {topk_ids_BTk.shape} and topk_logprobs {topk_logprobs_BTk.shape} must "
                     f"both be [B, T, k] with [B, T] = {targets_BT.shape}")

  student_embedding_VD = _vocab_parallel(student_embedding_VD)

  def fn(hidden_BcD, targets_Bc, weights_Bc, logp_Bck, ids_Bck):
    teacher = _sparse_teacher(student_cfg, ids_Bck, logp_Bck, tail=True)
    return _token_sums(student_cfg, student_embedding_VD, hidden_BcD, targets_Bc, weights_Bc, teacher,
                       loss=loss, beta=beta, temperature=temperature, alpha=alpha, z_loss=z_loss,
                       metrics=True)

  return _chunk_over_batch(fn, chunk_size, student_hidden_BTD, targets_BT, weights_BT,
                           topk_logprobs_BTk, topk_ids_BTk)


def _vocab_parallel(embedding_VD):
  return constrain(embedding_VD, ("loss_vocab", None))


def _chunk_over_batch(fn, chunk_size, hidden_BTD, targets_BT, weights_BT, *teacher_arrays_BT):
  """`chunked_sum` with the batch folded into the rows of each chunk: fn sees [B * c, ...] arrays.

  Under a mesh, each chunk's rows are gathered over the FSDP axes (`loss_batch` rule) while the
  embeddings are split by vocabulary (`loss_vocab`): chunk logits, their gradient and the embedding
  gradient accumulator are then vocab-parallel, and no device holds a whole [V, D] table.
  """
  def flat_fn(*arrays_Bc):
    return fn(*(constrain(a, ("loss_batch",) + (None,) * (a.ndim - 1)).reshape(-1, *a.shape[2:])
                for a in arrays_Bc))

  return chunked_sum(flat_fn, chunk_size, hidden_BTD, targets_BT.astype(jnp.int32), weights_BT,
                     *teacher_arrays_BT)
