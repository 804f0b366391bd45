"""LoRA fine-tuning of the official Gemma 2 9B on Korean instructions, on one accelerator.

  python -m gemma2_jax.train --config=configs/lora_ko_9b.py --workdir=runs/lora_ko_9b \
      --config.init_from=/ckpt/gemma-2-9b \
      --config.data.tokenizer=/ckpt/gemma-2-9b/tokenizer.model \
      --config.data.train.paths='/data/ko_sft/*.jsonl' --config.data.eval.paths='/data/ko_sft_eval/*.jsonl'

Full fine-tuning with AdamW and fp32 params needs ~16 bytes per parameter (148 GB for the 9B); here
the 9B is frozen in bfloat16 (18.5 GB, read from init_from at every (re)start) and only rank-16
adapters on all seven projections of every layer train (alpha 32, dropout 0.05: 54 M params, fp32,
with AdamW's moments 0.65 GB). The data are chat conversations (`messages`, or `prompt` +
`completion`), rendered with Gemma's chat template and packed, CE on the model turns; rows of 8192
tokens, 16 per step in 16 micro-batches of one row (remat full). Learning rate 2e-4 -> 2e-5
(cosine) after 100 warmup steps, no weight decay. Checked ahead of time on a CPU host for one TPU v6e
chip (32 GiB):
  python -m gemma2_jax.aot --config=configs/lora_ko_9b.py --topology=v6e:1x1
-> 26.94 GiB peak (17.82 of arguments: the base, the adapters and their AdamW state). QLoRA (the
base's projections in 4-bit NF4, 4.4 GiB, dequantized inside each layer as it runs):
--config.lora.quantize=nf4 -> 16.85 GiB peak at 8k; with --config.model.remat=offload as well (each
layer pair's saved input, the fp32 residual stream, kept in host memory until the backward) 13.85 GiB:
fits a 16 GiB v5e chip (--topology=v5e:1x1) or a 24 GB GPU at 8k tokens per row.
The workdir gets checkpoints of the adapters and their optimizer state (resumable: re-run the same
command), then peft_step2000/ (a PEFT adapter for HF transformers' Gemma2ForCausalLM) and
hf_step2000/ (the merged weights, bfloat16).
"""

from gemma2_jax.model.config import gemma2_9b
from gemma2_jax.training.experiment import lora_config

NUM_DEVICES = 1  # what this config is sized for (tests/test_configs.py reads it)


def get_config():
  model = gemma2_9b(dtype="bfloat16", attention_impl="auto", attention_block_size=512, remat="full")
  c = lora_config(model, "/ckpt/gemma-2-9b", steps=2000, global_batch=16, seq_len=8192,
                  grad_accum_steps=16, loss_chunk=1024, log_every=10, eval_every=250, eval_batches=8)
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.05
  c.lora.targets = ["all"]
  c.lora.base_dtype = "bfloat16"
  c.optimizer.learning_rate = 2e-4
  c.optimizer.end_learning_rate = 2e-5
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  c.data.tokenizer = "/ckpt/gemma-2-9b/tokenizer.model"
  c.data.train.update(paths="/data/ko_sft/*.jsonl", format="jsonl", chat=True)
  c.data.eval = dict(c.data.train)
  c.data.eval.paths = "/data/ko_sft_eval/*.jsonl"
  return c
