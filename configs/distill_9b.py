"""Gemma 2 recipe: a 9B student distilled online from a frozen 27B teacher at 8k context.

  python -m gemma2_jax.train --config=configs/distill_9b.py --workdir=gs://BUCKET/runs/distill_9b \
      --config.data.train.paths='gs://BUCKET/corpus/*.jsonl' \
      --config.teacher.checkpoint=/ckpt/gemma-2-27b \
      --config.data.tokenizer=/ckpt/gemma-2-27b/tokenizer.model --distributed

For a big corpus, tokenize once into the bucket with N workers (one command per host, I = 0..N-1;
a killed one is re-run and finishes its missing shards; the last to finish writes meta.json):
  python -m gemma2_jax.prepare_data tokenize --input 'gs://BUCKET/corpus/*.jsonl' \
      --tokenizer /ckpt/gemma-2-27b/tokenizer.model --output_dir gs://BUCKET/tokenized \
      --num_shards 1024 --worker_index $I --worker_count N
then train on the shards: --config.data.train.paths='gs://BUCKET/tokenized/*.array_record*'
--config.data.train.format=arrayrecord. Raw JSONL (as above) suits small corpora and quick
experiments: it is tokenized on the fly, which costs host CPU every epoch.

The student minimizes sum_x -P_T(x|c) log P_S(x|c) over the full 256k vocabulary at every position
(Gemma 2 report, section 3.2). The teacher (bf16, no gradients, no optimizer state) is FSDP-sharded on
the same mesh and runs inside the jitted step; both models' logits are built per 1k-token chunk from
hidden states and recomputed in the backward, so no [B, T, 256k] tensor exists. Both run splash
attention on TPU. Sized for a TPU v5p-256 slice (128 chips; 27B bf16 teacher 54 GB + 9B student fp32
params and AdamW ~150 GB, sharded), one 8k sequence per chip per micro-batch (4 micro-batches).
Checked ahead of time on this CPU:
  python -m gemma2_jax.aot --config=configs/distill_9b.py --topology=v5p:4x4x8 \
      --config.teacher.preset=gemma2_27b
-> 38.5 GiB peak per chip of 95 with libtpu 0.0.52 (44.9 with the pinned 0.0.42; 56.5 with the XLA
blockwise attention). The roofline (README, "Roofline of the released configs") chose 4 micro-batches
and the vocab-parallel loss: the step is compute-bound (10.2 s) either way. The same job fits 8 chips
(v5p:2x2x2) with --config.train.grad_accum_steps=64 (one sequence per chip per micro-batch): 63.4 GiB
(blockwise needed 16 chips); with 32 micro-batches and --config.model.remat=full: 40.1 GiB, at 12%
more FLOPs per step.
Metrics: loss (KD), ce, teacher_ce, kl_t1, top1_agreement; expect kl_t1 to fall fastest in the first
thousand steps and top1_agreement to climb past 0.5.
For offline distillation, write the teacher's top-k once with `python -m gemma2_jax.teacher_logits`
and set --config.distill.offline_paths=DIR --config.teacher.checkpoint=''.
"""

from gemma2_jax.model.config import gemma2_9b
from gemma2_jax.training.experiment import distill_config, set_corpus


def get_config():
  # Token budget: 1,908,000 steps x 512 x 8192 tokens = 8.00T, the Gemma 2 report's 8T
  # for this size. Ours, not published by the report: the learning rate and its schedule, the global
  # batch, AdamW's b1 0.9 / b2 0.95 / eps 1e-8 and weight decay 0.1 (OptimizerConfig's defaults).
  student = gemma2_9b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                      remat="save_dots")
  c = distill_config(student, "/ckpt/gemma-2-27b", steps=1_908_000, global_batch=512, seq_len=8192,
                     grad_accum_steps=4, loss_chunk=1024, log_every=50, eval_every=2000,
                     eval_batches=32)
  c.teacher.dtype = "bfloat16"
  c.distill.loss = "soft_ce"
  c.optimizer.learning_rate = 2e-4
  c.optimizer.end_learning_rate = 2e-5
  c.optimizer.warmup_steps = 2000
  set_corpus(c, tokenizer="/ckpt/gemma-2-27b/tokenizer.model", train="gs://BUCKET/corpus/*.jsonl",
             fmt="jsonl")
  # Checkpoints: every 1000 steps or 30 minutes, whichever comes first; the last 3 kept, and a
  # milestone every 10_000 steps kept for good.
  c.checkpoint.update(save_every=1000, save_every_minutes=30, keep_last=3, keep_every=10_000)
  return c
