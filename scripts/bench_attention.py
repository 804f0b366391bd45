"""Backward-pass memory of the blockwise attention fallback, before and after its flash-style VJP.

  python scripts/bench_attention.py [--lengths 1024,2048,4096] [--time] [--smoke]

Compiles `grad(sum(attention(q, k, v)))` for each T and prints XLA's compiled temporaries
(`memory_analysis().temp_size_in_bytes`; inputs and outputs not counted) for: `before`, the offset-scan
formulation this module used until issue 12, differentiated by autodiff (it keeps fp32 residuals for
every key-block offset: quadratic in T); `after`, `attention_blockwise` with its custom VJP (linear);
and the dense `attention_xla` for scale. Config: B=1, N=8, K=4, H=256 (2B's heads), fp32, block 512,
soft-cap 50, on a global layer (window None) and a local one (window 1024). `--time` also times one
jitted forward+backward of each on this machine's default device.
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp

from gemma2_jax.model.attention import _MASKED, _mask, attention_blockwise, attention_xla
from gemma2_jax.model.layers import soft_cap

B, N, K, H = 1, 8, 4, 256
BLOCK, SOFTCAP = 512, 50.0


def blockwise_before(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, window, softcap, block_size):
  """The previous `attention_blockwise`, unchanged: all query blocks at once, one key-block offset per
  scan step (global layers visit every offset, the upper triangle included), plain autodiff."""
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
  q_BQtKGH = q_BTNH.reshape(B, nb, b, K, G, H)
  k_BQsKH = k_BSKH.reshape(B, nb, b, K, H)
  v_BQsKH = v_BSKH.reshape(B, nb, b, K, H)
  seg_BQt = segment_ids_BT.reshape(B, nb, b)
  t_idx_Qt = jnp.arange(nb * b).reshape(nb, b)
  n_offsets = nb if window is None else min(nb, math.ceil((window - 1) / b) + 1)

  def step(carry, offset):
    m_BQKGt, l_BQKGt, acc_BQtKGH = carry
    kb_Q = jnp.arange(nb) - offset
    kb_clipped_Q = jnp.maximum(kb_Q, 0)
    k_blk = jnp.take(k_BQsKH, kb_clipped_Q, axis=1)
    v_blk = jnp.take(v_BQsKH, kb_clipped_Q, axis=1)
    seg_s_BQs = jnp.take(seg_BQt, kb_clipped_Q, axis=1)
    s_idx_Qs = kb_Q[:, None] * b + jnp.arange(b)
    visible_BQts = _mask(t_idx_Qt[None, :, :, None], s_idx_Qs[None, :, None, :],
                         seg_BQt[..., :, None], seg_s_BQs[..., None, :], window)
    visible_BQts &= (kb_Q >= 0)[None, :, None, None]
    logits = jnp.einsum("BQtKGH,BQsKH->BQKGts", q_BQtKGH, k_blk, preferred_element_type=jnp.float32)
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


IMPLS = {
  "before": lambda q, k, v, seg, window: blockwise_before(q, k, v, seg, window=window, softcap=SOFTCAP,
                                                          block_size=BLOCK),
  "after": lambda q, k, v, seg, window: attention_blockwise(q, k, v, seg, window=window,
                                                            softcap=SOFTCAP, block_size=BLOCK),
  "xla": lambda q, k, v, seg, window: attention_xla(q, k, v, seg, window=window, softcap=SOFTCAP),
}


def grad_fn(impl, window):
  loss = lambda q, k, v, seg: jnp.sum(IMPLS[impl](q, k, v, seg, window))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def shapes(T):
  return (jax.ShapeDtypeStruct((B, T, N, H), jnp.float32), jax.ShapeDtypeStruct((B, T, K, H), jnp.float32),
          jax.ShapeDtypeStruct((B, T, K, H), jnp.float32), jax.ShapeDtypeStruct((B, T), jnp.int32))


def temp_mib(impl, window, T) -> float:
  compiled = grad_fn(impl, window).lower(*shapes(T)).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def time_ms(impl, window, T, reps=3) -> float:
  keys = jax.random.split(jax.random.key(0), 3)
  args = [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys, shapes(T)[:3], strict=True)]
  args.append(jnp.ones((B, T), jnp.int32))
  fn = grad_fn(impl, window)
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / reps * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--lengths", default="1024,2048,4096")
  parser.add_argument("--time", action="store_true", help="also time fwd+bwd (slow on CPU)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  args = parser.parse_args()
  if args.smoke:  # two key blocks: the blockwise paths still loop
    parser.set_defaults(lengths=str(2 * BLOCK))
    args = parser.parse_args()
  print(f"grad temporaries, MiB (B={B} N={N} K={K} H={H} fp32, block {BLOCK}, soft-cap {SOFTCAP}; "
        f"{jax.default_backend()})")
  print(f"{'layer':>12} {'T':>6} {'before':>9} {'after':>9} {'before/after':>13} {'xla':>9}")
  for window in (None, 1024):
    for T in (int(t) for t in args.lengths.split(",")):
      mib = {impl: temp_mib(impl, window, T) for impl in IMPLS}
      layer = "global" if window is None else f"window {window}"
      print(f"{layer:>12} {T:>6} {mib['before']:9.1f} {mib['after']:9.1f} "
            f"{mib['before'] / mib['after']:12.2f}x {mib['xla']:9.1f}", flush=True)
      if args.time:
        ms = {impl: time_ms(impl, window, T) for impl in IMPLS}
        print(f"{'':>12} {'ms':>6} {ms['before']:9.1f} {ms['after']:9.1f} "
              f"{ms['before'] / ms['after']:12.2f}x {ms['xla']:9.1f}", flush=True)


if __name__ == "__main__":
  main()
