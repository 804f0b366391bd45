"""The frozen teacher: its runtime config, shardings, and sharded load."""

from __future__ import annotations

from gemma2_jax import checkpoint
from gemma2_jax.distill.config import TeacherConfig
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.model.transformer import LOGICAL_AXES
from gemma2_jax.parallel.sharding import logical_to_sharding, normalize_rules


def teacher_runtime_config(teacher: TeacherConfig, student: ModelConfig, cfg: ModelConfig) -> ModelConfig:
  """The teacher's checkpoint config `cfg`, run with the student's attention settings and no remat.

  An HF teacher stores only the real rows (256000) of the student's padded vocab (256128): it is
  loaded with the padding rows (zeros, masked out of the logits like the student's).
  """
  if cfg.vocab_size == student.num_real_tokens and cfg.vocab_size < student.vocab_size:
    cfg = cfg.replace(vocab_size=student.vocab_size)
  if cfg.vocab_size != student.vocab_size:
    raise checkpoint.CheckpointError(
      f"teacher vocab_size {cfg.vocab_size} != student vocab_size {student.vocab_size}: distillation "
      "needs one tokenizer on both sides")
  return cfg.replace(dtype=teacher.dtype, param_dtype=teacher.dtype,
                     attention_impl=student.attention_impl,
                     attention_block_size=student.attention_block_size, remat="none",
                     num_real_tokens=student.num_real_tokens)


def teacher_shardings(teacher: TeacherConfig | None, student_rules, mesh) -> dict:
  """The teacher's param shardings: its own rules, or the student's (also for a teacher given as
  params rather than a TeacherConfig)."""
  rules = (teacher and teacher.sharding_rules) or student_rules
  return logical_to_sharding(LOGICAL_AXES, mesh, normalize_rules(rules))


def load_teacher(teacher: TeacherConfig, cfg: ModelConfig, student_rules, mesh) -> dict:
  """The frozen teacher's params (runtime config `cfg`), each process reading only its shards."""
  _, params = checkpoint.load_sharded(teacher.checkpoint, teacher.dtype,
                                      teacher_shardings(teacher, student_rules, mesh), config=cfg)
  return params
