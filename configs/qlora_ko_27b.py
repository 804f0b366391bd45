"""QLoRA fine-tuning of the official Gemma 2 27B on Korean instructions, on one accelerator.

  python -m gemma2_jax.train --config=configs/qlora_ko_27b.py --workdir=runs/qlora_ko_27b \
      --config.init_from=/ckpt/gemma-2-27b \
      --config.data.tokenizer=/ckpt/gemma-2-27b/tokenizer.model \
      --config.data.train.paths='/data/ko_sft/*.jsonl' --config.data.eval.paths='/data/ko_sft_eval/*.jsonl'

configs/lora_ko_9b.py's recipe on the 27B: the base frozen with its projections in 4-bit NF4 (64
weights per scale, dequantized inside each layer as it runs: ~14 GB for the 27B's 26 B projection
weights; the embedding and norms in bfloat16, 2.4 GB) and rank-16 adapters on all seven projections
of every layer training in fp32 (alpha 32, dropout 0.05), with AdamW's moments for those alone.
Chat conversations rendered with Gemma's chat template, packed, CE on the model turns; rows of
8192 tokens, 16 per step in 16 micro-batches of one row; remat "offload": full remat, with each layer
pair's saved input (the fp32 residual stream, 23 x 8192 x 4608 x 4 B = 3.5 GB per row) kept in host
memory until the backward needs it. Learning rate 1e-4 -> 1e-5 (cosine) after 100 warmup steps, no
weight decay. Checked ahead of time on a CPU host:
  python -m gemma2_jax.aot --config=configs/qlora_ko_27b.py --topology=v5p:1x1x1
-> 38.73 GiB peak (17.12 of arguments: the NF4 base with its bf16 embedding and norms, the adapters
and their AdamW state; 21.61 of temporaries): an A100-40GB at 8k tokens per row. With
--config.model.remat=full (nothing on the host) 43.29 GiB: a 48 GB GPU or a v5p chip. The workdir
gets checkpoints of the adapters and their optimizer state (resumable: re-run the same command),
then peft_step2000/ and hf_step2000/ (merged, bfloat16).
"""

from gemma2_jax.model.config import gemma2_27b
from gemma2_jax.training.experiment import lora_config

NUM_DEVICES = 1  # what this config is sized for (tests/test_configs.py reads it)


def get_config():
  model = gemma2_27b(dtype="bfloat16", attention_impl="auto", attention_block_size=512,
                     remat="offload")
  c = lora_config(model, "/ckpt/gemma-2-27b", steps=2000, global_batch=16, seq_len=8192,
                  grad_accum_steps=16, loss_chunk=1024, log_every=10, eval_every=250, eval_batches=8)
  c.lora.update(rank=16, alpha=32.0, dropout=0.05, targets=["all"], base_dtype="bfloat16",
                quantize="nf4", quant_block=64)
  c.optimizer.update(learning_rate=1e-4, end_learning_rate=1e-5, schedule="cosine", warmup_steps=100,
                     weight_decay=0.0)
  c.data.tokenizer = "/ckpt/gemma-2-27b/tokenizer.model"
  c.data.train.update(paths="/data/ko_sft/*.jsonl", format="jsonl", chat=True)
  c.data.eval = dict(c.data.train)
  c.data.eval.paths = "/data/ko_sft_eval/*.jsonl"
  return c
