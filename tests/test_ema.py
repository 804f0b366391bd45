"""EMA of the weights in training (train.ema_decay) and WARP's EMA KL anchor (distill.anchor_kl_weight):
the EMA equals a hand-rolled one, a skipped step keeps it, sharded equals one device, checkpoints
without it are as before and resume either way, kill -9 resumes it bit for bit, and the anchor KL
is zero (with zero gradient) where the EMA is the params and positive once they move apart."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma2_jax.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from gemma2_jax.parallel.sharding import activation_sharding, make_mesh
from gemma2_jax.training import modes, programs
from gemma2_jax.training.experiment import ConfigError, eval_metric_name, from_config
from gemma2_jax.training.loop import Trainer
from gemma2_jax.training.optim import make_optimizer
from gemma2_jax.training.state import TrainState, abstract_state, init_state, state_shardings, to_global
from gemma2_jax.training.steps import ema_decay_at
from tests.resume import COMMON, assert_same_state, final_state, killed, losses, train
from tests.tiny import TOKENIZER, experiment_from, random_params, synthetic_batches, tiny_experiment

ONE_DEVICE = {"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1}
DECAY, WARMUP = 0.9, 2


def ema_experiment(num_devices=1, mesh=None, **train):
  c = tiny_experiment(**{"ema_decay": DECAY, "ema_warmup_steps": WARMUP, "nonfinite": "skip", **train})
  exp = experiment_from(c, num_devices)
  return dataclasses.replace(exp, mesh={**ONE_DEVICE, **(mesh or {})})


def run_steps(exp, batches, devices):
  """The initial params, the params after each step (host copies) and the final state."""
  mesh = make_mesh(exp.mesh, devices)
  step = programs.train_program(exp, modes.Mode(exp), mesh)
  with activation_sharding(mesh, exp.rules):
    state = init_state(exp, step.tx, step.shardings)
    seen = [jax.tree.map(np.asarray, state.params)]
    for b in batches:
      state, _ = step(state, to_global(b, step.shardings), None)
      seen.append(jax.tree.map(np.asarray, state.params))
  return seen, state, step


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


@pytest.fixture(scope="module")
def one_device():
  return run_steps(ema_experiment(), synthetic_batches(3), jax.devices()[:1])


def test_ema_equals_hand_rolled_ema(one_device):
  seen, state, _ = one_device
  ema = seen[0]
  for t, params in enumerate(seen[1:]):
    d = np.float32(DECAY * min(t / WARMUP, 1.0))  # the ramp: 0 at step 0, DECAY from step WARMUP
    ema = jax.tree.map(lambda e, p, d=d: d * e + (np.float32(1) - d) * p, ema, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7),
               state.ema, ema)
  # After 3 steps the EMA lags the params (a real average, not a copy).
  assert not np.allclose(np.asarray(state.ema["embedder"]["input_embedding"]),
                         seen[-1]["embedder"]["input_embedding"])
  q = "layers", "attn", "q_einsum"
  assert _at(state.ema, q).sharding == _at(state.params, q).sharding


def test_decay_schedule():
  assert [float(ema_decay_at(0.99, 4, s)) for s in (0, 2, 4, 9)] == pytest.approx([0, 0.495, 0.99, 0.99])
  assert float(ema_decay_at(0.99, 0, 0)) == pytest.approx(0.99)


def test_skipped_step_keeps_the_ema(one_device):
  _, state, step = one_device
  state = jax.tree.map(jnp.copy, state)  # the step donates its input
  emb = state.params["embedder"]["input_embedding"].at[5].set(np.nan)
  bad = state.replace(params={**state.params, "embedder": {"input_embedding": emb}})
  before = jax.tree.map(np.asarray, bad.ema)
  batch = synthetic_batches(1, seed=3)[0]
  batch["tokens"][:, 0] = 5
  new, metrics = step(bad, to_global(batch, step.shardings), None)
  assert metrics["finite"] == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new.ema, before)


def test_sharded_ema_equals_one_device(one_device):
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
  _, ref, _ = one_device
  exp = ema_experiment(8, mesh=dict(data=2, fsdp=2, tensor=2))
  _, state, _ = run_steps(exp, synthetic_batches(3), jax.devices()[:8])
  q = "layers", "attn", "q_einsum"
  assert _at(state.ema, q).sharding.mesh.size == 8
  assert _at(state.ema, q).sharding == _at(state.params, q).sharding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6,
                                                       rtol=1e-4), state.ema, ref.ema)


class _NoData:
  """Stands for the data iterator in a checkpoint (restore_data=False reads it back never)."""

  def get_state(self):
    return {}

  def set_state(self, state):
    pass


def _checkpoint(exp, workdir, step=2):
  """A checkpoint of a random state of exp's shapes at `step` (nothing compiled)."""
  tx, _ = make_optimizer(exp.optimizer, exp.train.steps)
  params = jax.device_put(random_params(exp.model), jax.devices()[0])
  ema = jax.tree.map(lambda x: x + 1.0, params) if exp.train.ema_decay else None
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                     ema=ema)
  cfg = CheckpointConfig(async_save=False, restore_data=False)
  ckpt = TrainCheckpointer(workdir, cfg)
  ckpt.save(step, state, _NoData(), {})
  ckpt.wait()
  return ckpt, jax.tree.map(np.asarray, state)


