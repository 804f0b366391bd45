"""On-policy (GKD) vs off-policy distillation step time on CPU, and where an on-policy step goes.

  python scripts/bench_onpolicy.py            # the tiny config and a mid-size one
  python scripts/bench_onpolicy.py --sizes tiny
  python scripts/bench_onpolicy.py --smoke    # tiny sizes: checks that it runs

Both steps are the trainer's train program (training.programs.train_program) on the same batch of one-
conversation rows (prompt of T/2 tokens, a response after it), random weights: onpolicy_lambda = 1 (the
student samples max_new_tokens for every row inside the step, then the teacher and the student score them)
vs 0 (online KD on the batch's responses). A random student rarely emits a stop token, so every row
generates all max_new_tokens: the worst case. The split times the parts as separate jitted programs:
sampling (onpolicy.onpolicy_batch), the teacher's forward pass, and the rest (the off-policy step minus the
teacher's forward: the student's forward + backward, both models' chunked logits and the update). Each
figure is the median of --runs timed calls after one warm-up call. Prints `on-policy / off-policy step:
N.NNx` per size (target <= 3x). """

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma2_jax.data.tokenizer import END_OF_TURN_ID, EOS_ID
from gemma2_jax.distill import onpolicy
from gemma2_jax.distill.config import TeacherConfig
from gemma2_jax.model.config import tiny  # noqa: E402
from gemma2_jax.model.transformer import forward_hidden, init_params  # noqa: E402
from gemma2_jax.parallel.sharding import make_mesh
from gemma2_jax.training import modes, programs
from gemma2_jax.training.experiment import from_config, load_config_file
from gemma2_jax.training.state import init_state

ROOT = Path(__file__).resolve().parents[1]


def _model(d, layers, ffn, vocab, window):
  return tiny(vocab_size=vocab, num_layers=layers, d_model=d, num_heads=4, num_kv_heads=2,
              head_dim=d // 4, ffn_dim=ffn, query_pre_attn_scalar=d // 4, sliding_window=window)


# name -> (student, teacher, batch, seq_len, max_new_tokens)
SIZES = {
  # configs/onpolicy_distill_tiny.py: its student, the quickstart teacher (configs/pretrain_tiny.py)
  "tiny": (_model(64, 2, 128, 1024, 64), _model(128, 4, 256, 1024, 64), 8, 128, 64),
  "mid": (_model(256, 4, 1024, 8192, 128), _model(512, 8, 2048, 8192, 128), 8, 512, 128),
  "smoke": (_model(32, 2, 64, 1024, 16), _model(32, 2, 64, 1024, 16), 2, 32, 8),  # --smoke: runs at all
}


def _median_time(fn, runs):
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench(name, runs, grad_accum):
  student, teacher_cfg, B, T, N = SIZES[name]
  c = load_config_file(str(ROOT / "configs" / "onpolicy_distill_tiny.py"))
  c.model = student.to_dict()
  c.train.update(global_batch=B, seq_len=T, loss_chunk=min(T, 128), steps=10,
                 grad_accum_steps=min(grad_accum, B))
  c.distill.onpolicy_max_new_tokens = N
  exp = from_config(c, num_devices=1)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1},
                            teacher=TeacherConfig(checkpoint="-", dtype="float32"))
  teacher_cfg = teacher_cfg.replace(remat="none")
  teacher_params = init_params(teacher_cfg, seed=1)
  mesh = make_mesh(exp.mesh, jax.devices()[:1])
  rng = np.random.RandomState(0)
  P = T // 2
  tokens = rng.randint(10, student.vocab_size, (B, T + 1)).astype(np.int32)
  tokens[:, 0] = 2
  loss_mask = np.zeros((B, T), np.float32)
  loss_mask[:, P - 1:] = 1  # targets P.. are the response: the prompt is the first P tokens
  batch = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
           "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)),
           "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.asarray(loss_mask)}
  steps, states = {}, {}
  for lam in (0.0, 1.0):  # the trainer's program; the state is donated, so each step threads its own
    e = dataclasses.replace(exp, distill=dataclasses.replace(exp.distill, onpolicy_lambda=lam))
    steps[lam] = programs.train_program(e, modes.OnlineKD(e, teacher_cfg=teacher_cfg), mesh)
    states[lam] = init_state(e, steps[lam].tx, steps[lam].shardings)
  sampling = onpolicy.sampling_config(exp.distill, (EOS_ID, END_OF_TURN_ID), student.dtype)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(0), r))(jnp.arange(B, dtype=jnp.uint32))
  sample = jax.jit(lambda p, b: onpolicy.onpolicy_batch(student, p, b, keys, sampling))
  teacher_fwd = jax.jit(lambda p, b: forward_hidden(teacher_cfg, p, b["tokens"], b["positions"],
                                                    b["segment_ids"]))
  def run(lam):
    states[lam], m = steps[lam](states[lam], batch, teacher_params)
    return m

  t_off = _median_time(lambda: run(0.0)["loss"], runs)
  t_on = _median_time(lambda: run(1.0)["loss"], runs)
  t_sample = _median_time(lambda: sample(states[1.0].params, batch)[0]["tokens"], runs)
  t_teacher = _median_time(lambda: teacher_fwd(teacher_params, batch), runs)
  gen = float(run(1.0)["gen_tokens"])
  print(f"[{name}] student d={student.d_model} L={student.num_layers}, teacher "
        f"d={teacher_cfg.d_model} L={teacher_cfg.num_layers}, V={student.vocab_size}, batch {B} x "
        f"{T} tokens in {exp.train.grad_accum_steps} micro-batches, {N} new tokens per row "
        f"({gen:.0f} generated), fp32, median of {runs}")
  print(f"  off-policy KD step {t_off * 1e3:8.1f} ms")
  print(f"  on-policy step     {t_on * 1e3:8.1f} ms")
  print(f"  split of an on-policy step: sampling {t_sample * 1e3:.1f} ms "
        f"({t_sample / t_on:.0%}), teacher forward {t_teacher * 1e3:.1f} ms "
        f"({t_teacher / t_on:.0%}), student + losses + update {(t_off - t_teacher) * 1e3:.1f} ms "
        f"({(t_off - t_teacher) / t_on:.0%})")
  print(f"  sampling: {gen / t_sample:.0f} generated tokens/s")
  print(f"[{name}] on-policy / off-policy step: {t_on / t_off:.2f}x")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="tiny,mid")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--grad_accum", type=int, default=4, help="micro-batches per step")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  a = p.parse_args()
  if a.smoke:
    p.set_defaults(sizes="smoke", runs=1)
    a = p.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores")
  for name in a.sizes.split(","):
    bench(name, a.runs, a.grad_accum)


if __name__ == "__main__":
  main()
