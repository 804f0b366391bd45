"""The pure step functions (not jitted): the train step over micro-batches, the eval step, their sums."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma2_jax.distill import onpolicy
from gemma2_jax.distill.config import distill_schedule
from gemma2_jax.training.experiment import Experiment
from gemma2_jax.training.modes import METRIC_NAMES, ONPOLICY_SUMS, Mode, loss_sums
from gemma2_jax.training.optim import apply_updates, global_norm
from gemma2_jax.training.state import TrainState


def sum_over_micro_batches(fn, batch: dict, k: int):
  """sum_i fn(micro-batch i) over k micro-batches, one at a time (activation memory of one).

  Row j*k + i goes to micro-batch i, so every micro-batch is spread over all batch shards.
  """
  micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), batch)

  def accumulate(carry, micro_batch):
    return jax.tree.map(jnp.add, carry, fn(micro_batch)), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro)))
  return jax.lax.scan(accumulate, zeros, micro)[0]


def ema_decay_at(ema_decay: float, warmup_steps: int, step):
  """The EMA's decay for the update of step `step` (0-based): train.ema_decay, ramped linearly from 0
  at step 0 over the first `warmup_steps` (0: constant). The global step: exact across a resume."""
  if not warmup_steps:
    return jnp.float32(ema_decay)
  return ema_decay * jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def ema_update(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in fp32 (stored in the EMA's dtype)."""
  def one(e, p):
    return (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype)
  return jax.tree.map(one, ema, params)


def logged_sums(sums: dict, weight) -> dict:
  """A step's sums as logged: those METRIC_NAMES names (but nll, logged as `ce`) per token weight,
  the on-policy counts (ONPOLICY_SUMS) raw: the loop turns them into rates over each log window."""
  out = {name: sums[key] / weight for key, name in METRIC_NAMES.items() if key in sums and key != "nll"}
  return {**out, **{key: sums[key] for key in ONPOLICY_SUMS if key in sums}}


def make_train_step(exp: Experiment, mode: Mode, tx, schedule):
  """(state, batch, teacher_params) -> (state, metrics); batch leaves are [global_batch, T, ...].

  The mode gives the loss (`mode.objective`) and, for on-policy distillation (`mode.sampling`, see
  gemma2_jax/distill/onpolicy.py), the student's sampling: the responses of the whole batch may first
  be replaced by the student's samples, all rows at once before the micro-batch loop (decoding reads
  the weights once per token for every row, not once per micro-batch; the KV cache holds all rows).
  teacher_params (the mode's frozen inputs) is None except for online distillation and LoRA (the
  frozen base); it is an argument (never optimizer state).

  With train.ema_decay > 0 the state's EMA follows the updated params (`ema_update`); a step skipped
  as non-finite keeps it too. distill.anchor_kl_weight > 0 hands the EMA (before this step's update)
  to the objective as its KL anchor (WARP).
  """
  k = exp.train.grad_accum_steps
  objective, sampling = mode.objective, mode.sampling
  lam = exp.distill.onpolicy_lambda if sampling is not None else 0.0

  def train_step(state: TrainState, batch: dict, teacher_params=None):
    gen = {}
    if lam:
      batch, gen = sample_responses(state, batch, teacher_params)

    anchor = {"anchor": state.ema} if exp.anchored else {}

    def grads_and_sums(micro_batch):
      (_, s), g = jax.value_and_grad(objective, has_aux=True)(state.params, micro_batch,
                                                              teacher_params, state.step, **anchor)
      return g, s

    grads, sums = sum_over_micro_batches(grads_and_sums, batch, k)
    sums = {**sums, **gen}
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)  # token-weighted mean over the whole batch
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = apply_updates(exp.optimizer, state.params, updates, state.step)
    ema = None if state.ema is None else ema_update(
      state.ema, params, ema_decay_at(exp.train.ema_decay, exp.train.ema_warmup_steps, state.step))
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    loss = sums.get("loss", sums["nll"]) / weight
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if exp.train.nonfinite == "skip":
      # A skipped step keeps params, moments and EMA but still counts (the step, and optax's counts that
      # drive its schedule): the learning rate applied stays the one logged for that step.
      new = jax.tree.map(
        lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer) else jnp.where(finite, n, o),
        new, state)
    metrics = {"loss": loss, "ce": sums["nll"] / weight, "accuracy": sums["correct"] / weight,
               "tokens": sums["weight"], "grad_norm": grad_norm,
               "learning_rate": schedule(state.step), "finite": finite.astype(jnp.float32),
               **logged_sums(sums, weight)}
    if exp.distill is not None:
      metrics["alpha"], metrics["temperature"] = (
        jnp.asarray(v, jnp.float32) for v in distill_schedule(exp.distill, state.step))
    return new, metrics

  def sample_responses(state: TrainState, batch: dict, inputs):
    """With probability lam this step, every row's response replaced by the student's sample (row
    r's key: the step's row key folded with r); (batch, generation sums)."""
    coin_key, row_key = onpolicy.step_keys(exp.train.seed, state.step)
    on = onpolicy.use_policy(lam, coin_key)
    rows_B = jnp.arange(batch["tokens"].shape[0], dtype=jnp.uint32)
    keys_B = jax.vmap(functools.partial(jax.random.fold_in, row_key))(rows_B)
    gen = {"rows": jnp.sum(jnp.any(batch["loss_mask"] > 0, axis=1).astype(jnp.float32))}

    def sample(b):
      return onpolicy.onpolicy_batch(exp.model, mode.sampling_params(state.params, inputs), b, keys_B,
                                     sampling)

    def keep(b):
      return b, {"gen_rows": jnp.zeros(()), "gen_tokens": jnp.zeros(())}

    batch, sampled = sample(batch) if on is True else jax.lax.cond(on, sample, keep, batch)
    return batch, {**gen, **sampled}

  return train_step


def make_eval_step(model_cfg, *, chunk: int, micro_batches: int = 1):
  """(params, batch) -> summed statistics (nll, weight, correct, bytes), in micro-batches."""
  def eval_step(params, batch):
    def sums(micro_batch):
      s = loss_sums(model_cfg, params, micro_batch, chunk=chunk, z_loss=0.0)
      return {"nll": s["nll"], "weight": s["weight"], "correct": s["correct"],
              "bytes": jnp.sum(micro_batch["target_bytes"].astype(jnp.float32))}

    return sum_over_micro_batches(sums, batch, micro_batches)
  return eval_step
