"""LoRA on the tiny pre-trained model (CPU demo): its frozen weights plus rank-8 adapters on every
projection, fine-tuned (SFT) on Korean instructions.

  python -m gemma2_jax.train --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m gemma2_jax.train --config=configs/lora_tiny.py --workdir=runs/lora_tiny

The first command trains the base (about a minute; it writes runs/pretrain_tiny/hf_step200, the
`init_from` below: any HF, native or Kaggle checkpoint, or a training workdir, of this model will do).
The LoRA run reads it on every (re)start, frozen, and trains only the adapters (66 k of the model's
724 k params; AdamW's moments exist for those alone) on tests/data/ko_instruct.jsonl with CE on the
responses, for 100 steps of 8 x 128 tokens (about a minute on 2 cores); the held-out eval loss
(tests/data/ko_instruct_eval.jsonl) goes from the base's 4.08 to about 2.80 (bits per byte 1.65 ->
1.13). Checkpoints hold the adapters, their optimizer state and the config (whose init_from points at
the base); re-running resumes. At the end the workdir holds peft_step100/ (a PEFT adapter: load it
with peft's PeftModel.from_pretrained on the HF base) and hf_step100/ (base + adapter merged).
QLoRA: --config.lora.quantize=nf4 --config.lora.quant_block=32 (this model's head_dim is 32), or int8.
"""

import importlib.util
from pathlib import Path

from gemma2_jax.model.config import ModelConfig
from gemma2_jax.training.experiment import lora_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _pretrain_tiny():
  spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "configs" / "pretrain_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  model = ModelConfig(**_pretrain_tiny().model.to_dict())
  c = lora_config(model, str(ROOT / "runs" / "pretrain_tiny" / "hf_step200"), steps=100, global_batch=8,
                  seq_len=128, log_every=10, eval_every=50, eval_batches=4, loss_chunk=64)
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.base_dtype = "float32"  # CPU: fp32 compute; bfloat16 (the default) on accelerators
  c.optimizer.learning_rate = 2e-3
  c.optimizer.end_learning_rate = 2e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.0
  c.data.tokenizer = str(DATA / "ko_sp1024_chat.model")
  c.data.train.update(paths=str(DATA / "ko_instruct.jsonl"), format="jsonl", chat=True)
  c.data.eval = dict(c.data.train)
  c.data.eval.paths = str(DATA / "ko_instruct_eval.jsonl")
  return c
