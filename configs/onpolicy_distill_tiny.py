"""A tiny student distilled on-policy (GKD) from the quickstart's tiny teacher (CPU demo).

  python -m gemma2_jax.train --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m gemma2_jax.train --config=configs/onpolicy_distill_tiny.py --workdir=runs/onpolicy_tiny

The first command trains the teacher (about a minute; it writes runs/pretrain_tiny/hf_step200, the
path below; point --config.teacher.checkpoint elsewhere for another teacher, e.g. the SFT teacher of
scripts/post_train_demo.py). The data is tests/data/ko_instruct.jsonl: Korean prompt / response pairs
cut from the shipped sample, one conversation per row (chat=True, pack=False). At every step
(onpolicy_lambda = 1) the student writes its own reply to each prompt inside the jitted step (up to
64 tokens at temperature 1, ending at `<end_of_turn>`), the frozen teacher scores prompt + reply, and
the student minimizes the reverse KL to the teacher on its reply tokens only. Set
--config.distill.onpolicy_lambda=0 for off-policy KD on the dataset's replies (same data and steps);
values in between mix per step. Metrics: kd, kl_t1, onpolicy_fraction, gen_length_mean,
gen_tokens_per_s.
"""

import importlib.util
from pathlib import Path

from gemma2_jax.experiment import distill_config
from gemma2_jax.model.config import tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _teacher_run_config():
  spec = importlib.util.spec_from_file_location("pretrain_tiny", ROOT / "configs" / "pretrain_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  student = tiny(vocab_size=1024, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 ffn_dim=128, query_pre_attn_scalar=16, sliding_window=64)
  c = distill_config(student, str(ROOT / "runs" / "pretrain_tiny" / "hf_step200"), steps=100,
                     global_batch=8, seq_len=128, log_every=10, eval_every=0, loss_chunk=64)
  c.teacher.dtype = "float32"
  c.distill.loss = "reverse_kl"
  c.distill.onpolicy_lambda = 1.0
  c.distill.onpolicy_max_new_tokens = 64
  c.distill.onpolicy_temperature = 1.0
  c.optimizer.learning_rate = 3e-3
  c.optimizer.end_learning_rate = 3e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.01
  c.data.tokenizer = _teacher_run_config().data.tokenizer  # the teacher's
  c.data.train.paths = str(DATA / "ko_instruct.jsonl")
  c.data.train.format = "jsonl"
  c.data.train.chat = True
  c.data.train.pack = False
  return c
