"""A tiny student distilled from the tiny teacher that configs/pretrain_tiny.py trains (CPU demo).

  python -m gemma2_jax.train --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m gemma2_jax.train --config=configs/distill_tiny.py --workdir=runs/distill_tiny

The teacher (d=128, 4 layers) is read from the HF export of that run; the student (d=64, 2 layers)
minimizes the Gemma 2 objective (soft cross-entropy against the teacher's full distribution). A minute
or two on 2 CPU cores. scripts/distill_demo.py runs both plus the same student with CE alone and
prints the comparison: the distilled student reaches a lower eval loss at the same step.
"""

import importlib.util
from pathlib import Path

from gemma2_jax.model.config import tiny
from gemma2_jax.training.experiment import distill_config

ROOT = Path(__file__).resolve().parents[1]


def _teacher_run_config():
  spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "configs" / "pretrain_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  student = tiny(vocab_size=1024, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 ffn_dim=128, query_pre_attn_scalar=16, sliding_window=64)
  c = distill_config(student, str(ROOT / "runs" / "pretrain_tiny" / "hf_step200"), steps=150,
                     global_batch=8, seq_len=128, log_every=25, eval_every=50, eval_batches=4,
                     loss_chunk=64)
  c.teacher.dtype = "float32"
  c.distill.loss = "soft_ce"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.end_learning_rate = 3e-4
  c.optimizer.warmup_steps = 15
  c.optimizer.weight_decay = 0.01
  c.data = _teacher_run_config().data  # the teacher's corpus, tokenizer and held-out bill
  return c
