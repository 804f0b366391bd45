"""On-policy distillation (GKD, Agarwal et al. 2024): the student answers the batch's prompts itself.

Rows are single conversations (chat sources with `pack=False`): row b is <bos> + the rendered
conversation from position 0, right-padded. Its prompt is everything before the text of its final
model turn (up to and including `<start_of_turn>model\\n`), read off the loss mask: the final run of
weighted targets is that turn.

An on-policy step (probability `lambda` per step, one coin for the whole step, drawn from (seed, step))
replaces the final model turn of every row by the student's own sample, drawn inside the jitted step
with the current params (no gradient flows through sampling: tokens are integers and the sampler
runs on stop_gradient params). The new row is the prompt right-aligned in T + 1 - N slots (N =
max_new_tokens), followed by the N sampled slots:

  [pad ... pad | <bos> prompt ... <start_of_turn>model\\n | s_1 ... s_L  pad ... ]
   segment 0     positions 0, 1, ...                       loss on s_1 .. s_L (stop token included)

Only the sampled tokens carry weight: the prompt is masked, and so is every slot after the student's
stop token (`<end_of_turn>` or `<eos>`); a row that never stops trains on all N. The frozen teacher
and the student then score the new rows in the usual online-distillation objective, so forward KL,
reverse KL, JSD(beta) and soft CE all apply. A row whose prompt does not fit in T + 1 - N tokens
keeps its dataset response in that step (off-policy); `onpolicy_fraction` reports the share of rows
generated. Row b's sampling key is fold_in(key(seed, step), b) over the global batch row index, so a
resumed run draws the same samples, however many processes it runs on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma2_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from gemma2_jax.inference.sampler import SamplingConfig, sample_tokens
from gemma2_jax.model.config import ModelConfig

# Folded into the step's key for the per-step coin (rows use their index, which is < 2**31).
_COIN = 2**31 + 1


def sampling_config(distill, stop_tokens, cache_dtype="bfloat16") -> SamplingConfig:
  """The student's sampling settings of a DistillConfig (the trainer keeps the KV cache in the
  student's compute dtype)."""
  return SamplingConfig(max_new_tokens=distill.onpolicy_max_new_tokens, cache_dtype=cache_dtype,
                        temperature=distill.onpolicy_temperature,
                        top_k=distill.onpolicy_top_k or None,
                        top_p=None if distill.onpolicy_top_p >= 1 else distill.onpolicy_top_p,
                        stop_tokens=tuple(sorted(set(stop_tokens))))


def stop_tokens_for(tokenizer_path) -> tuple[int, ...]:
  """`<eos>` and the tokenizer's `<end_of_turn>` (an error naming the tokenizer without it)."""
  from gemma2_jax.data.tokenizer import Tokenizer

  return (EOS_ID, Tokenizer(tokenizer_path).chat_ids()[1])


def step_keys(seed: int, step):
  """(coin key, row key base) of a train step: functions of (seed, step) only."""
  key = jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.uint32))
  return jax.random.fold_in(key, _COIN), key


def use_policy(lam: float, coin_key):
  """Whether this step samples: a Python bool for lambda 0 or 1, else a traced bool."""
  if lam in (0.0, 1.0):
    return bool(lam)
  return jax.random.uniform(coin_key) < lam


def prompt_lengths(loss_mask_BT):
  """Tokens before the final model turn's text: 1 + the first target index of the final weighted
  run (0 for a row with no weighted target)."""
  m_BT = loss_mask_BT > 0
  T = m_BT.shape[1]
  starts_BT = m_BT & ~jnp.pad(m_BT, ((0, 0), (1, 0)))[:, :T]
  last_B = jnp.max(jnp.where(starts_BT, jnp.arange(T), -1), axis=-1)
  return jnp.where(last_B >= 0, last_B + 1, 0).astype(jnp.int32)


def left_aligned_prompts(tokens_BT, prompt_len_B, width: int):
  """The first prompt_len_B tokens of each row, right-aligned in `width` slots (PAD before), and
  the padding counts. A row whose prompt is empty or longer than `width` gets a lone <bos> (its
  sample is discarded: see `fits`)."""
  fits_B = (prompt_len_B > 0) & (prompt_len_B <= width)
  pad_B = jnp.where(fits_B, width - prompt_len_B, width - 1)
  src_BW = jnp.arange(width)[None, :] - pad_B[:, None]
  gathered_BW = jnp.take_along_axis(tokens_BT, jnp.clip(src_BW, 0, tokens_BT.shape[1] - 1), axis=1)
  prompt_BW = jnp.where(src_BW >= 0, jnp.where(fits_B[:, None], gathered_BW, BOS_ID), PAD_ID)
  return prompt_BW.astype(jnp.int32), pad_B.astype(jnp.int32), fits_B


