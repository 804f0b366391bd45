"""The train step: sharded == single device, gradient accumulation exactness, non-finite handling."""

import dataclasses

import jax
import numpy as np
import pytest

from gemma2_jax.parallel.sharding import activation_sharding, make_mesh
from gemma2_jax.training import modes, programs
from gemma2_jax.training.experiment import from_config
from gemma2_jax.training.loop import Trainer, TrainingDiverged
from gemma2_jax.training.optim import make_optimizer
from gemma2_jax.training.state import init_state, state_shardings, to_global
from tests.tiny import TOKENIZER, experiment_from, synthetic_batches, tiny_experiment


def run_steps(exp, batches, devices):
  mesh = make_mesh(exp.mesh, devices)
  step = programs.train_program(exp, modes.Mode(exp), mesh)
  sh = step.shardings
  with activation_sharding(mesh, exp.rules):
    state = init_state(exp, step.tx, sh)
    losses = []
    for b in batches:
      state, m = step(state, to_global(b, sh), None)
      losses.append(float(m["loss"]))
  return state, np.array(losses)


@pytest.fixture(scope="module")
def single_device_run():
  exp = experiment_from(tiny_experiment(), 1)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1})
  return run_steps(exp, synthetic_batches(3), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)])
def test_sharded_equals_single_device(single_device_run, mesh):
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
  ref_state, ref_losses = single_device_run
  c = tiny_experiment()
  c.mesh.update({"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1, **mesh})
  exp = experiment_from(c, 8)
  state, losses = run_steps(exp, synthetic_batches(3), jax.devices()[:8])
  assert state.params["layers"]["attn"]["q_einsum"].sharding.mesh.size == 8
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6,
                                                       rtol=1e-4), state.params, ref_state.params)


def test_gradient_accumulation_equals_big_batch(single_device_run):
  ref_state, ref_losses = single_device_run
  exp = experiment_from(tiny_experiment(grad_accum_steps=4), 1)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1})
  state, losses = run_steps(exp, synthetic_batches(3), jax.devices()[:1])
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6,
                                                       rtol=1e-4), state.params, ref_state.params)


def test_loss_mask_weights_tokens():
  """Masked tokens contribute nothing: changing their targets leaves loss and update unchanged."""
  exp = experiment_from(tiny_experiment(steps=1), 1)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1})
  batch = synthetic_batches(1)[0]
  other = {k: v.copy() for k, v in batch.items()}
  other["targets"][batch["loss_mask"] == 0] = 7
  assert (batch["targets"] != other["targets"]).any()
  s1, l1 = run_steps(exp, [batch], jax.devices()[:1])
  s2, l2 = run_steps(exp, [other], jax.devices()[:1])
  np.testing.assert_array_equal(l1, l2)
  jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)


def test_nonfinite_skip_keeps_params():
  exp = experiment_from(tiny_experiment(nonfinite="skip"), 1)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1})
  mesh = make_mesh(exp.mesh, jax.devices()[:1])
  step = programs.train_program(exp, modes.Mode(exp), mesh)
  sh = step.shardings
  state = init_state(exp, step.tx, sh)
  bad = state.replace(params=jax.tree.map(lambda x: x, state.params))
  emb = bad.params["embedder"]["input_embedding"].at[5].set(np.nan)
  bad.params["embedder"]["input_embedding"] = emb
  batch = synthetic_batches(1)[0]
  batch["tokens"][:, 0] = 5
  before = jax.tree.map(np.asarray, bad.params)
  new, metrics = step(bad, to_global(batch, sh), None)
  assert metrics["finite"] == 0 and int(new.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new.params, before)
  # Optax's step counts (which drive its schedule) advance with the step: logged lr == applied lr.
  counts = [int(c) for c in jax.tree.leaves(new.opt_state) if np.issubdtype(c.dtype, np.integer)]
  assert counts and all(c == 1 for c in counts), counts
  moments = [x for x in jax.tree.leaves(new.opt_state) if np.issubdtype(x.dtype, np.floating)]
  assert all(not np.asarray(x).any() for x in moments)  # Adam's moments untouched (still zero)


