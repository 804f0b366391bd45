"""Gemma 2 post-training, step 1: SFT of a 9B student on teacher-written chat data, distilled online
from the 27B teacher on the same tokens, with some pre-training text mixed in.

  # the teacher writes the responses (batched, sharded, resumable; run it again to resume):
  python -m gemma2_jax.sample --checkpoint=/ckpt/gemma-2-27b-it --prompts=prompts.jsonl --chat \
      --temperature=0.7 --max_new_tokens=1024 --output=gs://BUCKET/sft/teacher.jsonl --distributed
  python -m gemma2_jax.train --config=configs/sft_distill_9b.py --workdir=gs://BUCKET/runs/sft_9b \
      --config.init_from=/ckpt/gemma-2-9b \
      --config.teacher.checkpoint=/ckpt/gemma-2-27b-it \
      --config.data.tokenizer=/ckpt/gemma-2-27b-it/tokenizer.model --distributed

Data: 90% of rows are conversations (the sampler's output: `prompt` + `completion`, or any JSONL
with `messages`), rendered with Gemma's chat template and packed whole, several to a row; only
the model turns (their text and `<end_of_turn>`) carry loss. 10% are plain pre-training text (to keep
what the base model knows). The loss is 0.5 x soft cross-entropy against the teacher's full
distribution + 0.5 x cross-entropy on the responses (Gemma 2 report, section 4: SFT on mostly
teacher-generated responses, distilled from the teacher). Sized for a TPU v5p-256 slice (128 chips),
one 8k row per chip per micro-batch, 4 micro-batches. Checked ahead of time on this CPU:
  python -m gemma2_jax.aot --config=configs/sft_distill_9b.py --topology=v5p:4x4x8 \
      --config.teacher.preset=gemma2_27b
-> 38.5 GiB peak per chip of 95 (eval 3.6).
Then continue on-policy with configs/onpolicy_distill_9b.py.
"""

from gemma2_jax.model.config import gemma2_9b
from gemma2_jax.training.experiment import distill_config


def get_config():
  student = gemma2_9b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                      remat="save_dots")
  c = distill_config(student, "/ckpt/gemma-2-27b-it", steps=20_000, global_batch=512,
                     seq_len=8192, grad_accum_steps=4, loss_chunk=1024, log_every=20,
                     eval_every=1000, eval_batches=16)
  c.init_from = "/ckpt/gemma-2-9b"
  c.teacher.dtype = "bfloat16"
  c.distill.loss = "soft_ce"
  c.distill.alpha = 0.5
  c.optimizer.learning_rate = 2e-5
  c.optimizer.end_learning_rate = 2e-6
  c.optimizer.warmup_steps = 500
  c.data.tokenizer = "/ckpt/gemma-2-27b-it/tokenizer.model"
  source = dict(c.data.train.sources[0])
  c.data.train.sources = [
    {**source, "name": "chat", "paths": ["gs://BUCKET/sft/*.jsonl"], "format": "jsonl",
     "chat": True, "weight": 0.9},
    {**source, "name": "text", "paths": ["gs://BUCKET/corpus/*.jsonl"], "format": "jsonl",
     "weight": 0.1},
  ]
  c.data.eval = dict(c.data.train)
  c.data.eval.sources = [{**source, "name": "chat_eval", "paths": ["gs://BUCKET/sft_eval/*.jsonl"],
                          "format": "jsonl", "chat": True}]
  # Checkpoints: every 500 steps or 30 minutes, whichever comes first; the last 3 kept, and a
  # milestone every 5000 steps kept for good.
  c.checkpoint.update(save_every=500, save_every_minutes=30, keep_last=3, keep_every=5000)
  return c
