"""The programs `aot` compiles are the programs `train` runs: for a tiny config of each mode (CE, online
KD, offline KD, on-policy KD), the train and eval steps lowered by the trainer from its real inputs (its
initial state, its first batch as the loop hands it over, the loaded teacher) give the same StableHLO as
`aot`'s lowering from abstract inputs; likewise teacher_logits' step."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gemma2_jax import save_model
from gemma2_jax.model import Transformer
from gemma2_jax.model.transformer import init_params
from gemma2_jax.parallel.sharding import host_to_global
from gemma2_jax.training import modes, preflight, programs
from gemma2_jax.training.experiment import apply_overrides, from_config, load_config_file
from gemma2_jax.training.loop import Trainer
from gemma2_jax.training.state import init_state, to_global

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train.steps": "2", "train.global_batch": "8", "train.seq_len": "32", "train.loss_chunk": "16",
         "train.eval_batches": "1", "train.progress_bar": "False"}


def _hash(lowered) -> str:
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A tiny random teacher on the tiny configs' 1024-piece tokenizer (native checkpoint)."""
  exp = from_config(apply_overrides(load_config_file(str(ROOT / "configs" / "distill_tiny.py")), SMALL),
                    num_devices=1)
  cfg = exp.model.replace(num_layers=2, d_model=32, ffn_dim=64, head_dim=8, query_pre_attn_scalar=8)
  return save_model(Transformer.from_params(cfg, init_params(cfg, seed=3)),
                    tmp_path_factory.mktemp("teacher") / "t", format="native")


@pytest.fixture(scope="module")
def records(tmp_path_factory, teacher):
  """The teacher's top-16 records of the tiny corpus (python -m gemma2_jax.teacher_logits)."""
  out = tmp_path_factory.mktemp("records") / "topk"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  overrides = [f"--config.{k}={v}" for k, v in SMALL.items()]
  r = subprocess.run([sys.executable, "-m", "gemma2_jax.teacher_logits", "--config=configs/distill_tiny.py",
                      f"--config.teacher.checkpoint={teacher}", *overrides, f"--output_dir={out}",
                      "--topk=16", "--max_rows=8", "--no_progress"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  return out


CASES = {
  "ce": ("pretrain_tiny.py", {}),
  "online": ("distill_tiny.py", {}),
  "offline": ("distill_tiny.py", {"teacher.checkpoint": ""}),
  "onpolicy": ("onpolicy_distill_tiny.py", {"distill.onpolicy_max_new_tokens": "8"}),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_aot_lowers_what_the_trainer_runs(mode, teacher, records, tmp_path):
  config, extra = CASES[mode]
  overrides = {**SMALL, "teacher.checkpoint": str(teacher), **extra}
  if mode == "ce":
    overrides.pop("teacher.checkpoint")
  if mode == "offline":
    overrides["distill.offline_paths"] = str(records)
  exp = from_config(apply_overrides(load_config_file(str(ROOT / "configs" / config)), overrides),
                    num_devices=jax.device_count())
  trainer = Trainer(exp, tmp_path / "run")
  try:
    assert trainer.mode.name == {"onpolicy": "online"}.get(mode, mode)
    state = init_state(exp, trainer.tx, trainer.sh)  # what restore_or_init starts from
    host = next(trainer.train_iter)
    # The eval step's rows as the loop converts them (eval batches carry each target's bytes).
    eval_batch = to_global(modes.EVAL_BATCH.host({**host, "target_bytes": host["targets"]}), trainer.sh)
    with trainer.train_step.context():
      ran = trainer.train_step.fn.lower(state, trainer.global_batch(host), trainer.teacher_params)
      eval_ran = trainer.eval_step.fn.lower(state.params, eval_batch)
    if mode == "online":  # teacher_logits' step on the loaded teacher, as that command builds it
      topk = programs.topk_program(exp, modes.teacher_model_config(exp), trainer.mesh, 16)
      rows = host_to_global(np.zeros((topk.rows, exp.train.seq_len), np.int32), topk.batch_sharding)
      with topk.context():
        topk_ran = topk.fn.lower(trainer.teacher_params, rows, rows, rows)
  finally:
    trainer.train_iter.close()
  aot = {p.name: p for p in preflight.job_programs(exp, jax.devices(), topk=16)}
  assert _hash(ran) == _hash(aot["train step"].lower())
  assert _hash(eval_ran) == _hash(aot["eval step"].lower())
  if mode == "onpolicy":  # the student samples inside the step: the decode loop is in both
    assert "stablehlo.while" in ran.as_text()
  if mode == "online":
    assert _hash(topk_ran) == _hash(aot["teacher_logits step"].lower())
  assert set(aot) == {"train step", "eval step"} | ({"teacher_logits step"} if exp.teacher else set())


def test_host_batches_take_the_programs_dtypes():
  """The loop converts every host batch to the mode's batch spec: a pipeline that yields int64 or
  float64 rows still feeds the compiled program (no retrace, no other program)."""
  spec = modes.TEXT_BATCH
  rows = {k: np.zeros((2, 4), np.int64) for k in spec.keys} | {"extra": np.zeros((2, 4))}
  host = spec.host(rows)
  assert list(host) == list(spec.keys)
  assert {k: v.dtype for k, v in host.items()} == {f.name: np.dtype(f.dtype) for f in spec.fields}