def test_trainer_stops_on_divergence(tmp_path):
  c = tiny_experiment(steps=6)
  c.data.tokenizer = str(TOKENIZER)
  c.model.vocab_size = 1024
  c.optimizer.learning_rate = 1e38
  c.optimizer.clip_norm = 0.0
  exp = from_config(c, num_devices=jax.device_count())
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 8, "tensor": 1})
  with pytest.raises(TrainingDiverged, match="non-finite loss .* at step"):
    Trainer(exp, tmp_path).run()


def test_batch_keys_match_data_pipeline():
  from gemma2_jax.data import make_train_iterator
  c = tiny_experiment()
  c.data.tokenizer = str(TOKENIZER)
  exp = from_config(c, num_devices=jax.device_count())
  batch = next(make_train_iterator(exp.data_train, tokenizer_path=exp.tokenizer, vocab_size=1024))
  assert set(modes.TEXT_BATCH.keys) <= set(batch)
  assert batch["tokens"].shape == (8, 16)


def test_workdir_written_before_a_new_model_field_still_resumes(tmp_path):
  """A config.json from an older version (a ModelConfig field missing) is read with the defaults."""
  import json
  from types import SimpleNamespace

  from gemma2_jax.checkpoint import CheckpointError

  exp = experiment_from(tiny_experiment(), 1)
  old = exp.to_json_dict()
  del old["model"]["scan_layers"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  Trainer._check_or_write_config(SimpleNamespace(exp=exp, workdir=tmp_path))  # no error
  old["model"]["d_model"] += 8
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(CheckpointError, match="model.d_model"):
    Trainer._check_or_write_config(SimpleNamespace(exp=exp, workdir=tmp_path))


def test_export_hf_from_sharded_params_tensor_by_tensor(tmp_path, monkeypatch):
  """The end-of-run export writes the sharded params exactly, one tensor at a time (a layer's slice),
  never by process_allgather of whole parameters (the whole model on every chip and host)."""
  from etils import epath
  from jax.experimental import multihost_utils

  from gemma2_jax.checkpoint import load_params
  from gemma2_jax.checkpoint.export import export_hf

  exp = experiment_from(tiny_experiment(), 8)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 4, "tensor": 2})
  mesh = make_mesh(exp.mesh, jax.devices()[:8])
  tx, _ = make_optimizer(exp.optimizer, exp.train.steps)
  state = init_state(exp, tx, state_shardings(exp, mesh, tx))
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda *a, **k: pytest.fail("export gathered a whole parameter"))
  path = export_hf(state.params, exp.model, epath.Path(tmp_path / "hf"))
  _, loaded = load_params(path, "float32", config=exp.model)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, loaded)


def test_raising_train_steps_on_resume_keeps_the_schedule(tmp_path, capfd):
  """A resume with more steps continues the run's learning-rate schedule without a jump (it holds
  end_learning_rate past the run's original end), and says so."""
  import json

  def run(steps):
    c = tiny_experiment(steps=steps, log_every=1)
    c.data.tokenizer = str(TOKENIZER)
    c.model.vocab_size = 1024
    c.optimizer.update(schedule="cosine", warmup_steps=1, learning_rate=1e-2, end_learning_rate=1e-4)
    c.checkpoint.export_hf = False
    exp = from_config(c, num_devices=jax.device_count())
    Trainer(exp, tmp_path).run()

  run(3)
  run(5)
  assert "note: train.steps 3 -> 5: the cosine learning-rate schedule keeps the run's 3 steps" in (
    capfd.readouterr().err)
  rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
          if "learning_rate" in r}
  assert rows[3]["learning_rate"] > 1e-4  # the last step of the first run: still decaying
  assert rows[4]["learning_rate"] == pytest.approx(1e-4) and rows[5]["learning_rate"] == pytest.approx(1e-4)
