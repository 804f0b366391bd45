"""Host memory of the end-of-run HF export, ours (one tensor at a time) vs gathering the whole model.

In a fresh process per method, builds a synthetic fp32 model (~1 GB by default) sharded over 8 fake
CPU devices (fsdp=4 x tensor=2), then exports it as HF safetensors and reports the peak RSS added by
the export (VmHWM reset just before it), relative to the model's size. On CPU the device buffers are
host RAM too, so the model itself is in the baseline, not in the figure.

  .venv/bin/python scripts/bench_export.py [--layers 8] [--d_model 1536] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _peak_rss() -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak():
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def worker(method: str, layers: int, d_model: int, out: str):
  import jax
  import numpy as np
  from etils import epath
  from jax.experimental import multihost_utils

  from gemma2_jax.checkpoint import save_params
  from gemma2_jax.checkpoint.export import export_hf
  from gemma2_jax.model.config import ModelConfig
  from gemma2_jax.model.transformer import LOGICAL_AXES, init_params
  from gemma2_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh

  cfg = ModelConfig(vocab_size=32768, num_layers=layers, d_model=d_model, num_heads=8, num_kv_heads=4,
                    head_dim=d_model // 8, ffn_dim=4 * d_model, query_pre_attn_scalar=d_model // 8)
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  shardings = logical_to_sharding(LOGICAL_AXES, mesh, DEFAULT_RULES)
  params = jax.jit(lambda: init_params(cfg, 0), out_shardings=shardings)()
  jax.block_until_ready(params)
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  _reset_peak()
  base = _peak_rss()
  if method == "ours":
    export_hf(params, cfg, epath.Path(out))
  else:  # what the trainer did before: the whole model gathered, then written
    host = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)
    save_params(host, cfg, out, "hf")
  print(json.dumps({"method": method, "model_bytes": size, "added_peak": _peak_rss() - base}))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--d_model", type=int, default=1536)
  parser.add_argument("--worker", default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  args = parser.parse_args()
  if args.smoke:
    parser.set_defaults(layers=2, d_model=64)
    args = parser.parse_args()
  if args.worker:
    return worker(args.worker, args.layers, args.d_model, args.out)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  rows = []
  for method in ("gather_all", "ours"):
    with tempfile.TemporaryDirectory() as tmp:
      r = subprocess.run([sys.executable, __file__, f"--worker={method}", f"--layers={args.layers}",
                          f"--d_model={args.d_model}", f"--out={tmp}/hf"], env=env,
                         capture_output=True, text=True, check=True)
      rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
  size = rows[0]["model_bytes"]
  print(f"model: {size / 2**30:.2f} GiB fp32, sharded fsdp=4 x tensor=2 over 8 CPU devices")
  for row in rows:
    print(f"{row['method']:>10}: export adds {row['added_peak'] / 2**30:.2f} GiB of peak RSS "
          f"= {row['added_peak'] / size:.2f}x the model")


if __name__ == "__main__":
  main()
