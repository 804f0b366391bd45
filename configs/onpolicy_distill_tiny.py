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

ROOT = Path(__file__).resolve().parents[1]


def get_config():
  # configs/distill_tiny.py's student, teacher and optimizer; chat data and the on-policy settings.
  spec = importlib.util.spec_from_file_location("distill_tiny", ROOT / "configs" / "distill_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.train.update(steps=100, log_every=10, eval_every=0)
  c.distill.loss = "reverse_kl"
  c.distill.onpolicy_lambda = 1.0
  c.distill.onpolicy_max_new_tokens = 64
  c.distill.onpolicy_temperature = 1.0
  c.optimizer.warmup_steps = 10
  c.data.train.update(paths=str(ROOT / "tests" / "data" / "ko_instruct.jsonl"), format="jsonl",
                      chat=True, pack=False)
  c.data.eval = None
  return c
