"""Peak host memory and time of `python -m gemma2_jax.merge`, relative to one model's size.

Writes three synthetic fp32 HF Gemma 2 checkpoints (~2 GB each by default, random weights, written a
block at a time: the writer never holds a model), then merges them (a base and two fine-tunes; TIES by
default, the method that reads each tensor most: two histogram passes for its magnitude cut-off, then
the merge) in a fresh process, which reports the peak RSS the merge adds on top of that process after
its imports (VmHWM reset just before the merge), and the merge's seconds. The goal: a few blocks of
rows per model, well under a third of one model, however large the models are.

  .venv/bin/python scripts/bench_merge.py [--workdir DIR] [--layers 6] [--d_model 2048] [--vocab 65536]
      [--method ties] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = """merge_method: {method}
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: float32
"""
LINEAR = """merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {a}
    parameters: {{weight: 0.4}}
  - model: {b}
    parameters: {{weight: 0.4}}
dtype: float32
"""


def model_config(layers: int, d_model: int, vocab: int):
  from gemma2_jax.model.config import ModelConfig

  return ModelConfig(vocab_size=vocab, num_layers=layers, d_model=d_model, num_heads=8, num_kv_heads=4,
                     head_dim=d_model // 8, ffn_dim=4 * d_model, query_pre_attn_scalar=d_model // 8)


def write_synthetic_hf(path: Path, cfg, seed: int) -> int:
  """Random fp32 weights, a block of rows at a time. Returns the bytes written."""
  from gemma2_jax.merging.sources import hf_specs
  from gemma2_jax.merging.writer import HFWriter

  rng = np.random.default_rng(seed)
  specs = hf_specs(cfg)
  writer = HFWriter(path, cfg, specs, np.float32)
  total = 0
  for name, shape in specs:
    step = max(1, (4 << 20) // int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else shape[0]
    for r in range(0, shape[0], step):
      block = rng.standard_normal((min(step, shape[0] - r), *shape[1:]), dtype=np.float32) * np.float32(0.02)
      writer.write(name, block)
      total += block.nbytes
  writer.close()
  return total


def _rss(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def worker(config: str, out: str):
  """In a fresh process: imports first, then the merge alone is measured."""
  from gemma2_jax.merging import merge

  with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS
    f.write("5")
  base = _rss("VmRSS")
  start = time.perf_counter()
  merge(config, out)
  seconds = time.perf_counter() - start
  print(json.dumps({"added_peak": _rss("VmHWM") - base, "baseline": base, "seconds": seconds}))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=65536)
  parser.add_argument("--method", default="ties", choices=("ties", "dare_ties", "task_arithmetic", "linear"))
  parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  args = parser.parse_args()
  if args.worker:
    return worker(*args.worker)
  if args.smoke:
    args.layers, args.d_model, args.vocab = 2, 64, 512
  cfg = model_config(args.layers, args.d_model, args.vocab)
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    root = Path(tmp)
    sizes = [write_synthetic_hf(root / name, cfg, seed) for seed, name in enumerate(("base", "a", "b"))]
    text = (LINEAR if args.method == "linear" else CONFIG).format(
      method=args.method, base=root / "base", a=root / "a", b=root / "b")
    (root / "merge.yaml").write_text(text)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, "--worker", str(root / "merge.yaml"), str(root / "out")],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
      sys.exit(proc.stderr[-3000:])
    row = json.loads(proc.stdout.strip().splitlines()[-1])
  size = sizes[0]
  print(f"models: 3 x {size / 2**30:.2f} GiB fp32 HF ({cfg.num_layers} layers, d={cfg.d_model}, "
        f"vocab {cfg.vocab_size}: embedding {cfg.vocab_size * cfg.d_model * 4 / size:.0%} of a model); "
        f"merge process baseline after imports {row['baseline'] / 2**30:.2f} GiB")
  print(f"{args.method} of 3 checkpoints: peak RSS +{row['added_peak'] / 2**30:.3f} GiB = "
        f"{row['added_peak'] / size:.3f}x one model, {row['seconds']:.1f} s")


if __name__ == "__main__":
  main()
