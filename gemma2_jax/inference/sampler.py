"""Sampling from Gemma 2 with a KV cache: prefill the prompts in one call, decode inside jit.

The cache follows Gemma 2's design: global layers keep `S = prompt bucket + max_new_tokens` slots,
local (sliding-window) layers a ring of `min(window, S)` slots, so a long generation's local-layer
memory is bounded by the window. Every slot records the position of the token it holds (-1 for an
empty slot or left padding) and masks are taken on positions (`attention_cached`): padding never
counts toward the window.

Rows are left-padded to a power-of-two bucket, so they all write the same slot at every step and new
prompts in a bucket reuse the compiled programs. Decoding is a `lax.while_loop` (no host round trip
per token) over a donated `DecodeState`; `decode` can be called again to continue (streaming).

Layout: the forward pass is the training one (`transformer.forward_with`); only `attend` differs.
Inside the decode loop every layer's weights and cache are separate buffers (the decoder's unrolled
form) in the layouts XLA:CPU's dots read as they lie, and the cache is updated in place: a step reads
the weights and the cache once and writes one slot per layer, with no copies of either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemma2_jax.data.chat import END_OF_TURN, prompt_ids
from gemma2_jax.data.tokenizer import EOS_ID, PAD_ID
from gemma2_jax.errors import UserError
from gemma2_jax.model.attention import attention_cached
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import (
  DECODE_LAYOUT,
  LOGICAL_AXES,
  forward_with,
  logits_from_hidden,
  row_attention,
  to_layout,
)
from gemma2_jax.parallel.sharding import constrain, constrain_tree, current_platform

MIN_BUCKET = 16

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
# Inside the decode loop each layer's keys and values are their own buffers, [B, K, H, S] and
# [B, K, S, H]: the layouts attention's dots read as they lie (see attention_cached).
LOOP_CACHE_AXES = (("batch", "kv_heads", "head_dim", "length"), ("batch", "kv_heads", "length",
                                                                  "head_dim"))
# From / to the state's [B, S, K, H] (one layer's slice of CACHE_AXES).
_LOOP_PERM = ((0, 2, 3, 1), (0, 2, 1, 3))
ROW_AXES = ("batch", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """How tokens are drawn. Hashable: it is a static argument of the jitted functions.

  temperature 0 is greedy. top_k / top_p (nucleus) filter the temperature-scaled distribution;
  `stop_tokens` end a row (the stop token is kept in its output).
  """

  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  stop_tokens: tuple[int, ...] = (EOS_ID,)
  cache_dtype: str = "bfloat16"

  def __post_init__(self):
    checks = [
      (self.max_new_tokens > 0, f"max_new_tokens must be positive, got {self.max_new_tokens}"),
      (self.temperature >= 0 and math.isfinite(self.temperature),
       f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
      (self.top_k is None or self.top_k > 0, f"top_k must be positive, got {self.top_k}"),
      (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    jnp.dtype(self.cache_dtype)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


class DecodeState(NamedTuple):
  """Everything the decode loop carries; arrays lead with the batch axis B except the caches."""

  step: jax.Array  # [] tokens generated so far (index of the next one)
  logits_BV: jax.Array  # fp32 logits of the next token
  tokens_BN: jax.Array  # [B, max_new_tokens] generated ids; PAD_ID after a row stopped
  logprobs_BN: jax.Array  # log-prob of each generated token under the sampling distribution
  lengths_B: jax.Array  # generated tokens per row, stop token included
  done_B: jax.Array
  pad_B: jax.Array  # left padding of each row: position = time - pad
  keys_B: jax.Array  # per-row PRNG keys
  # ((k, v) of the local layers [P, B, W, K, H], (k, v) of the global layers [P, B, S, K, H])
  caches: tuple
  local_pos_BW: jax.Array  # position held by each ring slot, -1 = none
  global_pos_BS: jax.Array


def bucket_length(n: int) -> int:
  """Prompt lengths are padded to powers of two (at least MIN_BUCKET): few distinct programs."""
  return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
  """Token lists -> ([B, bucket] int32 right-aligned, [B] padding counts)."""
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise ValueError("every prompt needs at least one token (e.g. <bos>)")
  T = length or bucket_length(longest)
  tokens = np.full((len(prompts), T), PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, T - len(p):] = p
  return tokens, np.asarray([T - len(p) for p in prompts], np.int32)


def row_keys(seed: int | jax.Array, rows) -> jax.Array:
  """One key per row from (seed, the row's index): a prompt's sample does not depend on batching."""
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  return jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.asarray(rows, jnp.uint32))


def _real_vocab(cfg: ModelConfig) -> int:
  return cfg.num_real_tokens or cfg.vocab_size


def sample_logits(cfg: ModelConfig, logits_BV, keys_B, sampling: SamplingConfig):
  """One token per row and its log-prob under the distribution it was drawn from.

  That distribution is softmax(logits / temperature) restricted to the top-k / nucleus and
  renormalized (greedy: the model's distribution at temperature 1). Padded vocabulary rows are never
  drawn.
  """
  V = logits_BV.shape[-1]
  logits_BV = jnp.where(jnp.arange(V) < _real_vocab(cfg), logits_BV.astype(jnp.float32), -jnp.inf)
  if sampling.greedy:
    tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  else:
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < V:
      kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
      logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sampling.top_p is not None and sampling.top_p < 1:
      sorted_BV = -jnp.sort(-logits_BV, axis=-1)
      probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
      mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
      # The nucleus: the most likely tokens until their mass reaches top_p (the first always kept).
      threshold_B1 = jnp.min(jnp.where(mass_before_BV < sampling.top_p, sorted_BV, jnp.inf),
                             axis=-1, keepdims=True)
      logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    tokens_B = jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)
  logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  return tokens_B, jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]


def cache_sizes(cfg: ModelConfig, prompt_len: int, sampling: SamplingConfig) -> tuple[int, int]:
  S = prompt_len + sampling.max_new_tokens
  return min(cfg.sliding_window, S), S


def cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype="bfloat16") -> dict:
  """KV-cache bytes for `length` tokens: ring for local layers vs full length everywhere."""
  per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize * batch
  P = cfg.num_layers // 2
  ring = P * (min(cfg.sliding_window, length) + length) * per_slot
  return {"ring": ring, "full_length": 2 * P * length * per_slot}


def prefill(cfg: ModelConfig, params: dict, tokens_BT, pad_B, keys_B,
            sampling: SamplingConfig) -> DecodeState:
  """Runs the left-padded prompts [B, T] in one pass and builds the cache; nothing sampled yet."""
  B, T = tokens_BT.shape
  W, S = cache_sizes(cfg, T, sampling)
  cache_dtype = jnp.dtype(sampling.cache_dtype)
  time_T = jnp.arange(T, dtype=jnp.int32)
  real_BT = time_T[None, :] >= pad_B[:, None]
  positions_BT = jnp.maximum(time_T[None, :] - pad_B[:, None], 0)
  prompt_pos_BT = jnp.where(real_BT, positions_BT, -1)
  # Rows are contiguous after their padding, so index distance == token distance in the prompt.
  attend_rows = row_attention(cfg, real_BT.astype(jnp.int32))

  def to_slots(x_BTd, n_slots):
    """The last n_slots time steps of x, placed at slot time % n_slots; unused slots zero / -1."""
    fill = -1 if x_BTd.dtype == jnp.int32 else 0
    if T >= n_slots:
      return jnp.roll(x_BTd[:, T - n_slots:], T % n_slots, axis=1)
    pad = [(0, 0), (0, n_slots - T)] + [(0, 0)] * (x_BTd.ndim - 2)
    return jnp.pad(x_BTd, pad, constant_values=fill)

  def attend(q_BTNH, k_BSKH, v_BSKH, window, cache):
    del cache
    o_BTNH, _ = attend_rows(q_BTNH, k_BSKH, v_BSKH, window)
    n = W if window is not None else S
    kv = tuple(constrain(to_slots(x.astype(cache_dtype), n), CACHE_AXES[1:]) for x in (k_BSKH,
                                                                                       v_BSKH))
    return o_BTNH, kv

  hidden_BTD, caches = forward_with(cfg, params, tokens_BT, positions_BT, attend)
  logits_BV = logits_from_hidden(cfg, params["embedder"]["input_embedding"], hidden_BTD[:, -1])
  N = sampling.max_new_tokens
  return DecodeState(
    step=jnp.zeros((), jnp.int32), logits_BV=logits_BV,
    tokens_BN=jnp.full((B, N), PAD_ID, jnp.int32), logprobs_BN=jnp.zeros((B, N), jnp.float32),
    lengths_B=jnp.zeros((B,), jnp.int32), done_B=jnp.zeros((B,), bool), pad_B=pad_B,
    keys_B=keys_B, caches=jax.tree.map(lambda c: constrain(c, CACHE_AXES), caches),
    local_pos_BW=to_slots(prompt_pos_BT, W), global_pos_BS=to_slots(prompt_pos_BT, S))


def _loop_cache_dtype(cache_dtype):
  """The dtype the decode loop keeps the caches in.

  XLA:CPU computes a dynamic_update_slice of a bf16 (any sub-fp32 float) array in fp32: the whole
  cache converted there and back, for every layer at every step. On CPU the loop holds the caches in
  fp32 instead: the same (cache-dtype-rounded) values, twice the bytes while decoding; the state
  between calls keeps the cache dtype.
  """
  if current_platform() == "cpu" and jnp.issubdtype(cache_dtype, jnp.floating):
    return jnp.promote_types(cache_dtype, jnp.float32)
  return cache_dtype


def decode(cfg: ModelConfig, params: dict, state: DecodeState, sampling: SamplingConfig,
           until=None) -> DecodeState:
  """Samples tokens until every row stopped, max_new_tokens, or `until` tokens in total."""
  N = sampling.max_new_tokens
  W = state.local_pos_BW.shape[1]
  S = state.global_pos_BS.shape[1]
  prompt_len = S - N
  stop = jnp.asarray(sampling.stop_tokens, jnp.int32)
  until = N if until is None else jnp.minimum(until, N)
  # Once per call, outside the loop: the weights in the compute dtype with their FSDP shards gathered
  # (a step reads every weight; gathering them per token would move the whole model at every step;
  # the copy costs params x dtype bytes / tensor-parallel size per device), the layer weights D-first
  # (transformer.DECODE_LAYOUT), one buffer per layer (the decoder's unrolled form: a step reads each
  # weight once, no slicing copies), and each layer's keys and values as their own buffers in the
  # layouts attention reads (LOOP_CACHE_AXES), updated in place; restacked into the state's at the
  # end. The token embeddings are looked up in the gathered copy too (a lookup in the FSDP-sharded
  # table inside the loop makes XLA rematerialize the gathered table at every step).
  gathered = constrain_tree(jax.tree.map(lambda w: w.astype(cfg.dtype), params), LOGICAL_AXES,
                            unshard=("embed",))
  embedding_VD = gathered["embedder"]["input_embedding"]
  layers = to_layout(gathered["layers"], DECODE_LAYOUT)
  layers = [jax.tree.map(lambda w, i=i: w[i], layers) for i in range(cfg.num_layers)]
  params = {**params, "embedder": {"input_embedding": embedding_VD}, "layers": layers}
  cache_dtype = state.caches[0][0].dtype
  loop_dtype = _loop_cache_dtype(cache_dtype)

  def to_loop(*kv):
    return tuple(constrain(jnp.transpose(c, perm).astype(loop_dtype), axes)
                 for c, perm, axes in zip(kv, _LOOP_PERM, LOOP_CACHE_AXES, strict=True))

  def from_loop(kv):
    return tuple(jnp.transpose(c, np.argsort(perm)).astype(cache_dtype)
                 for c, perm in zip(kv, _LOOP_PERM, strict=True))

  def stack(per_pair):  # [(k, v) per pair] -> (k, v) [P, B, S, K, H]
    return tuple(constrain(jnp.stack(c), CACHE_AXES)
                 for c in zip(*map(from_loop, per_pair), strict=True))

  # In the loop: [((k, v) of the local layer, (k, v) of the global layer) per pair].
  (local_k, local_v), (global_k, global_v) = state.caches
  state = state._replace(caches=[(to_loop(local_k[p], local_v[p]), to_loop(global_k[p], global_v[p]))
                                 for p in range(cfg.num_layers // 2)])

  def cond(s: DecodeState):
    return (s.step < until) & ~jnp.all(s.done_B)

  def body(s: DecodeState) -> DecodeState:
    i = s.step
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.keys_B, i)
    token_B, logprob_B = sample_logits(cfg, s.logits_BV, keys_B, sampling)
    token_B = jnp.where(s.done_B, PAD_ID, token_B)
    logprob_B = jnp.where(s.done_B, 0.0, logprob_B)
    lengths_B = s.lengths_B + (~s.done_B).astype(jnp.int32)
    done_B = s.done_B | jnp.isin(token_B, stop)
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(s.tokens_BN, token_B[:, None], i, axis=1)
    logprobs_BN = jax.lax.dynamic_update_slice_in_dim(s.logprobs_BN, logprob_B[:, None], i, axis=1)

    # Feed the token: it occupies time prompt_len + i (global slot) and ring slot time % W.
    time = prompt_len + i
    pos_B1 = (time - s.pad_B)[:, None]
    local_slot, global_slot = time % W, time
    local_pos_BW = jax.lax.dynamic_update_slice_in_dim(s.local_pos_BW, pos_B1, local_slot, axis=1)
    global_pos_BS = jax.lax.dynamic_update_slice_in_dim(s.global_pos_BS, pos_B1, global_slot,
                                                        axis=1)

    def attend(q_B1NH, k_B1KH, v_B1KH, window, cache):
      slot, kv_pos_BS = (local_slot, local_pos_BW) if window is not None else (global_slot,
                                                                               global_pos_BS)
      # Written first, then read: XLA updates the cache in place (reading the old cache and writing
      # after would make it copy the cache). Rounded to the cache dtype as the stored token is.
      k_BKHS, v_BKSH = (jax.lax.dynamic_update_slice_in_dim(
        c, jnp.transpose(x, perm).astype(cache_dtype).astype(c.dtype), slot, axis=perm.index(1))
        for c, x, perm in zip(cache, (k_B1KH, v_B1KH), _LOOP_PERM, strict=True))
      o = attention_cached(q_B1NH, k_BKHS, v_BKSH, pos_B1, kv_pos_BS, window=window,
                           softcap=cfg.attn_softcap)
      return o, tuple(constrain(c, axes) for c, axes in zip((k_BKHS, v_BKSH), LOOP_CACHE_AXES,
                                                            strict=True))

    hidden_B1D, caches = forward_with(cfg, params, token_B[:, None], pos_B1, attend, s.caches,
                                      layout=DECODE_LAYOUT)
    logits_BV = logits_from_hidden(cfg, embedding_VD, hidden_B1D[:, 0])
    return s._replace(step=i + 1, logits_BV=logits_BV, tokens_BN=tokens_BN,
                      logprobs_BN=logprobs_BN, lengths_B=lengths_B, done_B=done_B, caches=caches,
                      local_pos_BW=local_pos_BW, global_pos_BS=global_pos_BS)

  state = jax.lax.while_loop(cond, body, state)
  local, global_ = zip(*state.caches, strict=True)
  return state._replace(caches=(stack(local), stack(global_)))


def sample_tokens(cfg: ModelConfig, params: dict, tokens_BT, pad_B, keys_B,
                  sampling: SamplingConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Prefill + decode as one pure function (for use inside another jitted step, e.g. on-policy
  distillation): (generated ids [B, N], lengths [B], log-probs [B, N])."""
  state = decode(cfg, params, prefill(cfg, params, tokens_BT, pad_B, keys_B, sampling), sampling)
  return state.tokens_BN, state.lengths_B, state.logprobs_BN


class Sampler:
  """Jitted prefill/decode around one model's params, optionally on a mesh.

  With `mesh`, params must already be laid out by the sharding rules (e.g. loaded with
  `checkpoint.load_sharded`); the batch is split over the batch axes and the cache over batch and
  kv heads, so a model no single device holds can generate. One process: rows are host lists.
  """

  def __init__(self, cfg: ModelConfig, params: dict, *, mesh=None, rules=None):
    from gemma2_jax.parallel.sharding import DEFAULT_RULES, activation_sharding, batch_shards, logical_to_spec

    self.cfg, self.params, self.mesh = cfg, params, mesh
    self.rules = rules or DEFAULT_RULES
    if mesh is None:
      self._ctx = contextlib.nullcontext
      self.row_sharding = None
      self.rows_multiple = 1
    else:
      self._ctx = functools.partial(activation_sharding, mesh, self.rules)
      self.row_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(ROW_AXES, self.rules))
      self.rows_multiple = batch_shards(self.row_sharding)
    self.prefill_fn = jax.jit(_prefill_rows, static_argnums=(0, 6))
    self.decode_fn = jax.jit(decode, static_argnums=(0, 3), donate_argnums=2)

  def _rows(self, x: np.ndarray):
    if self.row_sharding is None:
      return jnp.asarray(x)
    from gemma2_jax.parallel.sharding import host_to_global

    spec = jax.sharding.PartitionSpec(*self.row_sharding.spec[:1], *[None] * (x.ndim - 1))
    return host_to_global(x, jax.sharding.NamedSharding(self.mesh, spec))

  def start(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int = 0,
            row_ids: Sequence[int] | None = None, min_rows: int = 1) -> DecodeState:
    """Prefills the prompts (token lists, <bos> included).

    Rows are padded with copies of the first prompt to at least `min_rows` (a last, smaller batch
    reuses the full batch's program) and to a multiple of the mesh's batch shards. `row_ids` seed each
    row's key (default: 0..B-1), so a prompt's sample does not depend on the batch it was in.
    """
    n = len(prompts)
    rows = max(n, min_rows)
    prompts = list(prompts) + [prompts[0]] * (rows - n + -rows % self.rows_multiple)
    rows = list(row_ids) if row_ids is not None else list(range(n))
    rows += [rows[0]] * (len(prompts) - n)
    tokens_BT, pad_B = left_pad(prompts)
    with self._ctx():
      return self.prefill_fn(self.cfg, self.params, self._rows(tokens_BT), self._rows(pad_B),
                           np.uint32(seed), self._rows(np.asarray(rows, np.uint32)), sampling)

  def continue_(self, state: DecodeState, sampling: SamplingConfig, until: int | None = None):
    """Decodes on (the state is donated): to max_new_tokens, or `until` tokens in total."""
    with self._ctx():
      return self.decode_fn(self.cfg, self.params, state, sampling,
                          jnp.asarray(sampling.max_new_tokens if until is None else until))

  def __call__(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int = 0,
               row_ids: Sequence[int] | None = None, min_rows: int = 1) -> list[SampleResult]:
    state = self.start(prompts, sampling, seed=seed, row_ids=row_ids, min_rows=min_rows)
    state = self.continue_(state, sampling)
    return results(state, len(prompts))


def _prefill_rows(cfg, params, tokens_BT, pad_B, seed, row_ids_B, sampling):
  return prefill(cfg, params, tokens_BT, pad_B, row_keys(jax.random.key(seed), row_ids_B), sampling)


class SampleResult(NamedTuple):
  tokens: list[int]  # generated ids, the stop token included when one was hit
  logprobs: list[float]  # per generated token, under the sampling distribution


def results(state: DecodeState, n: int) -> list[SampleResult]:
  tokens_BN, lengths_B, logprobs_BN = jax.device_get((state.tokens_BN, state.lengths_B,
                                                       state.logprobs_BN))
  return [SampleResult(tokens_BN[i, :lengths_B[i]].tolist(), logprobs_BN[i, :lengths_B[i]].tolist())
          for i in range(n)]


class PromptError(UserError):
  """A prompt or tokenizer that cannot be sampled from as asked."""


def stop_ids(tokenizer, chat: bool, extra=()) -> tuple[int, ...]:
  """<eos>, plus <end_of_turn> when the tokenizer has it, plus user-given ids."""
  ids = [tokenizer.sp.eos_id()]
  eot = tokenizer.sp.PieceToId(END_OF_TURN)
  if eot != tokenizer.sp.unk_id():
    ids.append(eot)
  elif chat:
    raise PromptError(f"tokenizer {tokenizer.path} has no {END_OF_TURN} piece; --chat needs a "
                      "tokenizer with Gemma's chat tokens")
  return tuple(dict.fromkeys([*ids, *extra]))


def encode_prompt(tokenizer, prompt, chat: bool) -> list[int]:
  """<bos> + pieces of the prompt; chat: `data.chat.prompt_ids` (the template at the id level, the
  ids the trainer sees for the same turns; a DataError for a tokenizer without the turn markers)."""
  if chat:
    return prompt_ids(prompt, tokenizer)
  return [tokenizer.sp.bos_id(), *tokenizer.encode(prompt)]


def generate(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, chat: bool = False, stop_tokens: Sequence[int] = (),
             cache_dtype: str = "bfloat16", mesh=None) -> list[str]:
  """Completions of text prompts (chat: strings or message lists, rendered with Gemma's template).

  `model` is a `Transformer` (e.g. from `gemma2_jax.load_model`), `tokenizer` a
  `gemma2_jax.data.tokenizer.Tokenizer` or a path to a SentencePiece model. Greedy by default.
  """
  from gemma2_jax.data.tokenizer import Tokenizer

  if not isinstance(tokenizer, Tokenizer):
    tokenizer = Tokenizer(tokenizer)
  stops = stop_ids(tokenizer, chat, stop_tokens)
  sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, stop_tokens=stops, cache_dtype=cache_dtype)
  sampler = Sampler(model.config, model.params(), mesh=mesh)
  outs = sampler([encode_prompt(tokenizer, p, chat) for p in prompts], sampling, seed=seed)
  return [completion_text(tokenizer, o.tokens, stops) for o in outs]


def completion_text(tokenizer, ids: Sequence[int], stops: Sequence[int]) -> str:
  """The text of generated ids, without the stop token that ended them."""
  return tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids)
