"""Train-step throughput: ours (jit, AdamW) vs HF transformers' Gemma2 (PyTorch eager, AdamW).

  .venv/bin/python scripts/bench_train.py            # the issue's CPU config, fp32
  python scripts/bench_train.py --only_ours --dtype bfloat16 --d_model 2048 ...   # on a GPU/TPU

Prints tokens/s of both, the ratio, and our achieved model FLOP/s as a fraction of the machine's
measured jnp matmul peak (same dtype), with FLOPs counted analytically (sliding-window savings
included; see gemma2_jax/flops.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma2_jax.model.config import ModelConfig
from gemma2_jax.parallel.sharding import DEFAULT_RULES, make_mesh
from gemma2_jax.training import modes, programs
from gemma2_jax.training.experiment import Experiment, TrainConfig
from gemma2_jax.training.flops import train_flops_per_token
from gemma2_jax.training.optim import OptimizerConfig
from gemma2_jax.training.state import init_state, to_global


def matmul_peak(dtype, n: int, iters: int = 10) -> float:
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(iters):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * iters / (time.perf_counter() - t)


def batch(B, T, V, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, V, (B, T + 1)).astype(np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}


def bench_ours(cfg: ModelConfig, B, T, steps, chunk):
  train = TrainConfig(steps=steps + 2, global_batch=B, seq_len=T, loss_chunk=chunk)
  exp = Experiment(model=cfg, mesh={"dcn": 1, "data": 1, "fsdp": jax.device_count(), "tensor": 1},
                   rules=DEFAULT_RULES, optimizer=OptimizerConfig(warmup_steps=1), train=train,
                   data_train=None, data_eval=None, tokenizer="", init_from="")
  mesh = make_mesh(exp.mesh)
  step = programs.train_program(exp, modes.Mode(exp), mesh)  # the trainer's program
  state = init_state(exp, step.tx, step.shardings)
  b = to_global(batch(B, T, cfg.vocab_size), step.shardings)
  for _ in range(2):  # compile + warm-up
    state, m = step(state, b, None)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, b, None)
  jax.block_until_ready(m)
  return B * T * steps / (time.perf_counter() - t), float(m["loss"])


def bench_hf(cfg: ModelConfig, B, T, steps):
  import torch

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from transformers import Gemma2ForCausalLM

  from tests.hf_utils import hf_config
  torch.manual_seed(0)
  model = Gemma2ForCausalLM(hf_config(cfg)).train()
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
  data = batch(B, T, cfg.vocab_size)
  ids = torch.tensor(data["tokens"], dtype=torch.long)
  labels = ids  # HF shifts labels by one inside the loss

  def one():
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  one()
  t = time.perf_counter()
  for _ in range(steps):
    loss = one()
  return B * T * steps / (time.perf_counter() - t), loss


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--ffn", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--window", type=int, default=4096)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--dtype", default="float32", help="compute dtype (params stay fp32)")
  p.add_argument("--attention", default="xla", choices=("xla", "blockwise"))
  p.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
  p.add_argument("--scan_layers", type=int, default=0,
                  help="1 = scan over layer pairs (our default for accelerators); 0 = unrolled, which "
                       "XLA:CPU runs faster")
  p.add_argument("--only_ours", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  a = p.parse_args()
  if a.smoke:
    p.set_defaults(d_model=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=512, window=16,
                   batch=2, seq=32, steps=1, chunk=32, matmul_n=256)
    a = p.parse_args()
  cfg = ModelConfig(vocab_size=a.vocab, num_layers=a.layers, d_model=a.d_model, num_heads=a.heads,
                    num_kv_heads=a.kv_heads, head_dim=a.head_dim, ffn_dim=a.ffn,
                    query_pre_attn_scalar=a.head_dim, sliding_window=a.window, dtype=a.dtype,
                    attention_impl=a.attention, remat=a.remat, scan_layers=bool(a.scan_layers))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; config: d={a.d_model} "
        f"L={a.layers} heads={a.heads}/{a.kv_heads}x{a.head_dim} ffn={a.ffn} V={a.vocab} "
        f"B={a.batch} T={a.seq} compute={a.dtype} scan_layers={bool(a.scan_layers)} "
        f"params={cfg.num_params() / 1e6:.1f}M")
  ours, ours_loss = bench_ours(cfg, a.batch, a.seq, a.steps, a.chunk)
  peak = matmul_peak(jnp.dtype(a.dtype), a.matmul_n) * jax.device_count()
  achieved = ours * train_flops_per_token(cfg, a.seq)
  print(f"ours:  {ours:,.0f} tokens/s (loss {ours_loss:.3f})")
  print(f"model FLOP/s {achieved / 1e9:,.1f} G = {achieved / peak:.1%} of the measured "
        f"{a.dtype} matmul peak ({peak / 1e9:,.1f} G, n={a.matmul_n})")
  if not a.only_ours:
    hf, hf_loss = bench_hf(cfg, a.batch, a.seq, max(2, a.steps // 2))
    print(f"HF:    {hf:,.0f} tokens/s (loss {hf_loss:.3f})")
    print(f"ratio ours/HF: {ours / hf:.2f}x")


if __name__ == "__main__":
  main()
