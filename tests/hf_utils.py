"""Builds random tiny HF transformers Gemma2 models (the reference) from our ModelConfig."""

import numpy as np
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from gemma2_jax.model.config import ModelConfig


def hf_config(cfg: ModelConfig) -> Gemma2Config:
  return Gemma2Config(
    vocab_size=cfg.num_real_tokens or cfg.vocab_size, hidden_size=cfg.d_model,
    intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
    sliding_window=cfg.sliding_window, attn_logit_softcapping=cfg.attn_softcap,
    final_logit_softcapping=cfg.final_softcap, rope_theta=cfg.rope_base,
    attn_implementation="eager")


def random_hf_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.1) -> Gemma2ForCausalLM:
  """Every parameter random, norm scales included (HF initialises them to zero)."""
  torch.manual_seed(seed)
  model = Gemma2ForCausalLM(hf_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else scale))
  return model


def hf_logits(model: Gemma2ForCausalLM, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
