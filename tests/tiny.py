"""The tiny configs several test files build, in one place (a helper module: no tests here; it imports
jax only when a function needs it, so CLI-only test files stay light).

configs/pretrain_tiny.py is the base: `pretrain_tiny()` is its ConfigDict, `tiny_experiment()` that
config shrunk to compile in seconds, `SMALL_MODEL` / `small_model_flags()` the same shrinking for
a `python -m gemma2_jax.train` command line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TOKENIZER = DATA / "ko_sp1024.model"  # 1024 pieces, no chat turn markers

# configs/pretrain_tiny.py's model (4 heads, 2 kv heads) at d_model 32: seconds to compile.
SMALL_MODEL = dict(d_model=32, ffn_dim=64, num_heads=4, num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8,
                   sliding_window=8)


def small_model_flags(**overrides) -> list[str]:
  """SMALL_MODEL (and `overrides`) as `--config.model.*` flags."""
  return [f"--config.model.{k}={v}" for k, v in {**SMALL_MODEL, **overrides}.items()]


def pretrain_tiny():
  """configs/pretrain_tiny.py's `get_config()`, a fresh ConfigDict per call."""
  spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "configs" / "pretrain_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_experiment(**train):
  """pretrain_tiny at SMALL_MODEL with a 256 vocab: 3 steps of 8 x 16 tokens, lr 1e-2, no tokenizer;
  `train` overrides the train section."""
  c = pretrain_tiny()
  c.model.update(dict(vocab_size=256, **SMALL_MODEL))
  c.train.update({**dict(steps=3, global_batch=8, seq_len=16, loss_chunk=8, progress_bar=False),
                  **train})
  c.optimizer.warmup_steps = 1
  c.optimizer.learning_rate = 1e-2
  c.data.tokenizer = ""
  return c


def experiment_from(c, num_devices):
  """The Experiment of config `c` on `num_devices` devices; a placeholder tokenizer (never read)."""
  from gemma2_jax.training.experiment import from_config

  c = c.copy_and_resolve_references()
  c.data.tokenizer = "unused"
  return from_config(c, num_devices=num_devices)


def synthetic_batches(n, B=8, T=16, vocab=256, seed=0):
  """`n` random batches of two packed documents per row, the first row ending in 3 padding tokens."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    tokens = rng.randint(3, vocab, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2
    seg[0, -3:] = 0
    mask = ((seg != 0) & (np.roll(seg, -1, 1) == seg)).astype(np.float32)
    mask[:, -1] = 1.0 * (seg[:, -1] != 0)
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0)
    out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos.astype(np.int32),
                "segment_ids": seg, "loss_mask": mask})
  return out


def random_params(cfg, seed=0):
  """Host-side random params (no init compile): fast for tests that do not test init itself."""
  import jax
  import jax.numpy as jnp

  from gemma2_jax.model.transformer import param_shapes

  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.randn(*s).astype(np.float32) * 0.2),
                      param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
