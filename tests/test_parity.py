"""Parity with HF transformers' Gemma2ForCausalLM (PyTorch, CPU, eager attention).

Weights travel through the real file format: save_pretrained -> gemma2_jax.load_model.
Tolerances are fixed: fp32 max |logit diff| <= 1e-5 x max |logit|; bf16 KL <= 1e-3 nats/token.
"""

import jax
import numpy as np
import pytest

import gemma2_jax
from gemma2_jax.model import tiny
from tests.hf_utils import hf_logits, random_hf_model

CONFIGS = {
  # GQA (4 heads / 2 kv), window 8 < T, query scalar 24 != head_dim 16, default soft-caps.
  "gqa_window": tiny(),
  # Soft-caps small enough to bend the logits; MHA; a window larger than T on some rows.
  "softcaps_mha": tiny(num_heads=2, num_kv_heads=2, head_dim=32, attn_softcap=2.0,
                       final_softcap=3.0, sliding_window=13, query_pre_attn_scalar=32),
  # Multi-query attention, no soft-caps at all, 6 layers.
  "mqa_nocap": tiny(num_layers=6, num_kv_heads=1, attn_softcap=None, final_softcap=None),
}
T = 24


def _rel_err(ours, ref):
  return np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  cfg = CONFIGS[request.param]
  path = tmp_path_factory.mktemp(request.param)
  hf_model = random_hf_model(cfg)
  hf_model.save_pretrained(path)
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, T))
  return cfg, path, hf_model, tokens, hf_logits(hf_model, tokens)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_fp32_logits_match_hf(case, impl):
  cfg, path, _, tokens, ref = case
  model = gemma2_jax.load_model(path, attention_impl=impl, attention_block_size=5)
  assert model.config.sliding_window == cfg.sliding_window
  logits = model(tokens)
  assert logits.shape == ref.shape and logits.dtype == np.float32
  assert _rel_err(logits, ref) <= 1e-5


def test_bf16_close_to_hf_fp32(case):
  _, path, _, tokens, ref = case
  model = gemma2_jax.load_model(path, dtype="bfloat16")
  assert model.embedder.input_embedding[...].dtype == jax.numpy.bfloat16
  logp = jax.nn.log_softmax(np.asarray(model(tokens), np.float64), axis=-1)
  ref_logp = jax.nn.log_softmax(ref.astype(np.float64), axis=-1)
  kl_per_token = (np.exp(ref_logp) * (ref_logp - logp)).sum(-1)
  assert kl_per_token.mean() <= 1e-3


def test_packed_segments_equal_separate_documents(case):
  """A packed row [doc A | doc B | pad] gives each document HF's logits for it alone."""
  cfg, path, hf_model, tokens, _ = case
  lengths = [11, 9]
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] +
                               [np.zeros(T - sum(lengths), int)])[None]
  model = gemma2_jax.load_model(path)
  packed = np.asarray(model(tokens[:1], segment_ids_BT=segment_ids))  # positions derived
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(T - sum(lengths))])
  explicit = np.asarray(model(tokens[:1], positions_BT=positions[None], segment_ids_BT=segment_ids))
  np.testing.assert_array_equal(packed, explicit)
  start = 0
  for n in lengths:
    ref = hf_logits(hf_model, tokens[:1, start:start + n])
    assert _rel_err(packed[:, start:start + n], ref) <= 1e-5
    start += n
