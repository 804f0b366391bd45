"""Gemma 2 post-training: a 9B student distilled on-policy (GKD) from a frozen 27B teacher.

  python -m gemma2_jax.train --config=configs/onpolicy_distill_9b.py \
      --workdir=gs://BUCKET/runs/onpolicy_9b \
      --config.init_from=gs://BUCKET/runs/sft_distill_9b/hf_step20000 \
      --config.teacher.checkpoint=/ckpt/gemma-2-27b-it \
      --config.data.train.paths='gs://BUCKET/prompts/*.jsonl' \
      --config.data.tokenizer=/ckpt/gemma-2-27b-it/tokenizer.model --distributed

The report's "distillation from the teacher on the student's distribution" (Agarwal et al. 2024):
the data are chat prompts (JSONL `messages` or `prompt` + `response`; the response is the
off-policy fallback), one conversation per row. With probability onpolicy_lambda = 0.5 per step the
student, from the SFT checkpoint (init_from), samples its own reply to every prompt inside the
jitted step (up to 512 tokens at temperature 1, stopping at `<end_of_turn>`), the teacher scores
prompt + reply, and the student minimizes the generalized JSD (beta 0.5) to the teacher on its reply
tokens; the other steps distill on the dataset's replies. Prompts get 2048 + 1 - 512 = 1537 token
slots; longer ones keep their dataset reply (onpolicy_fraction shows how many rows were sampled).
Sampling gathers the student's FSDP shards once per step (a bf16 copy, 18.5 GB per chip at
tensor=1) and decodes with a KV cache; both models run splash attention on TPU.
Sized for a TPU v5p-256 slice (128 chips): 512 prompts per step in 4 micro-batches, one row per chip
per micro-batch. Checked ahead of time on this CPU:
  python -m gemma2_jax.aot --config=configs/onpolicy_distill_9b.py --topology=v5p:4x4x8 \
      --config.teacher.preset=gemma2_27b
-> 37.4 GiB peak per chip of 95 for the train step with its sampling loop (eval 3.6, teacher_logits
4.8); the sampling phase's gathered bf16 student copy is freed before the backward's peak.
"""

from gemma2_jax.model.config import gemma2_9b
from gemma2_jax.training.experiment import distill_config, set_corpus


def get_config():
  student = gemma2_9b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                      remat="save_dots")
  c = distill_config(student, "/ckpt/gemma-2-27b-it", steps=20_000, global_batch=512,
                     seq_len=2048, grad_accum_steps=4, loss_chunk=1024, log_every=20,
                     eval_every=0)
  c.init_from = "gs://BUCKET/runs/sft_distill_9b/hf_step20000"
  c.teacher.dtype = "bfloat16"
  c.distill.loss = "jsd"
  c.distill.beta = 0.5
  c.distill.onpolicy_lambda = 0.5
  c.distill.onpolicy_max_new_tokens = 512
  c.distill.onpolicy_temperature = 1.0
  c.optimizer.learning_rate = 1e-5
  c.optimizer.end_learning_rate = 1e-6
  c.optimizer.warmup_steps = 200
  set_corpus(c, tokenizer="/ckpt/gemma-2-27b-it/tokenizer.model",
             train="gs://BUCKET/prompts/*.jsonl", fmt="jsonl")
  c.data.train.chat = True
  c.data.train.pack = False
  # Checkpoints: every 500 steps or 30 minutes, whichever comes first; the last 3 kept, and a
  # milestone every 5000 steps kept for good.
  c.checkpoint.update(save_every=500, save_every_minutes=30, keep_last=3, keep_every=5000)
  return c
