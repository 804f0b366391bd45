"""Decode throughput of our KV-cache sampler vs HF transformers `generate`, same weights, greedy, CPU.

  .venv/bin/python scripts/bench_sample.py      # d=512 L=8 V=32k, batch 8, prompt 128, 256 new
  .venv/bin/python scripts/bench_sample.py --smoke   # tiny sizes: checks that it runs

Both run the same random HF checkpoint in fp32 (ours loads it with `load_model`); HF uses eager
attention (sdpa drops Gemma 2's soft-cap) and its default hybrid cache. Each side runs once to warm up
(ours: compiles), then `--runs` timed runs alternate between the two (both see the machine in the
same state); every row generates exactly `--new` tokens (no stop tokens), and the greedy tokens are
checked equal. Prints each side's median tokens/s (prefill included), `ours/HF: N.NNx` (ratio of the
medians; also of the fastest runs), and the KV-cache bytes of gemma2_9b at 8k context: ring cache for
local layers vs a full-length cache everywhere.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.hf_utils


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new", type=int, default=256)
  p.add_argument("--window", type=int, default=128, help="sliding window (ring slots)")
  p.add_argument("--cache_dtype", default="bfloat16")
  p.add_argument("--runs", type=int, default=3, help="timed runs per side (median reported)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  a = p.parse_args()
  if a.smoke:  # a prompt and its new tokens longer than the window: the ring cache wraps
    p.set_defaults(d_model=64, layers=2, vocab=512, batch=2, prompt=8, new=8, window=8, runs=1)
    a = p.parse_args()


  from gemma2_jax.checkpoint import load_model
  from gemma2_jax.inference.sampler import Sampler, SamplingConfig, cache_bytes
  from gemma2_jax.model.config import gemma2_9b, tiny
  from tests.hf_utils import random_hf_model

  heads = a.d_model // 64
  cfg = tiny(vocab_size=a.vocab, num_layers=a.layers, d_model=a.d_model, num_heads=heads,
             num_kv_heads=max(heads // 2, 1), head_dim=64, ffn_dim=4 * a.d_model,
             query_pre_attn_scalar=64, sliding_window=a.window)
  hf = random_hf_model(cfg, seed=0, scale=0.05)
  rng = np.random.default_rng(0)
  prompts = [[2, *rng.integers(4, a.vocab, a.prompt - 1).tolist()] for _ in range(a.batch)]

  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = load_model(d)
  sampler = Sampler(model.config, model.params())
  sampling = SamplingConfig(max_new_tokens=a.new, temperature=0.0, stop_tokens=(),
                            cache_dtype=a.cache_dtype)

  def ours():
    t = time.perf_counter()
    out = sampler(prompts, sampling)
    return time.perf_counter() - t, [r.tokens for r in out]

  def theirs():
    t = time.perf_counter()
    with torch.no_grad():
      out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(a.batch, a.prompt),
                        do_sample=False, max_new_tokens=a.new, min_new_tokens=a.new)
    return time.perf_counter() - t, out[:, a.prompt:].tolist()

  ours()
  theirs_warm = hf.generate(torch.tensor(prompts[:1]), do_sample=False, max_new_tokens=4)
  del theirs_warm
  times_ours, times_hf = [], []
  for _ in range(a.runs):
    t_ours, tok_ours = ours()
    t_hf, tok_hf = theirs()
    times_ours.append(t_ours)
    times_hf.append(t_hf)
  t_ours, t_hf = float(np.median(times_ours)), float(np.median(times_hf))
  same = sum(x == y for x, y in zip(tok_ours, tok_hf, strict=True))
  n = a.batch * a.new
  print(f"config: d={a.d_model} L={a.layers} V={a.vocab} window={a.window}, batch {a.batch}, "
        f"prompt {a.prompt}, {a.new} new tokens, greedy, fp32 weights, cache {a.cache_dtype}; "
        f"torch threads {torch.get_num_threads()}; median of {a.runs} alternating runs")
  for name, t, ts in (("ours", t_ours, times_ours), ("HF", t_hf, times_hf)):
    print(f"{name + ':':5} {n / t:8.1f} tokens/s ({t:.2f} s incl. prefill; runs "
          f"{', '.join(f'{x:.2f}' for x in ts)} s)")
  print(f"greedy rows identical to HF: {same}/{a.batch}")
  print(f"ours/HF: {t_hf / t_ours:.2f}x")
  # On a shared machine the medians move with the load (torch's threads suffer most from a busy
  # core); the fastest runs show each side undisturbed.
  print(f"ours/HF of the fastest runs: {min(times_hf) / min(times_ours):.2f}x")
  for ctx in (8192,):
    b = cache_bytes(gemma2_9b(), batch=1, length=ctx)
    print(f"gemma2_9b KV cache per sequence at {ctx} tokens (bf16): ring {b['ring'] / 2**30:.3f} GiB "
          f"vs full-length {b['full_length'] / 2**30:.3f} GiB ({b['ring'] / b['full_length']:.2f}x)")


if __name__ == "__main__":
  main()
