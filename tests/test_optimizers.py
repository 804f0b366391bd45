"""Memory-lean optimizer options: each equals its reference, and a tiny run with each trains and
resumes bit for bit."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gemma2_jax.parallel.sharding import activation_sharding, make_mesh
from gemma2_jax.training import modes, optim, programs
from gemma2_jax.training.experiment import ConfigError, from_config
from gemma2_jax.training.loop import Trainer
from gemma2_jax.training.optim import OptimizerConfig, apply_updates, make_optimizer
from gemma2_jax.training.state import init_state, to_global
from tests.tiny import TOKENIZER, experiment_from, pretrain_tiny, synthetic_batches, tiny_experiment

# Two dims >= 128 so Adafactor factors them; "scale" is never decayed, the embedding not by default.
SHAPES = {"input_embedding": (160, 130), "layers": {"w": (3, 130, 140), "scale": (3, 140)}}
STEPS = 5


def params_and_grads(seed=0):
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.randn(*s), jnp.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape) * 0.1, jnp.float32), params)
           for _ in range(STEPS)]
  return params, grads


def run(tx, params, grads):
  update = jax.jit(tx.update)
  state = tx.init(params)
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def mask(p):
  return optim.decay_mask(p, False)


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_adafactor_equals_optax_adafactor(momentum):
  """Ours is optax.adafactor with our schedule, and weight decay scaled by the learning rate (AdamW's
  convention) passed as its weight_decay_rate schedule; the global-norm clip (0 here) goes before."""
  cfg = OptimizerConfig(name="adafactor", learning_rate=1e-2, warmup_steps=2, clip_norm=0.0,
                        weight_decay=0.1, adafactor_momentum=momentum)
  tx, schedule = make_optimizer(cfg, total_steps=10)
  ref = optax.adafactor(schedule, min_dim_size_to_factor=128, decay_rate=0.8,
                        multiply_by_parameter_scale=False, clipping_threshold=1.0,
                        momentum=momentum or None, weight_decay_rate=lambda c: 0.1 * schedule(c),
                        weight_decay_mask=mask)
  params, grads = params_and_grads()
  ours, state = run(tx, params, grads)
  assert_trees_equal(ours, run(ref, params, grads)[0])
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_state = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
  # Without momentum the state is the factored statistics (and the unfactored norm scales' moments).
  assert n_state < (0.05 if not momentum else 1.05) * n_params


def test_adamw_transform_in_float32_equals_optax_adamw():
  """Our AdamW (moments in any dtype) with float32 moments is optax.adamw bit for bit."""
  cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, clip_norm=0.0)
  _, schedule = make_optimizer(cfg, total_steps=10)
  ours = optim.adamw(cfg, schedule, "float32")
  ref = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1, mask=mask)
  params, grads = params_and_grads()
  assert_trees_equal(run(ours, params, grads)[0], run(ref, params, grads)[0])
  # and the default path is optax.adamw itself
  assert_trees_equal(run(make_optimizer(cfg, 10)[0], params, grads)[0], run(ref, params, grads)[0])


def test_adamw_bf16_moments_within_tolerance():
  """mu and nu are stored in bf16 (8 mantissa bits): after 5 steps the params move within 1% of
  the fp32-moment run's movement (relative to the largest movement), and both moments are bf16."""
  cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, moment_dtype="bfloat16")
  params, grads = params_and_grads()
  lean, state = run(make_optimizer(cfg, 10)[0], params, grads)
  full, _ = run(make_optimizer(dataclasses.replace(cfg, moment_dtype="float32"), 10)[0], params, grads)
  adam = state[1][0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  for p0, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(lean), jax.tree.leaves(full),
                      strict=True):
    moved = np.abs(np.asarray(b - p0)).max()
    np.testing.assert_allclose(np.asarray(a - p0), np.asarray(b - p0), rtol=0, atol=1e-2 * moved)


def test_stochastic_rounding_is_unbiased():
  """Rounding to bf16 at random: always one of the two neighbours, mean = x within 5 sigma
  (round-to-nearest is off by up to half an ulp)."""
  n = 1 << 16
  lo = np.float32(1.0 + 2 ** -7 * 3)  # a bf16 number; its ulp is 2^-7
  ulp = np.float32(2 ** -7)
  for sign in (1, -1):
    for frac in (0.1, 0.3, 0.5, 0.9):
      x = sign * (lo + np.float32(frac) * ulp)
      r = np.asarray(optim.stochastic_round(jnp.full((n,), x), jax.random.key(1)), np.float32)
      assert set(np.unique(r)) <= {sign * lo, sign * (lo + ulp)}
      sigma = ulp / 2 / np.sqrt(n)
      assert abs(r.mean() - x) < 5 * sigma, (sign, frac, r.mean() - x)
      if frac != 0.5:
        assert abs(float(jnp.bfloat16(x)) - x) > 50 * sigma  # the bias stochastic rounding removes


