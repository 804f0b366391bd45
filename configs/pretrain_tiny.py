"""Tiny Gemma 2 pre-trained from scratch on the shipped Korean sample: the CPU smoke run.

  python -m gemma2_jax.train --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny

About a minute on 2 CPU cores: 200 steps of 8 x 128 tokens; the train loss falls from ~7.0 (ln 1024)
to about 1.4 (the sample is small), and eval bits per byte on the held-out bill ends near 2.2.

The tokenizer is tests/data/ko_sp1024_chat.model, which has the chat turn markers, so this teacher
can also be SFT-trained and distilled on chat data (scripts/post_train_demo.py).
"""

from pathlib import Path

from gemma2_jax.model.config import tiny
from gemma2_jax.training.experiment import base_config, set_corpus

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def get_config():
  model = tiny(vocab_size=1024, num_layers=4, d_model=128, num_heads=4, num_kv_heads=2,
               head_dim=32, ffn_dim=256, query_pre_attn_scalar=32, sliding_window=64)
  c = base_config(model, steps=200, global_batch=8, seq_len=128, log_every=20, eval_every=100,
                  eval_batches=4, loss_chunk=64)
  c.optimizer.learning_rate = 3e-3
  c.optimizer.end_learning_rate = 3e-4
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.01
  train_files = sorted(str(p) for p in (DATA / "ko").glob("*.txt") if p.name != "1809899.txt")
  set_corpus(c, tokenizer=str(DATA / "ko_sp1024_chat.model"), train=",".join(train_files), fmt="text",
             eval=str(DATA / "ko" / "1809899.txt"))  # one bill held out
  return c
