"""Gemma 2 9B pre-trained from scratch at 8k context.

  python -m gemma2_jax.train --config=configs/pretrain_9b.py --workdir=gs://BUCKET/runs/pretrain_9b \
      --config.data.train.paths='gs://BUCKET/corpus/*.jsonl' \
      --config.data.tokenizer=/ckpt/gemma/tokenizer.model

Sized for a TPU v5p-128 slice (64 chips): FSDP over all chips, bf16 compute, splash attention on TPU
(attention_impl="auto"), remat of everything but the matmuls, 16 micro-batches of one sequence per
chip. `python -m gemma2_jax.aot --config=configs/pretrain_9b.py --topology=v5p:4x4x4`: 36.0 GiB peak
per chip of 95 (55.9 with the XLA blockwise attention). Expect the loss curve of the 2B config shifted
down by ~0.3 nats.
"""

from gemma2_jax.model.config import gemma2_9b
from gemma2_jax.training.experiment import base_config, set_corpus


def get_config():
  model = gemma2_9b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                    remat="save_dots")
  c = base_config(model, steps=500_000, global_batch=1024, seq_len=8192, grad_accum_steps=16,
                  loss_chunk=1024, log_every=50, eval_every=2000, eval_batches=32)
  c.optimizer.learning_rate = 2e-4
  c.optimizer.end_learning_rate = 2e-5
  c.optimizer.warmup_steps = 2000
  set_corpus(c, tokenizer="/ckpt/gemma/tokenizer.model", train="gs://BUCKET/corpus/*.jsonl", fmt="jsonl")
  return c