def test_apply_updates_rounding_depends_on_the_step_alone():
  cfg = OptimizerConfig(stochastic_rounding=True)
  params = {"w": jnp.ones((64, 64), jnp.bfloat16), "f32": jnp.ones((8,), jnp.float32)}
  updates = {"w": jnp.full((64, 64), 1e-3, jnp.float32), "f32": jnp.full((8,), 1e-3, jnp.float32)}
  step = jnp.int32(7)
  apply = jax.jit(apply_updates, static_argnums=0)
  a, b = apply(cfg, params, updates, step), apply(cfg, params, updates, jnp.int32(7))
  c = apply(cfg, params, updates, jnp.int32(8))
  assert a["w"].dtype == jnp.bfloat16 and a["f32"].dtype == jnp.float32
  assert_trees_equal(a, b)
  assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))
  # 1e-3 is under half of bf16's ulp at 1 (2^-7): round-to-nearest never moves; this moves ~13%.
  assert (np.asarray(optax.apply_updates(params, updates)["w"], np.float32) == 1).all()
  moved = float((np.asarray(a["w"], np.float32) != 1).mean())
  assert 0.08 < moved < 0.18
  np.testing.assert_allclose(np.asarray(a["f32"]), 1.001, rtol=1e-7)


@pytest.mark.parametrize("edit,message", [
  (dict(optimizer=dict(name="sgd")), "optimizer.name must be one of"),
  (dict(optimizer=dict(moment_dtype="float16")), "optimizer.moment_dtype must be one of"),
  (dict(optimizer=dict(stochastic_rounding=True)), "stochastic_rounding needs bfloat16 params"),
])
def test_bad_optimizer_config_is_one_clear_error(edit, message):
  c = pretrain_tiny()
  c.unlock()
  for section, values in edit.items():
    c[section].update(values)
  with pytest.raises(ConfigError, match=message) as e:
    from_config(c, num_devices=1)
  assert "\n" not in str(e.value)


LEAN = {
  "adamw_bf16_moments": dict(moment_dtype="bfloat16"),
  "adafactor": dict(name="adafactor", learning_rate=3e-2),
  "adafactor_bf16_params_sr": dict(name="adafactor", learning_rate=3e-2, adafactor_momentum=0.9,
                                   moment_dtype="bfloat16", stochastic_rounding=True),
}


# The recommended combination runs by default (it exercises every option but AdamW's bf16 moments,
# whose update test_adamw_bf16_moments_within_tolerance checks); the others compile a step each.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "adafactor_bf16_params_sr" else
                                               pytest.mark.slow) for n in LEAN])
def test_tiny_run_lowers_the_loss(name):
  c = tiny_experiment(steps=6)
  c.optimizer.update(LEAN[name])
  if c.optimizer.stochastic_rounding:
    c.model.param_dtype = "bfloat16"
  exp = experiment_from(c, 1)
  exp = dataclasses.replace(exp, mesh={"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1})
  mesh = make_mesh(exp.mesh, jax.devices()[:1])
  step = programs.train_program(exp, modes.Mode(exp), mesh)
  batch = synthetic_batches(1)[0]
  with activation_sharding(mesh, exp.rules):
    state = init_state(exp, step.tx, step.shardings)
    losses = []
    for _ in range(6):
      state, m = step(state, to_global(batch, step.shardings), None)
      losses.append(float(m["loss"]))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(exp.model.param_dtype)}
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow  # two trainer runs
def test_bf16_params_adafactor_run_resumes_bit_exactly(tmp_path):
  """bf16 params + stochastic rounding + Adafactor through the trainer: init, checkpoint, resume.
  Steps 3-4 re-run from the step-2 checkpoint equal the uninterrupted run's bit for bit."""
  def run():
    c = tiny_experiment(steps=4, log_every=1)
    c.data.tokenizer = str(TOKENIZER)
    c.model.update(vocab_size=1024, param_dtype="bfloat16")
    c.optimizer.update(LEAN["adafactor_bf16_params_sr"], decay_steps=4)
    c.checkpoint.update(save_every=2, export_hf=False)
    c.train.eval_every = 0
    Trainer(from_config(c, num_devices=jax.device_count()), tmp_path).run()

  def restore(step):
    return ocp.StandardCheckpointer().restore((tmp_path / "checkpoints" / str(step) / "state").absolute())

  run()
  uninterrupted = restore(4)
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  run()
  resumed = restore(4)
  assert {x.dtype for x in jax.tree.leaves(uninterrupted["params"])} == {np.dtype(jnp.bfloat16)}
  assert_trees_equal(uninterrupted, resumed)
  assert not np.array_equal(np.asarray(jax.tree.leaves(restore(2)["params"])[0]),
                            np.asarray(jax.tree.leaves(resumed["params"])[0]))


@pytest.mark.slow  # two compiles
def test_factored_adafactor_sharded_equals_single_device():
  """Adafactor's factored statistics (not param-shaped: replicated) under fsdp x tensor on 8 fake
  devices give the single device's params."""
  def final_params(mesh_sizes, devices):
    c = tiny_experiment(steps=3)
    c.optimizer.update(name="adafactor", adafactor_min_dim_to_factor=8, adafactor_momentum=0.9)
    c.mesh.update({"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1, **mesh_sizes})
    exp = experiment_from(c, len(devices))
    mesh = make_mesh(exp.mesh, devices)
    step = programs.train_program(exp, modes.Mode(exp), mesh)
    with activation_sharding(mesh, exp.rules):
      state = init_state(exp, step.tx, step.shardings)
      for b in synthetic_batches(3):
        state, _ = step(state, to_global(b, step.shardings), None)
    return state.params

  ref = final_params({}, jax.devices()[:1])
  out = final_params({"fsdp": 4, "tensor": 2}, jax.devices()[:8])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6,
                                                       rtol=1e-4), out, ref)
