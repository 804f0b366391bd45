"""Gemma 2 27B pre-trained from scratch at 8k context (query scale 144^-0.5, 32/16 heads of 128).

  python -m gemma2_jax.train --config=configs/pretrain_27b.py --workdir=gs://BUCKET/runs/pretrain_27b \
      --config.data.train.paths='gs://BUCKET/corpus/*.jsonl' \
      --config.data.tokenizer=/ckpt/gemma/tokenizer.model --distributed

For a big corpus, tokenize once into the bucket with N workers (one command per host, I = 0..N-1;
a killed one is re-run and finishes its missing shards; the last to finish writes meta.json):
  python -m gemma2_jax.prepare_data tokenize --input 'gs://BUCKET/corpus/*.jsonl' \
      --tokenizer /ckpt/gemma/tokenizer.model --output_dir gs://BUCKET/tokenized \
      --num_shards 1024 --worker_index $I --worker_count N
then train on the shards: --config.data.train.paths='gs://BUCKET/tokenized/*.array_record*'
--config.data.train.format=arrayrecord. Raw JSONL (as above) suits small corpora and quick
experiments: it is tokenized on the fly, which costs host CPU every epoch.

Sized for a TPU v5p-256 slice (128 chips): FSDP x 4-way tensor parallelism, bf16 compute, splash
attention on TPU, remat of everything but the matmuls, 16 micro-batches (2 sequences per batch shard).
`python -m gemma2_jax.aot --config=configs/pretrain_27b.py --topology=v5p:4x4x8`: 54.2 GiB peak per
chip of 95. With the XLA blockwise attention it needed full remat (44.9 GiB); with splash, full remat
takes 12.3 GiB but recomputes the forward: 27% more FLOPs per step (16.0 vs 12.6 PFLOP per chip).
"""

from gemma2_jax.model.config import gemma2_27b
from gemma2_jax.training.experiment import base_config, set_corpus


def get_config():
  # Token budget: 1,550,000 steps x 1024 x 8192 tokens = 13.00T, the Gemma 2 report's 13T
  # for this size. Ours, not published by the report: the learning rate and its schedule, the global
  # batch, AdamW's b1 0.9 / b2 0.95 / eps 1e-8 and weight decay 0.1 (OptimizerConfig's defaults).
  model = gemma2_27b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                     remat="save_dots")
  c = base_config(model, steps=1_550_000, global_batch=1024, seq_len=8192, grad_accum_steps=16,
                  loss_chunk=512, log_every=50, eval_every=2000, eval_batches=32)
  c.mesh.tensor = 4
  c.optimizer.learning_rate = 1.5e-4
  c.optimizer.end_learning_rate = 1.5e-5
  c.optimizer.warmup_steps = 2000
  set_corpus(c, tokenizer="/ckpt/gemma/tokenizer.model", train="gs://BUCKET/corpus/*.jsonl", fmt="jsonl")
  # Checkpoints: every 1000 steps or 30 minutes, whichever comes first; the last 3 kept, and a
  # milestone every 10_000 steps kept for good.
  c.checkpoint.update(save_every=1000, save_every_minutes=30, keep_last=3, keep_every=10_000)
  return c