def _resume(exp, ckpt):
  mesh = make_mesh(exp.mesh, jax.devices()[:1])
  tx, _ = make_optimizer(exp.optimizer, exp.train.steps)
  notes = []
  trainer = SimpleNamespace(exp=exp, tx=tx, sh=state_shardings(exp, mesh, tx), train_iter=_NoData(),
                            _note=notes.append)
  return Trainer.restore_or_init(trainer, ckpt), notes


def test_ema_off_leaves_state_and_checkpoint_as_before(tmp_path):
  exp = ema_experiment(ema_decay=0.0)
  ckpt, state = _checkpoint(exp, tmp_path)
  assert state.ema is None and len(jax.tree.leaves(state)) == len(
    jax.tree.leaves((state.step, state.params, state.opt_state)))
  assert ckpt.saved_state_keys(2) == {"step", "params", "opt_state"}
  # The EMA newly switched on: it starts at the checkpoint's params, and says so.
  on = ema_experiment()
  resumed, notes = _resume(on, ckpt)
  assert "has no EMA" in notes[0] and int(resumed.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed.ema), state.params)
  ckpt.close()


def test_checkpoint_with_ema_resumes_exactly_or_drops_it(tmp_path):
  exp = ema_experiment()
  ckpt, state = _checkpoint(exp, tmp_path)
  assert ckpt.saved_state_keys(2) == {"step", "params", "opt_state", "ema"}
  resumed, notes = _resume(exp, ckpt)
  assert not notes
  assert_same_state(jax.tree.map(np.asarray, vars(resumed)), vars(state))
  off, notes = _resume(ema_experiment(ema_decay=0.0), ckpt)
  assert off.ema is None and "dropped" in notes[0]
  ckpt.close()


def test_lora_ema_is_of_the_trainable_tree():
  c = tiny_experiment(ema_decay=0.99)
  c.init_from = "unused"
  c.lora = {"rank": 4, "alpha": 8.0, "targets": ["all"]}
  exp = experiment_from(c, 1)
  mesh = make_mesh({**exp.mesh, **ONE_DEVICE}, jax.devices()[:1])
  tx, _ = make_optimizer(exp.optimizer, exp.train.steps)
  abstract = abstract_state(exp, tx, state_shardings(exp, mesh, tx))
  assert jax.tree.structure(abstract.ema) == jax.tree.structure(abstract.params)
  assert "adapters" in abstract.ema and "layers" not in abstract.ema


def test_config_checks():
  for section, match in ((dict(ema_decay=1.0), "train.ema_decay must be in"),
                         (dict(ema_warmup_steps=-1), "ema_warmup_steps"),
                         (dict(eval_ema=True), "train.eval_ema needs")):
    with pytest.raises(ConfigError, match=match):
      experiment_from(tiny_experiment(**section), 1)
  c = tiny_experiment()
  c.unlock()
  c.teacher = {"checkpoint": "t", "dtype": "float32"}
  c.distill = {"anchor_kl_weight": 0.1}
  with pytest.raises(ConfigError, match="needs the student's EMA as its anchor: set train.ema_decay"):
    experiment_from(c, 1)
  c.teacher = {}
  c.distill = {"anchor_kl_weight": 0.1, "offline_paths": "x"}
  c.train.ema_decay = 0.99
  with pytest.raises(ConfigError, match="needs online distillation"):
    experiment_from(c, 1)
  assert eval_metric_name("", "eval_loss", ema=True) == "eval_ema_loss"
  assert eval_metric_name("ko", "eval_loss", ema=True) == "eval_ema/ko/loss"


