"""Peak host memory of checkpoint conversion, relative to the checkpoint's size.

Writes a synthetic fp32 HF Gemma 2 checkpoint (~2 GB by default; random weights, our own writer, no
torch), then runs `python -m gemma2_jax.convert` for HF->native, native->HF, HF->Kaggle and
Kaggle->HF, each in a fresh process, and reports that process's peak RSS (its VmHWM, read by the
process itself at exit) next to the checkpoint's byte size. The peak of a bare interpreter that has
only imported the converter is reported too: the fixed cost (jax, orbax, tensorstore), not a copy
of the weights.

  .venv/bin/python scripts/bench_convert.py [--workdir DIR] [--layers 4] [--vocab 128000] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gemma2_jax.checkpoint import hf
from gemma2_jax.checkpoint.mapping import export_tensors
from gemma2_jax.checkpoint.safetensors_io import write_sharded
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import param_shapes


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_synthetic_hf(path: Path, cfg: ModelConfig, seed: int = 0):
  """Random fp32 tensors produced one at a time, so the writer itself never holds the model."""
  rng = np.random.default_rng(seed)
  shapes = param_shapes(cfg)

  def lazy(tree):  # leaves drawn only when export_tensors asks for them, one slice at a time
    if isinstance(tree, dict):
      return {k: lazy(v) for k, v in tree.items()}
    return _LazyLeaf(tree, rng)

  specs, produce = export_tensors(cfg, hf.entries(cfg), lazy(shapes), np.float32,
                                  vocab_rows=cfg.vocab_size)
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg, "float32"), indent=2))
  write_sharded(path, specs, produce)


class _LazyLeaf:
  """Stands in for a stacked [L, ...] parameter: indexing it draws that slice at random."""

  def __init__(self, shape, rng):
    self.shape, self.rng = shape, rng

  def _draw(self, shape):
    return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

  def __getitem__(self, index):
    index = index if isinstance(index, tuple) else (index,)
    return self._draw(self.shape[len(index):])

  def __array__(self, dtype=None, copy=None):
    return self._draw(self.shape)


# Runs a module as __main__ and then prints its own VmHWM (peak RSS of this process image). Not
# getrusage/wait4 ru_maxrss: Linux carries the forking parent's RSS high-water mark over exec into
# the child's ru_maxrss, so a bench parent that just wrote 2 GB would inflate every number.
_WRAPPER = """
import runpy, sys
def _hwm():
  for line in open('/proc/self/status'):
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) * 1024
module, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
  if module != '-':
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  else:
    import gemma2_jax.convert  # noqa: F401
except SystemExit as e:
  code = e.code or 0
print(f'VMHWM {_hwm()}', file=sys.stderr)
sys.exit(code)
"""


def _run(module: str, *args: str) -> tuple[int, int, float, str]:
  """(exit code, peak RSS bytes, seconds, stderr tail) of one fresh process."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", _WRAPPER, module, *args], capture_output=True,
                        text=True)
  secs = time.perf_counter() - start
  lines = proc.stderr.splitlines()
  peak = next((int(l.split()[1]) for l in reversed(lines) if l.startswith("VMHWM ")), -1)
  return proc.returncode, peak, secs, proc.stderr[-2000:]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=None,
                      help="where the checkpoints go (default: a tempdir)")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=128_000)
  parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes: a seconds-long check that the script runs (tests/test_scripts.py)")
  args = parser.parse_args(argv)
  if args.smoke:
    parser.set_defaults(layers=2, d_model=64, vocab=512)
    args = parser.parse_args(argv)

  cfg = ModelConfig(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model,
                    num_heads=8, num_kv_heads=4, head_dim=256, ffn_dim=4 * args.d_model,
                    query_pre_attn_scalar=256)
  root = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir))
  try:
    t0 = time.perf_counter()
    write_synthetic_hf(root / "hf", cfg)
    secs = time.perf_counter() - t0
    print(f"synthetic HF checkpoint: {cfg.num_params() / 1e6:.0f}M params, "
          f"{_dir_bytes(root / 'hf') / 1e9:.2f} GB fp32, written in {secs:.0f} s", flush=True)
    rc, base_rss, _, tail = _run("-")
    assert rc == 0, tail
    steps = [("HF -> native", "hf", "native", "native"), ("native -> HF", "native", "hf2", "hf"),
             ("HF -> Kaggle", "hf", "kaggle", "kaggle"), ("Kaggle -> HF", "kaggle", "hf3", "hf")]
    # A Kaggle tree stores no config and these shapes are no release's: convert is told the config.
    (root / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    rows = []
    for name, src, dst, fmt in steps:
      extra = ["--model_config", str(root / "model_config.json")] if src == "kaggle" else []
      rc, peak, secs, tail = _run("gemma2_jax.convert", "--src", str(root / src), "--dst",
                                  str(root / dst), "--to", fmt, *extra)
      if rc != 0:
        print(f"{name} failed (exit {rc}):\n{tail}", file=sys.stderr)
        return 1
      size = max(_dir_bytes(root / src), _dir_bytes(root / dst))
      rows.append((name, size, peak, secs))
      print(f"  {name}: done in {secs:.0f} s", flush=True)

    print(f"\nbaseline (python + `import gemma2_jax.convert`): peak RSS {base_rss / 1e9:.2f} GB\n")
    head = (f"{'conversion':<14} {'ckpt GB':>8} {'peak RSS GB':>12} {'peak/ckpt':>10} "
            f"{'(peak-base)/ckpt':>17} {'time s':>7}")
    print(head)
    print("-" * len(head))
    for name, size, peak, secs in rows:
      print(f"{name:<14} {size / 1e9:>8.2f} {peak / 1e9:>12.2f} {peak / size:>10.2f} "
            f"{(peak - base_rss) / size:>17.2f} {secs:>7.0f}")
  finally:
    if args.keep:
      print(f"kept {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
