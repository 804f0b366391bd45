"""The Gemma 2 decoder as a Flax NNX module with stacked, scanned layers.

Parameters are stored with the Kaggle/Flax names and per-layer shapes, stacked along a leading L axis:

  embedder/input_embedding            [V, D]
  layers/attn/q_einsum                [L, N, D, H]
  layers/attn/kv_einsum               [L, 2, K, D, H]   index 0 = k
  layers/attn/attn_vec_einsum         [L, N, H, D]
  layers/mlp/gating_einsum            [L, 2, F, D]      index 0 = gelu branch
  layers/mlp/linear                   [L, F, D]
  layers/{pre,post}_{attention,ffw}_norm/scale  [L, D]
  final_norm/scale                    [D]

Layer 2p is local (sliding window), layer 2p+1 global; the forward pass scans over the P = L/2 pairs,
so compile time does not grow with depth.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gemma2_jax.model.attention import attention
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.layers import (
  adapter_delta,
  apply_rope,
  feed_forward,
  plus,
  positions_from_segments,
  project,
  rms_norm,
  soft_cap,
)
from gemma2_jax.model.quant import is_quantized
from gemma2_jax.parallel.sharding import constrain

PADDED_LOGIT = -1e9  # logit of embedding rows past num_real_tokens: zero probability, finite.

ACTIVATION_AXES = ("batch", "length", "embed_act")
_NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")

# Logical axis names of every parameter, in the order of its shape; sharding rules map these to mesh
# axes (see gemma2_jax/sharding.py once it exists).
LOGICAL_AXES = {
  "embedder": {"input_embedding": ("vocab", "embed")},
  "final_norm": {"scale": ("norm",)},
  "layers": {
    "attn": {
      "q_einsum": ("layers", "q_heads", "embed", "head_dim"),
      "kv_einsum": ("layers", None, "kv_heads", "embed", "head_dim"),
      "attn_vec_einsum": ("layers", "q_heads", "head_dim", "embed"),
    },
    "mlp": {
      "gating_einsum": ("layers", None, "mlp", "embed"),
      "linear": ("layers", "mlp", "embed"),
    },
    **{name: {"scale": ("layers", "norm")} for name in _NORMS},
  },
}


def param_shapes(cfg: ModelConfig) -> dict:
  """The parameter tree as shapes (tuples), in the layout documented above."""
  V, D, L = cfg.vocab_size, cfg.d_model, cfg.num_layers
  N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
  return {
    "embedder": {"input_embedding": (V, D)},
    "final_norm": {"scale": (D,)},
    "layers": {
      "attn": {"q_einsum": (L, N, D, H), "kv_einsum": (L, 2, K, D, H),
               "attn_vec_einsum": (L, N, H, D)},
      "mlp": {"gating_einsum": (L, 2, F, D), "linear": (L, F, D)},
      **{name: {"scale": (L, D)} for name in _NORMS},
    },
  }


def _normal(rngs: nnx.Rngs, shape, fan_in: int, dtype):
  return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * (fan_in**-0.5))


def _zeros(shape, dtype):
  return nnx.Param(jnp.zeros(shape, dtype))


class Embedder(nnx.Module):
  def __init__(self, shapes: dict, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
    self.input_embedding = _normal(rngs, shapes["input_embedding"], cfg.d_model, dtype)


class RMSNorm(nnx.Module):
  def __init__(self, shapes: dict, dtype):
    self.scale = _zeros(shapes["scale"], dtype)


class Attention(nnx.Module):
  def __init__(self, shapes: dict, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
    D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.q_einsum = _normal(rngs, shapes["q_einsum"], D, dtype)
    self.kv_einsum = _normal(rngs, shapes["kv_einsum"], D, dtype)
    self.attn_vec_einsum = _normal(rngs, shapes["attn_vec_einsum"], N * H, dtype)


class FeedForward(nnx.Module):
  def __init__(self, shapes: dict, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
    self.gating_einsum = _normal(rngs, shapes["gating_einsum"], cfg.d_model, dtype)
    self.linear = _normal(rngs, shapes["linear"], cfg.ffn_dim, dtype)


class Layers(nnx.Module):
  """All decoder layers' parameters, stacked along a leading L axis."""

  def __init__(self, shapes: dict, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
    self.attn = Attention(shapes["attn"], cfg, rngs=rngs, dtype=dtype)
    self.mlp = FeedForward(shapes["mlp"], cfg, rngs=rngs, dtype=dtype)
    for name in _NORMS:
      setattr(self, name, RMSNorm(shapes[name], dtype))


# Axis order of the projection weights that contract d_model. Training uses the checkpoints' order;
# decoding one token at a time uses D-first weights (MaxText's layout), transposed once per call:
# XLA would otherwise re-lay-out every layer's weights at every step (6x slower steps on CPU).
CHECKPOINT_LAYOUT = {"q": "NDH", "kv": "CKDH", "gating": "CFD"}
DECODE_LAYOUT = {"q": "DNH", "kv": "DCKH", "gating": "DCF"}


def to_layout(layers: dict, layout: dict) -> dict:
  """Stacked layer params (checkpoint order, leading L) -> the same weights in `layout`'s order."""
  def move(w, name):
    src, dst = "L" + CHECKPOINT_LAYOUT[name], "L" + layout[name]
    return jnp.einsum(f"{src}->{dst}", w) if src != dst else w

  attn, mlp = layers["attn"], layers["mlp"]
  return {**layers,
          "attn": {**attn, "q_einsum": move(attn["q_einsum"], "q"),
                   "kv_einsum": move(attn["kv_einsum"], "kv")},
          "mlp": {**mlp, "gating_einsum": move(mlp["gating_einsum"], "gating")}}


def _block(cfg: ModelConfig, p: dict, x_BTD, positions_BT, attend, *, window: int | None,
           layout: dict = CHECKPOINT_LAYOUT):
  """One decoder layer; p holds that layer's (unstacked) parameters in the compute dtype (a LoRA
  forward: projections may be Quantized, and p["lora"] holds the layer's adapters: model/lora.py).

  `attend(q_BTNH, k_BSKH, v_BSKH, window) -> (o_BTNH, aux)` is the only part that differs between
  training (attention within the rows) and cached decoding (attention over a KV cache, aux = the
  updated cache); q arrives rotated and pre-scaled, k rotated.
  """
  h_BTD = rms_norm(x_BTD, p["pre_attention_norm"]["scale"], cfg.rms_eps)
  a, lora = p["attn"], p.get("lora")  # lora: this layer's adapters (model/lora.py), if any
  q_BTNH = plus(project(f"BTD,{layout['q']}->BTNH", h_BTD, a["q_einsum"]),
                adapter_delta(lora, "q", h_BTD))
  kv_BSCKH = project(f"BSD,{layout['kv']}->BSCKH", h_BTD, a["kv_einsum"])
  k_BSKH = plus(kv_BSCKH[:, :, 0], adapter_delta(lora, "k", h_BTD))
  v_BSKH = plus(kv_BSCKH[:, :, 1], adapter_delta(lora, "v", h_BTD))
  q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_base) * jnp.asarray(cfg.query_scale,
                                                                          q_BTNH.dtype)
  k_BSKH = apply_rope(k_BSKH, positions_BT, cfg.rope_base)
  o_BTNH, aux = attend(q_BTNH, k_BSKH, v_BSKH, window)
  # One contracting axis (N*H): XLA:CPU would otherwise transpose the weight at every call.
  B, T, N, H = o_BTNH.shape
  o_BTD = plus(project("BTX,XD->BTD", o_BTNH.reshape(B, T, N * H), a["attn_vec_einsum"], (N * H, -1)),
               adapter_delta(lora, "o", o_BTNH))
  x_BTD = x_BTD + rms_norm(o_BTD, p["post_attention_norm"]["scale"], cfg.rms_eps)
  h_BTD = rms_norm(x_BTD, p["pre_ffw_norm"]["scale"], cfg.rms_eps)
  f_BTD = feed_forward(h_BTD, p["mlp"]["gating_einsum"], p["mlp"]["linear"], layout["gating"], lora)
  return x_BTD + rms_norm(f_BTD, p["post_ffw_norm"]["scale"], cfg.rms_eps), aux