def test_anchor_kl_zero_at_the_params_and_positive_once_apart():
  from gemma2_jax.distill.config import DistillConfig, TeacherConfig

  exp = ema_experiment()
  teacher_cfg = exp.model
  exp = dataclasses.replace(exp, teacher=TeacherConfig(checkpoint="unused", dtype="float32"),
                            distill=DistillConfig(loss="forward_kl", anchor_kl_weight=0.5))
  mode = modes.OnlineKD(exp, teacher_cfg=teacher_cfg)
  params, teacher = random_params(exp.model, seed=1), random_params(teacher_cfg, seed=2)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batches(1)[0].items()}

  @jax.jit
  def anchored(params, anchor):
    def f(p):  # the anchor term per token
      _, sums = mode.objective(p, batch, teacher, 0, anchor=anchor)
      return sums["anchor_kl"] / sums["weight"], sums
    return jax.value_and_grad(f, has_aux=True)(params)

  (kl, sums), grad = anchored(params, params)
  assert abs(float(kl)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) < 1e-6
  (kl, sums), grad = anchored(params, jax.tree.map(lambda x: x * 1.3, params))
  assert float(kl) > 1e-3 and max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) > 1e-4
  # The objective (alpha 1: the KD term) holds the anchor term at its weight.
  np.testing.assert_allclose(sums["loss"], sums["kd"] + 0.5 * sums["anchor_kl"], rtol=1e-5)


@pytest.mark.slow  # a Trainer run with a teacher, evals and two exports (~30 s on 2 cores)
def test_online_distill_with_anchor_logs_it_evaluates_and_exports_the_ema(tmp_path):
  """A tiny online-distillation run with the EMA anchor: anchor_kl logged (0 at the first step, where
  the EMA is the params), eval_ema metrics, and hf_step<N>_ema beside hf_step<N>."""
  from gemma2_jax import save_model
  from gemma2_jax.checkpoint import load_params
  from gemma2_jax.model import Transformer
  from gemma2_jax.model.transformer import init_params

  c = tiny_experiment(steps=3, log_every=1, ema_decay=0.5, eval_ema=True, eval_batches=1)
  c.data.tokenizer = str(TOKENIZER)
  c.model.vocab_size = 1024
  exp = from_config(c, num_devices=jax.device_count())
  teacher_cfg = exp.model.replace(num_layers=2, d_model=48, ffn_dim=96)
  teacher = save_model(Transformer.from_params(teacher_cfg, init_params(teacher_cfg)),
                       tmp_path / "teacher", format="native")
  c.unlock()
  c.teacher = {"checkpoint": str(teacher), "dtype": "float32"}
  c.distill = {"loss": "reverse_kl", "anchor_kl_weight": 0.1}
  exp = from_config(c, num_devices=jax.device_count())
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2})
  summary = Trainer(exp, tmp_path / "run").run()
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  kls = [r["anchor_kl"] for r in rows if "anchor_kl" in r]
  assert len(kls) == 3 and abs(kls[0]) < 1e-6 and kls[-1] > 0
  assert {"eval_loss", "eval_ema_loss", "anchor_kl", "hf_export_ema"} <= set(summary)
  assert summary["eval_ema_loss"] != summary["eval_loss"]
  _, ema = load_params(tmp_path / "run" / "hf_step3_ema", "float32", config=exp.model)
  _, params = load_params(tmp_path / "run" / "hf_step3", "float32", config=exp.model)
  state = final_state(tmp_path / "run", 3)
  np.testing.assert_array_equal(ema["embedder"]["input_embedding"],
                                state["ema"]["embedder"]["input_embedding"])
  assert not np.array_equal(ema["embedder"]["input_embedding"], params["embedder"]["input_embedding"])


@pytest.mark.slow  # three tiny training processes (~1 min on 2 cores)
def test_sigkill_and_rerun_is_bit_identical_with_ema(tmp_path):
  common = [*COMMON, "--config.train.ema_decay=0.9", "--config.train.ema_warmup_steps=3"]
  train(tmp_path / "ref", common=common)
  killed(tmp_path / "run", "after_step", 5, common=common)
  train(tmp_path / "run", common=common)
  assert losses(tmp_path / "run") == losses(tmp_path / "ref")
  ref, run = final_state(tmp_path / "ref"), final_state(tmp_path / "run")
  assert "ema" in ref
  assert_same_state(run, ref)
