"""Gemma 2 2B pre-trained from scratch at 8k context (the released architecture).

  python -m gemma2_jax.train --config=configs/pretrain_2b.py --workdir=gs://BUCKET/runs/pretrain_2b \
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

Sized for a TPU v5p-128 slice (64 chips): fp32 params and AdamW state FSDP-sharded over all chips, bf16
compute, splash attention on TPU (attention_impl="auto": local layers visit only the key blocks inside
the window), dot-saving remat, 4 micro-batches of 2 sequences per chip. `python -m gemma2_jax.aot
--config=configs/pretrain_2b.py --topology=v5p:4x4x4`: 27.9 GiB peak per chip of 95 (47.4 with the
XLA blockwise attention). Expect the train loss to fall below ~3 within the first few thousand steps on
web text.
"""

from gemma2_jax.model.config import gemma2_2b
from gemma2_jax.training.experiment import base_config, set_corpus


def get_config():
  # Token budget: 500,000 steps x 512 x 8192 tokens = 2.10T, the Gemma 2 report's 2T
  # for this size. Ours, not published by the report: the learning rate and its schedule, the global
  # batch, AdamW's b1 0.9 / b2 0.95 / eps 1e-8 and weight decay 0.1 (OptimizerConfig's defaults).
  model = gemma2_2b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                    remat="save_dots")
  c = base_config(model, steps=500_000, global_batch=512, seq_len=8192, grad_accum_steps=4,
                  loss_chunk=1024, log_every=50, eval_every=2000, eval_batches=32)
  c.optimizer.learning_rate = 3e-4
  c.optimizer.end_learning_rate = 3e-5
  c.optimizer.warmup_steps = 2000
  set_corpus(c, tokenizer="/ckpt/gemma/tokenizer.model", train="gs://BUCKET/corpus/*.jsonl", fmt="jsonl")
  # Checkpoints: every 1000 steps or 30 minutes, whichever comes first; the last 3 kept, and a
  # milestone every 10_000 steps kept for good.
  c.checkpoint.update(save_every=1000, save_every_minutes=30, keep_last=3, keep_every=10_000)
  return c