def sampled_rows(prompt_BW, pad_B, tokens_BN, lengths_B) -> dict:
  """The model batch (tokens, targets, positions, segment_ids, loss_mask; [B, W + N - 1]) of
  left-padded prompts followed by their samples; weight on the sampled tokens up to the stop."""
  W = prompt_BW.shape[1]
  full_BS = jnp.concatenate([prompt_BW, tokens_BN.astype(jnp.int32)], axis=1)
  time_S = jnp.arange(full_BS.shape[1])
  real_BS = (time_S[None] >= pad_B[:, None]) & (time_S[None] < W + lengths_B[:, None])
  positions_BS = jnp.where(real_BS, time_S[None] - pad_B[:, None], 0).astype(jnp.int32)
  # Target t is token t + 1: it counts when t + 1 is one of the L sampled tokens.
  target_time_S = time_S[1:]
  loss_BT = (target_time_S[None] >= W) & (target_time_S[None] < W + lengths_B[:, None])
  return {"tokens": full_BS[:, :-1], "targets": full_BS[:, 1:], "positions": positions_BS[:, :-1],
          "segment_ids": real_BS[:, :-1].astype(jnp.int32),
          "loss_mask": loss_BT.astype(jnp.float32)}


def onpolicy_batch(cfg: ModelConfig, params: dict, batch: dict, keys_B, sampling: SamplingConfig):
  """(the batch with each row's final model turn replaced by the student's sample, generation sums).

  `batch` holds single-conversation rows [B, T] (see the module docstring); the sums are `gen_rows`
  (rows whose response was sampled) and `gen_tokens` (their sampled tokens, stop tokens included).
  """
  T = batch["tokens"].shape[1]
  N = sampling.max_new_tokens
  W = T + 1 - N
  if W < 1:
    raise ValueError(f"onpolicy_max_new_tokens {N} leaves no room for a prompt in rows of {T}")
  prompt_BW, pad_B, fits_B = left_aligned_prompts(batch["tokens"], prompt_lengths(batch["loss_mask"]),
                                                  W)
  params = jax.lax.stop_gradient(params)
  tokens_BN, lengths_B, _ = sample_tokens(cfg, params, prompt_BW, pad_B, keys_B, sampling)
  new = sampled_rows(prompt_BW, pad_B, tokens_BN, lengths_B)
  out = {k: jnp.where(fits_B[:, None], new[k], batch[k]) if k in new else v
         for k, v in batch.items()}
  sums = {"gen_rows": jnp.sum(fits_B.astype(jnp.float32)),
          "gen_tokens": jnp.sum(jnp.where(fits_B, lengths_B, 0).astype(jnp.float32))}
  return out, sums


def reverse_kl_on_samples(student_cfg: ModelConfig, student_params: dict, teacher_cfg: ModelConfig,
                          teacher_params: dict, prompts, sampling: SamplingConfig,
                          seed: int = 0) -> float:
  """Mean per-token KL(P_student || P_teacher) at temperature 1 over the student's own samples of
  `prompts` (token lists, <bos> included), stop tokens included: what on-policy distillation with
  reverse KL minimizes, measured on fresh samples."""
  from gemma2_jax.inference.sampler import left_pad, row_keys

  prompt_BW, pad_B = left_pad(prompts)
  kl, weight = _reverse_kl_sums(student_cfg, teacher_cfg, sampling, student_params, teacher_params,
                                prompt_BW, pad_B, row_keys(seed, np.arange(len(prompts))))
  return float(kl) / max(float(weight), 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _reverse_kl_sums(student_cfg, teacher_cfg, sampling, student_params, teacher_params, prompt_BW,
                     pad_B, keys_B):
  from gemma2_jax.model.losses import distill_sums
  from gemma2_jax.model.transformer import forward_hidden

  tokens_BN, lengths_B, _ = sample_tokens(student_cfg, student_params, prompt_BW, pad_B, keys_B,
                                          sampling)
  rows = sampled_rows(prompt_BW, pad_B, tokens_BN, lengths_B)
  hidden = [forward_hidden(c, p, rows["tokens"], rows["positions"], rows["segment_ids"])
            for c, p in ((student_cfg, student_params), (teacher_cfg, teacher_params))]
  sums = distill_sums(student_cfg, student_params["embedder"]["input_embedding"], hidden[0],
                      teacher_cfg, teacher_params["embedder"]["input_embedding"], hidden[1],
                      rows["targets"], rows["loss_mask"], loss="reverse_kl")
  return sums["kd"], sums["weight"]
