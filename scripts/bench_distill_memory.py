"""XLA memory of the distillation loss + gradient: chunked (ours) vs full-logits (naive), per device.

Only the loss part is compiled: student and teacher final hidden states are inputs (bf16, as training
produces them), logits are fp32, the gradient is taken w.r.t. the student's hidden states and its fp32
tied embedding (the teacher gets none). Arguments are abstract ShapeDtypeStructs, so nothing is
allocated: each program is lowered, compiled and asked for `memory_analysis()`. Defaults are a
Gemma 2 9B student (D = 3584) and 27B teacher (D = 4608) at V = 256128, B = 1.

`naive` is the straightforward implementation (as in MaxText / Tunix): full [B, T, V] logits of both
models, log_softmax of both, softmax of the teacher, the same divergence and CE mix.

  .venv/bin/python scripts/bench_distill_memory.py [--seq-lens 2048 4096 8192] [--chunk 256]
      [--loss jsd] [--vocab 256128] [--no-naive] [--fsdp 8] [--smoke]

With --fsdp N the program is compiled SPMD for N (fake CPU) devices the way the trainer shards it:
one sequence per device, embeddings FSDP-sharded over d_model; the figures are then per device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--fsdp" in sys.argv:  # the fake devices must exist before JAX initialises
  n = sys.argv[sys.argv.index("--fsdp") + 1]
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from gemma2_jax.model import losses
from gemma2_jax.model.config import gemma2_9b, gemma2_27b  # noqa: E402
from gemma2_jax.model.transformer import logits_from_hidden  # noqa: E402
from gemma2_jax.parallel.sharding import DEFAULT_RULES, activation_sharding, logical_to_spec, make_mesh

GiB = 2**30


def ours(scfg, tcfg, args, *, loss, chunk):
  h, e, ht, et, y, w = args
  sums = losses.distill_sums(scfg, e, h, tcfg, et, ht, y, w, loss=loss, beta=0.5, temperature=2.0,
                             alpha=0.5, chunk_size=chunk)
  return sums["loss"] / sums["weight"]


def naive(scfg, tcfg, args, *, loss, chunk):
  del chunk
  h, e, ht, et, y, w = args
  T2 = 2.0**2
  logits_s = logits_from_hidden(scfg, e, h)
  logits_t = jax.lax.stop_gradient(logits_from_hidden(tcfg, et, ht))
  logq = jax.nn.log_softmax(logits_s / 2.0)
  logp = jax.nn.log_softmax(logits_t / 2.0)
  p = jax.nn.softmax(logits_t / 2.0)
  kd = T2 * losses.divergence(loss, logq, logp, 0.5) if loss != "soft_ce" else -T2 * jnp.sum(p * logq, -1)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits_s), y[..., None], axis=-1)[..., 0]
  return jnp.sum(w * (0.5 * kd + 0.5 * nll)) / jnp.sum(w)


def analyse(fn, scfg, tcfg, T, *, loss, chunk, fsdp=1):
  S = jax.ShapeDtypeStruct
  V, B = scfg.vocab_size, fsdp  # one sequence per device
  mesh = make_mesh({"fsdp": fsdp}, jax.devices()[:fsdp])
  spec = lambda *axes: NamedSharding(mesh, logical_to_spec(axes, DEFAULT_RULES))
  rows, table = spec("batch", "length", None), spec("vocab", "embed")
  abstract = (S((B, T, scfg.d_model), jnp.bfloat16, sharding=rows),
              S((V, scfg.d_model), jnp.float32, sharding=table),
              S((B, T, tcfg.d_model), jnp.bfloat16, sharding=rows),
              S((V, tcfg.d_model), jnp.bfloat16, sharding=table),
              S((B, T), jnp.int32, sharding=spec("batch", "length")),
              S((B, T), jnp.float32, sharding=spec("batch", "length")))
  grad = jax.grad(lambda h, e, *rest: fn(scfg, tcfg, (h, e, *rest), loss=loss, chunk=chunk),
                  argnums=(0, 1))
  t0 = time.perf_counter()
  with activation_sharding(mesh, DEFAULT_RULES):
    m = jax.jit(grad, out_shardings=(rows, table)).lower(*abstract).compile().memory_analysis()
  return m.temp_size_in_bytes, time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
  ap.add_argument("--chunk", type=int, default=256)
  ap.add_argument("--loss", default="jsd", choices=losses.DISTILL_LOSSES)
  ap.add_argument("--vocab", type=int, default=256128)
  ap.add_argument("--no-naive", action="store_true")
  ap.add_argument("--fsdp", type=int, default=1, help="devices (one sequence each, FSDP embeddings)")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  a = ap.parse_args()
  if a.smoke:  # the same models (abstract: nothing is allocated), short rows and a small vocabulary
    ap.set_defaults(seq_lens=[128, 256], chunk=64, vocab=2048)
    a = ap.parse_args()
  real = min(256000, a.vocab)
  scfg = gemma2_9b().replace(vocab_size=a.vocab, num_real_tokens=real)
  tcfg = gemma2_27b().replace(vocab_size=a.vocab, num_real_tokens=real)
  print(f"backend {jax.default_backend()}, V={a.vocab}, student D={scfg.d_model}, teacher "
        f"D={tcfg.d_model}, 1 sequence per device, {a.fsdp} device(s), loss={a.loss}, chunk={a.chunk}; "
        "temp memory of jit(grad(loss)) per device")
  print(f"{'T':>6} | {'ours GiB':>9} {'GiB/1k tok':>10} | {'naive GiB':>9} {'GiB/1k tok':>10} | compile s")
  rows = []
  for T in a.seq_lens:
    o, to = analyse(ours, scfg, tcfg, T, loss=a.loss, chunk=a.chunk, fsdp=a.fsdp)
    n, tn = (None, 0.0) if a.no_naive else analyse(naive, scfg, tcfg, T, loss=a.loss, chunk=a.chunk,
                                                   fsdp=a.fsdp)
    rows.append((T, o, n))
    naive_s = "" if n is None else f"{n / GiB:9.2f} {n / GiB / (T / 1000):10.3f}"
    print(f"{T:6d} | {o / GiB:9.3f} {o / GiB / (T / 1000):10.3f} | {naive_s:>20} | {to:.1f} + {tn:.1f}")
  if len(rows) > 1:
    (t0, o0, n0), (t1, o1, n1) = rows[0], rows[-1]
    slope = (o1 - o0) / GiB / ((t1 - t0) / 1000)
    msg = f"marginal ours: {slope:.4f} GiB per 1k extra tokens (T {t0} -> {t1})"
    if n0 is not None:
      msg += f"; naive: {(n1 - n0) / GiB / ((t1 - t0) / 1000):.3f}"
    print(msg)


if __name__ == "__main__":
  main()
