"""Gemma-Ko style continued pre-training of all 9.24 B parameters of Gemma 2 9B on ONE device.

  python -m gemma2_jax.train --config=configs/continue_pretrain_ko_9b_lean.py \
      --workdir=runs/gemma2-ko-9b-lean \
      --config.init_from=/ckpt/gemma-2-9b \
      --config.data.tokenizer=/ckpt/gemma-2-9b/tokenizer.model

configs/continue_pretrain_ko_9b.py's recipe (Korean 70% / English 30%, two eval sets, cosine decay to
1e-6 after 500 warmup steps, weight decay 0.1, 8k context) made to fit one 80 GB GPU or one TPU v5p
chip instead of 32 chips. Full AdamW with fp32 params needs 16 bytes per parameter (148 GB before
activations); here:
- the weights are bfloat16 (17.2 GiB) and every update is rounded stochastically (unbiased, so updates
  under bf16's resolution still move the weights on average; the rounding key derives from the step,
  so a resume is bit-exact);
- the optimizer is Adafactor without momentum: factored second moments (a row and a column mean per
  matrix, a few MB) and no first moment, update RMS clipped at 1 per tensor, decoupled weight decay
  scaled by the learning rate as with AdamW. Each step moves by up to lr per weight (RMS), more than
  Adam's momentum-averaged steps on noisy gradients, hence a peak learning rate of 2e-5, 0.4x the
  AdamW recipe's 5e-5: watch eval/ko in the first thousand steps;
- rows of 8192 tokens, 16 per step (131 k tokens) in 16 micro-batches of one row, remat full.
Checked ahead of time on a CPU host for one TPU v5p chip (95 GiB):
  python -m gemma2_jax.aot --config=configs/continue_pretrain_ko_9b_lean.py --topology=v5p:1x1x1
-> 77.00 GiB peak per chip (17.26 of arguments: the bf16 params; 59.74 of temporaries: the gradients,
bf16, accumulated over micro-batches, and activations): under the 80 GB goal. With a bf16 momentum
(--config.optimizer.adafactor_momentum=0.9 --config.optimizer.moment_dtype=bfloat16: Adam with a
rank-1 second moment) 94.22 GiB: fits a v5p chip, not an 80 GB GPU. AdamW with bf16 moments
(--config.optimizer.name=adamw --config.optimizer.moment_dtype=bfloat16) holds 34.5 GiB of moments:
~111 GiB (an estimate; not compiled).
For the full corpora, point data.train.sources at tokenized shards as continue_pretrain_ko_9b.py
describes.
"""

import importlib.util
from pathlib import Path

NUM_DEVICES = 1  # what this config is sized for (tests/test_configs.py reads it)


def get_config():
  # configs/continue_pretrain_ko_9b.py's data, evals, schedule and checkpoints; one device's model,
  # batch and optimizer.
  path = Path(__file__).resolve().with_name("continue_pretrain_ko_9b.py")
  spec = importlib.util.spec_from_file_location("continue_pretrain_ko_9b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.update(param_dtype="bfloat16", remat="full")
  c.train.update(global_batch=16, grad_accum_steps=16, log_every=10, eval_batches=8)
  c.train.benchmarks.every = 0  # lm-eval during training: see continue_pretrain_ko_9b.py to turn on
  c.optimizer.update(name="adafactor", adafactor_momentum=0.0, stochastic_rounding=True,
                     learning_rate=2e-5)
  c.checkpoint.keep_last = 2
  return c
