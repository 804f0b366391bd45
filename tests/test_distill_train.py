"""Online distillation in the trainer: the frozen teacher runs inside the step, outside the optimizer."""

import dataclasses

import jax
import numpy as np
import pytest

from gemma2_jax import save_model
from gemma2_jax.checkpoint import CheckpointError
from gemma2_jax.distill.config import DistillConfig, TeacherConfig
from gemma2_jax.model import Transformer
from gemma2_jax.parallel.sharding import make_mesh
from gemma2_jax.training import modes, programs
from gemma2_jax.training.loop import Trainer
from gemma2_jax.training.state import init_state, to_global
from tests.tiny import TOKENIZER, experiment_from, synthetic_batches, tiny_experiment


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """A student-sized and a bigger teacher checkpoint (native), same vocab."""
  tmp = tmp_path_factory.mktemp("distill")
  exp = experiment_from(tiny_experiment(), 8)
  student_cfg = exp.model
  teacher_cfg = student_cfg.replace(num_layers=4, d_model=48, ffn_dim=96)
  from gemma2_jax.model.transformer import init_params
  paths = {}
  for name, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
    paths[name] = save_model(Transformer.from_params(cfg, init_params(cfg, seed=7)), tmp / name,
                             format="native")
  return exp, paths


def _distill_exp(exp, teacher_path, mesh, **distill):
  return dataclasses.replace(
    exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1, **mesh},
    teacher=TeacherConfig(checkpoint=str(teacher_path), dtype="float32"),
    distill=DistillConfig(**distill))


def _step(exp, n_devices, init_from=""):
  exp = dataclasses.replace(exp, init_from=str(init_from))
  mesh = make_mesh(exp.mesh, jax.devices()[:n_devices])
  mode = modes.for_experiment(exp)
  step = programs.train_program(exp, mode, mesh)
  state = init_state(exp, step.tx, step.shardings)
  return state, step, mode.load_teacher(mesh), step.shardings


def test_teacher_equal_to_student_gives_zero_kl_and_zero_gradient(checkpoints):
  exp, paths = checkpoints
  exp = _distill_exp(exp, paths["student"], {}, loss="forward_kl", alpha=1.0)
  state, step, teacher_params, sh = _step(exp, 1, init_from=paths["student"])
  _, m = step(state, to_global(synthetic_batches(1)[0], sh), teacher_params)
  assert abs(float(m["kl_t1"])) < 1e-6 and abs(float(m["kd"])) < 1e-6
  assert float(m["grad_norm"]) < 1e-6
  assert float(m["top1_agreement"]) == 1.0


def test_online_distillation_sharded_teacher_not_in_optimizer(checkpoints):
  exp, paths = checkpoints
  exp = _distill_exp(exp, paths["teacher"], {"fsdp": 4, "tensor": 2}, loss="soft_ce", alpha=0.5,
                     temperature=2.0, temperature_end=1.0, temperature_steps=2)
  state, step, teacher_params, sh = _step(exp, 8)
  emb = teacher_params["embedder"]["input_embedding"]
  assert emb.shape[1] == 48 and len(emb.sharding.device_set) == 8
  assert jax.tree.map(np.shape, state.params) != jax.tree.map(np.shape, teacher_params)
  assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(state.params)
  losses, temps = [], []
  for batch in synthetic_batches(3):
    state, m = step(state, to_global(batch, sh), teacher_params)
    losses.append(float(m["loss"]))
    temps.append(float(m["temperature"]))
    for key in ("kd", "ce", "teacher_ce", "kl_t1", "top1_agreement", "alpha"):
      assert np.isfinite(float(m[key])), key
  assert temps == [2.0, 1.5, 1.0]
  assert np.all(np.isfinite(losses))


def test_teacher_vocab_must_match(checkpoints, tmp_path):
  exp, paths = checkpoints
  from gemma2_jax.model.transformer import init_params
  other = exp.model.replace(vocab_size=exp.model.vocab_size + 8)
  path = save_model(Transformer.from_params(other, init_params(other)), tmp_path / "t",
                    format="native")
  exp = _distill_exp(exp, path, {})
  with pytest.raises(CheckpointError, match="teacher vocab_size 264 != student vocab_size 256"):
    modes.teacher_model_config(exp)


def test_distill_cli_run_end_to_end(checkpoints, tmp_path):
  """The training loop with an online teacher: runs, logs the distillation metrics, exports."""
  exp, paths = checkpoints
  c = tiny_experiment(steps=3, log_every=1)
  c.data.tokenizer = str(TOKENIZER)
  teacher_cfg = exp.model.replace(vocab_size=1024, num_layers=2)
  from gemma2_jax.model.transformer import init_params
  teacher = save_model(Transformer.from_params(teacher_cfg, init_params(teacher_cfg)),
                       tmp_path / "teacher", format="hf")
  from gemma2_jax.training.experiment import from_config
  c.model.vocab_size = 1024
  c.unlock()
  c.teacher = {"checkpoint": str(teacher), "dtype": "float32"}
  c.distill = {"loss": "jsd", "beta": 0.5}
  dexp = from_config(c, num_devices=jax.device_count())
  dexp = dataclasses.replace(dexp, mesh={"dcn": 1, "data": 2, "fsdp": 4, "tensor": 1})
  summary = Trainer(dexp, tmp_path / "run").run()
  assert {"kd", "kl_t1", "top1_agreement", "teacher_ce", "eval_loss"} <= set(summary)
  assert (tmp_path / "run" / "hf_step3" / "model.safetensors").exists()


def test_hf_teacher_with_real_rows_only_is_padded_to_the_student_vocab(checkpoints, tmp_path):
  """HF checkpoints store the 256000 real rows of a 256128-row vocab: the teacher loads padded."""
  exp, _ = checkpoints
  from gemma2_jax.model.transformer import init_params
  student = exp.model.replace(num_real_tokens=exp.model.vocab_size - 8)
  params = init_params(student, seed=3)
  native = save_model(Transformer.from_params(student, params), tmp_path / "native", format="native")
  hf = save_model(Transformer.from_params(student, params), tmp_path / "hf", format="hf")
  import json
  assert json.loads((hf / "config.json").read_text())["vocab_size"] == student.num_real_tokens
  exp = _distill_exp(dataclasses.replace(exp, model=student), hf, {"fsdp": 2}, loss="forward_kl",
                     alpha=1.0)
  mode = modes.for_experiment(exp)
  teacher_cfg, teacher_params = mode.teacher_cfg, mode.load_teacher(make_mesh(exp.mesh, jax.devices()[:2]))
  emb = np.asarray(teacher_params["embedder"]["input_embedding"])
  assert teacher_cfg.vocab_size == student.vocab_size and emb.shape[0] == student.vocab_size
  np.testing.assert_array_equal(emb[:student.num_real_tokens],
                                np.asarray(params["embedder"]["input_embedding"])[:-8])
  assert not emb[student.num_real_tokens:].any()
  # The same weights as the student: the padded teacher's distribution is the student's.
  state, step, teacher_params, sh = _step(exp, 2, init_from=native)
  batch = synthetic_batches(1, vocab=student.num_real_tokens)[0]  # padding ids never occur as input
  _, m = step(state, to_global(batch, sh), teacher_params)
  assert abs(float(m["kl_t1"])) < 1e-6 and float(m["top1_agreement"]) == 1.0