def row_attention(cfg: ModelConfig, segment_ids_BT):
  """The training `attend`: causal attention within each row's segments (no cache)."""
  def attend(q_BTNH, k_BSKH, v_BSKH, window, cache=None):
    del cache
    return attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, window=window,
                     softcap=cfg.attn_softcap, impl=cfg.attention_impl,
                     block_size=cfg.attention_block_size), None
  return attend


def to_compute_dtype(tree, dtype):
  """Float weights in the compute dtype; Quantized weights (dequantized per use, see layers.project)
  and integer leaves (dropout keys) as they are."""
  def cast(w):
    if is_quantized(w) or not jnp.issubdtype(w.dtype, jnp.floating):
      return w
    return w.astype(dtype)
  return jax.tree.map(cast, tree, is_leaf=is_quantized)


_REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # "full", with each layer pair's input (the residual stream the backward recomputes the pair from:
  # [B, T, D] per pair, fp32) kept in host memory until the backward needs it, not in HBM.
  "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=["pair_input"],
    offload_src="device", offload_dst="pinned_host"),
}


def decoder(cfg: ModelConfig, layers, x_BTD, positions_BT, attend, caches=None, *,
            layout: dict = CHECKPOINT_LAYOUT):
  """Runs the local+global layer pairs; returns (x_BTD, updated caches).

  `layers` is the stacked tree (leaves lead with L; scanned over pairs, so compile time does not grow
  with depth) or, for decoding, a list of L per-layer trees (unrolled). A decode step reads every
  weight once; slicing a layer out of a stacked weight inside the loop would copy it first (XLA has
  no views), doubling the step's memory traffic. `caches` is None (training), a pair (local, global)
  of pytrees whose leaves lead with the pair axis P (stacked), or a list of P such pairs (unrolled);
  `attend(q, k, v, window, cache=...)` receives that layer's cache and returns (o_BTNH, its update).
  The updates come back in the form they came in.
  """
  dtype = jnp.dtype(cfg.dtype)

  def pair(x_BTD, xs):
    x_BTD = checkpoint_name(x_BTD, "pair_input")  # what remat "offload" keeps on the host
    pair_params, (local_cache, global_cache) = xs
    pair_params = to_compute_dtype(pair_params, dtype)
    if isinstance(pair_params, tuple):  # unrolled: (local, global) trees
      local, global_ = pair_params
    else:  # scanned: leaves [2, ...]
      local, global_ = (jax.tree.map(lambda w, i=i: w[i], pair_params) for i in range(2))
    x_BTD, local_cache = _block(cfg, local, x_BTD, positions_BT,
                                functools.partial(attend, cache=local_cache),
                                window=cfg.sliding_window, layout=layout)
    x_BTD, global_cache = _block(cfg, global_, x_BTD, positions_BT,
                                 functools.partial(attend, cache=global_cache), window=None,
                                 layout=layout)
    return constrain(x_BTD, ACTIVATION_AXES), (local_cache, global_cache)

  if cfg.remat != "none":
    pair = jax.checkpoint(pair, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
  P = cfg.num_layers // 2
  if isinstance(layers, (list, tuple)):
    updated = []
    for i, pair_caches in enumerate(caches or [(None, None)] * P):
      x_BTD, pair_caches = pair(x_BTD, ((layers[2 * i], layers[2 * i + 1]), pair_caches))
      updated.append(pair_caches)
    return x_BTD, updated
  pairs = jax.tree.map(lambda w: w.reshape(P, 2, *w.shape[1:]), layers)
  return jax.lax.scan(pair, x_BTD, (pairs, caches or (None, None)),
                      unroll=1 if cfg.scan_layers else P)


class Transformer(nnx.Module):
  """Gemma 2 decoder. `model(tokens_BT)` -> fp32 logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    shapes = param_shapes(cfg)
    self.config = cfg
    self.embedder = Embedder(shapes["embedder"], cfg, rngs=rngs, dtype=dtype)
    self.layers = Layers(shapes["layers"], cfg, rngs=rngs, dtype=dtype)
    self.final_norm = RMSNorm(shapes["final_norm"], dtype)

  @classmethod
  def from_params(cls, cfg: ModelConfig, params: dict) -> Transformer:
    """Builds a model around an existing parameter tree (no random init is run)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

  def params(self) -> dict:
    """The parameter tree as a plain nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    return self.logits(self.hidden_states(tokens_BT, positions_BT, segment_ids_BT))

  def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """Final-normed hidden states [B, T, D] in the compute dtype (the input of `logits`)."""
    return forward_hidden(self.config, self.params(), tokens_BT, positions_BT, segment_ids_BT)

  def logits(self, hidden_BTD):
    """fp32 logits [..., V] from hidden states [..., D]: tied embedding, final soft-cap."""
    return logits_from_hidden(self.config, self.embedder.input_embedding[...], hidden_BTD)


def forward_hidden(cfg: ModelConfig, params: dict, tokens_BT, positions_BT=None,
                   segment_ids_BT=None):
  """Pure forward pass to final-normed hidden states; `params` as returned by `Transformer.params`."""
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  B, T = tokens_BT.shape
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  segment_ids_BT = jnp.asarray(segment_ids_BT, jnp.int32)
  if positions_BT is None:
    positions_BT = positions_from_segments(segment_ids_BT)
  hidden_BTD, _ = forward_with(cfg, params, tokens_BT, positions_BT,
                               row_attention(cfg, segment_ids_BT))
  return hidden_BTD


def forward_with(cfg: ModelConfig, params: dict, tokens_BT, positions_BT, attend, caches=None, *,
                 layout: dict = CHECKPOINT_LAYOUT):
  """Embedding -> decoder (with `attend`, see `decoder`) -> final norm: (hidden_BTD, caches).

  The one forward pass: training calls it with `row_attention`, the sampler with attention over
  its KV cache.
  """
  embedding_VD = params["embedder"]["input_embedding"]
  x_BTD = jnp.take(embedding_VD, jnp.asarray(tokens_BT, jnp.int32), axis=0)
  x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), embedding_VD.dtype)
  x_BTD = constrain(x_BTD.astype(cfg.dtype), ACTIVATION_AXES)
  x_BTD, caches = decoder(cfg, params["layers"], x_BTD, positions_BT, attend, caches,
                          layout=layout)
  return rms_norm(x_BTD, params["final_norm"]["scale"], cfg.rms_eps), caches


def logits_from_hidden(cfg: ModelConfig, embedding_VD, hidden_BTD):
  # fp32 logits from bf16/fp32 hidden states; float64 stays float64 (exact-reference tests under x64).
  logits = jnp.einsum("...D,VD->...V", hidden_BTD, embedding_VD.astype(hidden_BTD.dtype),
                      preferred_element_type=jnp.promote_types(hidden_BTD.dtype, jnp.float32))
  logits = soft_cap(logits, cfg.final_softcap)
  if cfg.num_real_tokens is not None and cfg.num_real_tokens < cfg.vocab_size:
    logits = jnp.where(jnp.arange(cfg.vocab_size) < cfg.num_real_tokens, logits, PADDED_LOGIT)
  return logits


@functools.partial(jax.jit, static_argnums=0)
def _init_params(cfg: ModelConfig, key):
  return Transformer(cfg, rngs=nnx.Rngs(params=key)).params()


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Random parameters (jitted, so nothing is built op by op)."""
  return _init_params(cfg, jax.random.key(seed))
