"""TrainState, the pure train / eval steps, sharded initialisation, and the training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from gemma2_jax import checkpoint, flops, onpolicy, paths
from gemma2_jax.checkpoint.manager import TrainCheckpointer
from gemma2_jax.experiment import Experiment, dataclass_defaults
from gemma2_jax.losses import cross_entropy_sums, distill_schedule, distill_sums, topk_distill_sums
from gemma2_jax.metrics import MetricsWriter
from gemma2_jax.model.config import ModelConfig, get_preset
from gemma2_jax.model.transformer import LOGICAL_AXES, forward_hidden, init_params, param_shapes
from gemma2_jax.optim import global_norm, make_optimizer
from gemma2_jax.sampler import END_OF_TURN_ID, EOS_ID
from gemma2_jax.sharding import (
  activation_sharding,
  data_group,
  host_to_global,
  logical_to_sharding,
  logical_to_spec,
  make_mesh,
  normalize_rules,
)

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
# Per-step sums of on-policy steps (rows with a response, rows the student answered, tokens it wrote).
ONPOLICY_SUMS = ("rows", "gen_rows", "gen_tokens")
TOPK_KEYS = ("topk_logprobs", "topk_ids")


class TrainingDiverged(RuntimeError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def loss_sums(model_cfg: ModelConfig, params: dict, batch: dict, *, chunk: int, z_loss: float):
  hidden_BTD = forward_hidden(model_cfg, params, batch["tokens"], batch["positions"],
                              batch["segment_ids"])
  return cross_entropy_sums(model_cfg, params["embedder"]["input_embedding"], hidden_BTD,
                            batch["targets"], batch["loss_mask"], chunk_size=chunk, z_loss=z_loss)


def make_objective(exp: Experiment, teacher_cfg: ModelConfig | None = None):
  """(params, batch, teacher_params, step) -> (scalar to differentiate, weighted sums).

  One function for the three modes: cross-entropy, online distillation (the frozen teacher's forward
  runs here, under stop_gradient) and offline distillation from stored top-k teacher log-probs.
  """
  model_cfg, tcfg, mode = exp.model, exp.train, exp.distill_mode

  def objective(params, batch, teacher_params, step):
    if mode == "ce":
      sums = loss_sums(model_cfg, params, batch, chunk=tcfg.loss_chunk, z_loss=tcfg.z_loss)
      return sums["nll"] + sums.get("z_loss", 0.0), sums
    alpha, temperature = distill_schedule(exp.distill, step)
    kw = dict(loss=exp.distill.loss, beta=exp.distill.beta, temperature=temperature, alpha=alpha,
              chunk_size=tcfg.loss_chunk, z_loss=tcfg.z_loss)
    hidden_BTD = forward_hidden(model_cfg, params, batch["tokens"], batch["positions"],
                                batch["segment_ids"])
    embedding_VD = params["embedder"]["input_embedding"]
    if mode == "online":
      teacher_params = jax.lax.stop_gradient(teacher_params)
      teacher_hidden_BTD = forward_hidden(teacher_cfg, teacher_params, batch["tokens"],
                                          batch["positions"], batch["segment_ids"])
      sums = distill_sums(model_cfg, embedding_VD, hidden_BTD, teacher_cfg,
                          teacher_params["embedder"]["input_embedding"], teacher_hidden_BTD,
                          batch["targets"], batch["loss_mask"], **kw)
    else:
      sums = topk_distill_sums(model_cfg, embedding_VD, hidden_BTD, batch["topk_logprobs"],
                               batch["topk_ids"], batch["targets"], batch["loss_mask"], **kw)
    return sums["loss"] + sums.get("z_loss", 0.0), sums

  return objective


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


def make_train_step(exp: Experiment, tx, schedule, teacher_cfg: ModelConfig | None = None,
                    stop_tokens: tuple[int, ...] = (EOS_ID, END_OF_TURN_ID)):
  """(state, batch, teacher_params) -> (state, metrics); batch leaves are [global_batch, T, ...].

  teacher_params is None except for online distillation; it is an argument (never optimizer state).
  With on-policy distillation (distill.onpolicy_lambda > 0, see gemma2_jax/onpolicy.py) each
  micro-batch's responses may first be replaced by the student's samples, which end at
  `stop_tokens` (default: Gemma's tokenizer's `<eos>` and `<end_of_turn>`).
  """
  k = exp.train.grad_accum_steps
  objective = make_objective(exp, teacher_cfg)
  lam = exp.distill.onpolicy_lambda if exp.distill is not None else 0.0
  sampling = onpolicy.sampling_config(exp.distill, stop_tokens, exp.model.dtype) if lam else None

  def train_step(state: TrainState, batch: dict, teacher_params=None):
    if lam:
      coin_key, row_key = onpolicy.step_keys(exp.train.seed, state.step)
      on = onpolicy.use_policy(lam, coin_key)
      batch = {**batch, "row": jnp.arange(batch["tokens"].shape[0], dtype=jnp.uint32)}

    def grads_and_sums(micro_batch):
      gen = {}
      if lam:
        micro_batch = dict(micro_batch)
        keys_B = jax.vmap(functools.partial(jax.random.fold_in, row_key))(micro_batch.pop("row"))
        gen["rows"] = jnp.sum(jnp.any(micro_batch["loss_mask"] > 0, axis=1).astype(jnp.float32))

        def sample(mb):
          return onpolicy.onpolicy_batch(exp.model, state.params, mb, keys_B, sampling)

        def keep(mb):
          return mb, {"gen_rows": jnp.zeros(()), "gen_tokens": jnp.zeros(())}

        micro_batch, sampled = (sample(micro_batch) if on is True
                                else jax.lax.cond(on, sample, keep, micro_batch))
        gen.update(sampled)
      (_, s), g = jax.value_and_grad(objective, has_aux=True)(state.params, micro_batch,
                                                              teacher_params, state.step)
      return g, {**s, **gen}

    grads, sums = sum_over_micro_batches(grads_and_sums, batch, k)
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)  # token-weighted mean over the whole batch
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state)
    loss = sums.get("loss", sums["nll"]) / weight
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if exp.train.nonfinite == "skip":
      # A skipped step keeps params and moments but still counts (the step, and optax's counts that
      # drive its schedule): the learning rate applied stays the one logged for that step.
      new = jax.tree.map(
        lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer) else jnp.where(finite, n, o),
        new, state)
    metrics = {"loss": loss, "ce": sums["nll"] / weight, "accuracy": sums["correct"] / weight,
               "tokens": sums["weight"], "grad_norm": grad_norm,
               "learning_rate": schedule(state.step), "finite": finite.astype(jnp.float32)}
    for key, name in (("kd", "kd"), ("teacher_nll", "teacher_ce"), ("kl", "kl_t1"),
                      ("agree", "top1_agreement"), ("z_loss", "z_loss")):
      if key in sums:
        metrics[name] = sums[key] / weight
    for key in ONPOLICY_SUMS:  # raw sums: the loop turns them into rates over each log window
      if key in sums:
        metrics[key] = sums[key]
    if exp.distill is not None:
      metrics["alpha"], metrics["temperature"] = (
        jnp.asarray(v, jnp.float32) for v in distill_schedule(exp.distill, state.step))
    return new, metrics

  return train_step


def teacher_runtime_config(exp: Experiment, cfg: ModelConfig) -> ModelConfig:
  """The teacher's checkpoint config, run with the student's attention settings and no remat.

  An HF teacher stores only the real rows (256000) of the student's padded vocab (256128): it is
  loaded with the padding rows (zeros, masked out of the logits like the student's).
  """
  if cfg.vocab_size == exp.model.num_real_tokens and cfg.vocab_size < exp.model.vocab_size:
    cfg = cfg.replace(vocab_size=exp.model.vocab_size)
  if cfg.vocab_size != exp.model.vocab_size:
    raise checkpoint.CheckpointError(
      f"teacher vocab_size {cfg.vocab_size} != student vocab_size {exp.model.vocab_size}: distillation "
      "needs one tokenizer on both sides")
  return cfg.replace(dtype=exp.teacher.dtype, param_dtype=exp.teacher.dtype,
                     attention_impl=exp.model.attention_impl,
                     attention_block_size=exp.model.attention_block_size, remat="none",
                     num_real_tokens=exp.model.num_real_tokens)


def teacher_shardings(exp: Experiment, mesh) -> dict:
  return logical_to_sharding(LOGICAL_AXES, mesh,
                             normalize_rules(exp.teacher.sharding_rules or exp.rules))


def load_teacher(exp: Experiment, mesh) -> tuple[ModelConfig, dict]:
  """The frozen teacher: config from its checkpoint, each process reading only its shards."""
  t = exp.teacher
  cfg = teacher_runtime_config(
    exp, get_preset(t.preset) if t.preset else checkpoint.read_config(t.checkpoint))
  _, params = checkpoint.load_sharded(t.checkpoint, t.dtype, teacher_shardings(exp, mesh),
                                      config=cfg)
  return cfg, params


def make_eval_step(exp: Experiment):
  """(params, batch) -> summed eval statistics, in the train step's micro-batches (its memory)."""
  from gemma2_jax.evaluate import make_eval_step as eval_step_for

  return eval_step_for(exp.model, chunk=exp.train.loss_chunk,
                       micro_batches=exp.train.grad_accum_steps)


@dataclasses.dataclass
class Shardings:
  mesh: jax.sharding.Mesh
  state: TrainState
  batch: NamedSharding
  replicated: NamedSharding


def state_shardings(exp: Experiment, mesh, tx) -> Shardings:
  params = logical_to_sharding(LOGICAL_AXES, mesh, exp.rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_params = _abstract_params(exp.model)
  opt_state = optax.tree_utils.tree_map_params(
    tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), params,
    transform_non_params=lambda _: replicated)
  batch = NamedSharding(mesh, logical_to_spec(("batch", "length"), exp.rules))
  return Shardings(mesh=mesh, state=TrainState(step=replicated, params=params, opt_state=opt_state),
                   batch=batch, replicated=replicated)


def _abstract_params(model_cfg: ModelConfig):
  dtype = jnp.dtype(model_cfg.param_dtype)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(model_cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def init_state(exp: Experiment, tx, sh: Shardings) -> TrainState:
  """Params and optimizer state are created directly in their shards (nothing on one device first).

  With `init_from`, the weights come from that checkpoint (HF / Kaggle / native) and the optimizer
  starts fresh: continued pre-training.
  """
  if exp.init_from:
    # Read with the run's model config (any tensor of another shape is an error naming it); each
    # process reads only the slices its devices hold.
    _, params = checkpoint.load_sharded(exp.init_from, exp.model.param_dtype, sh.state.params,
                                        config=exp.model)
  else:
    params = jax.jit(lambda: init_params(exp.model, exp.train.seed),
                     out_shardings=sh.state.params)()

  def from_params(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(from_params, out_shardings=sh.state, donate_argnums=0)(params)


def to_global(batch: dict, sh: Shardings) -> dict:
  """This process's numpy rows (its data group's share) -> global jax arrays on the batch sharding."""
  return {k: host_to_global(np.asarray(v), sh.batch) for k, v in batch.items()}


class Trainer:
  def __init__(self, exp: Experiment, workdir: str | os.PathLike):
    self.exp = exp
    self.workdir = paths.as_path(workdir)
    if exp.init_from:
      # A wrong path, or a checkpoint of another model, fails here, before the workdir is touched.
      checkpoint.check_config(exp.init_from, exp.model, what="init_from")
    self.mesh = make_mesh(exp.mesh)
    self.tx, self.schedule = make_optimizer(exp.optimizer, exp.train.steps)
    self.sh = state_shardings(exp, self.mesh, self.tx)
    # Processes whose devices address the same batch rows read the same data shard.
    group = data_group(self.sh.batch, exp.train.global_batch)
    data_kw = dict(tokenizer_path=exp.tokenizer, vocab_size=exp.model.vocab_size,
                   num_real_tokens=exp.model.num_real_tokens)
    self.data_kw = data_kw
    self.batch_keys = BATCH_KEYS
    if exp.distill_mode == "offline":
      from gemma2_jax.data.offline import make_offline_iterator
      d = exp.data_train
      self.train_iter = make_offline_iterator(exp.offline_paths, global_batch=d.global_batch,
                                              seq_len=d.seq_len, seed=d.seed, shuffle=d.shuffle,
                                              num_epochs=d.num_epochs, process_index=group.index,
                                              process_count=group.count)
      self.batch_keys = BATCH_KEYS + TOPK_KEYS
    else:
      from gemma2_jax.data.pipeline import make_train_iterator
      self.train_iter = make_train_iterator(exp.data_train, process_index=group.index,
                                            process_count=group.count, **data_kw)
    self.teacher_cfg = self.teacher_params = None
    teacher_sharding = None
    if exp.distill_mode == "online":
      self.teacher_cfg, self.teacher_params = load_teacher(exp, self.mesh)
      teacher_sharding = jax.tree.map(lambda x: x.sharding, self.teacher_params)
    step_kw = {}
    if exp.distill is not None and exp.distill.onpolicy_lambda:
      # The student's samples end at the tokenizer's stop tokens.
      step_kw["stop_tokens"] = onpolicy.stop_tokens_for(exp.tokenizer)
    with self._sharding_ctx():
      self.train_step = jax.jit(make_train_step(exp, self.tx, self.schedule, self.teacher_cfg,
                                                **step_kw),
                                in_shardings=(self.sh.state, self.sh.batch, teacher_sharding),
                                out_shardings=(self.sh.state, self.sh.replicated),
                                donate_argnums=0)
      self.eval_step = jax.jit(make_eval_step(exp),
                               in_shardings=(self.sh.state.params, self.sh.batch),
                               out_shardings=self.sh.replicated)
    self.flops_per_token = flops.train_flops_per_token(exp.model, exp.train.seq_len)
    self.peak = flops.peak_flops_per_device(exp.train.peak_tflops_per_device * 1e12)

  def _sharding_ctx(self):
    return activation_sharding(self.mesh, self.exp.rules)

  def evaluate(self, params) -> dict:
    from gemma2_jax.data.pipeline import make_eval_iterator
    from gemma2_jax.evaluate import run_eval

    group = data_group(self.sh.batch, self.exp.data_eval.global_batch)
    it = make_eval_iterator(self.exp.data_eval, num_batches=self.exp.train.eval_batches,
                            process_index=group.index, process_count=group.count, **self.data_kw)
    with self._sharding_ctx():
      return run_eval(self.eval_step, params, it, lambda b: to_global(b, self.sh),
                      max_batches=self.exp.train.eval_batches)

  def _check_workdir(self):
    """A workdir belongs to one model: refuse (before touching anything) to mix runs.

    Process 0 checks (or writes) config.json while the others wait: a process reading it while
    process 0 writes it would see a half-written file. A refusal reaches the others through the
    job's watchdog (gemma2_jax.distributed).
    """
    from gemma2_jax import distributed

    if jax.process_index() == 0:
      self._check_or_write_config()
    distributed.barrier("workdir_checked", timeout_s=3600)

  def _check_or_write_config(self):
    path = self.workdir / "config.json"
    mine = self.exp.to_json_dict()
    if path.exists():
      try:
        saved = json.loads(path.read_text())
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        saved = e
      if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        why = (f"not valid JSON ({saved})" if isinstance(saved, Exception)
               else "not the config of a training run (no model section)")
        # Never rewritten here: it is what ties the workdir's checkpoints to their model.
        raise checkpoint.CheckpointError(
          f"{path} is {why}; every checkpoint keeps a copy of it: restore it with cp "
          f"{self.workdir / 'checkpoints'}/STEP/config/metadata {path}, or use a new --workdir")
      # Fields added to ModelConfig after that run was written take their defaults.
      theirs = {**dataclass_defaults(ModelConfig), **saved["model"]}
      diff = sorted(k for k in set(theirs) | set(mine["model"])
                    if theirs.get(k) != mine["model"].get(k) and k not in _RESUMABLE_MODEL_KEYS)
      if diff:
        k = diff[0]
        raise checkpoint.CheckpointError(
          f"workdir {self.workdir} holds a run of a different model (model.{k}: "
          f"{theirs.get(k)!r} there, {mine['model'].get(k)!r} now); use a new --workdir")
    else:
      self.workdir.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(mine, indent=2))

  def restore_or_init(self, ckpt: TrainCheckpointer) -> TrainState:
    """The one place that decides where training starts: workdir checkpoint > init_from > scratch."""
    step = ckpt.latest_step()
    if step is None:
      return init_state(self.exp, self.tx, self.sh)
    return ckpt.restore(step, abstract_state(self.exp, self.tx, self.sh), self.train_iter)

  def run(self) -> dict:
    exp, tcfg = self.exp, self.exp.train
    self._check_workdir()
    ckpt = TrainCheckpointer(self.workdir, exp.checkpoint)
    try:
      state = self.restore_or_init(ckpt)
    except BaseException:
      ckpt.close()  # stop Orbax's background threads before the error propagates
      self._stop_data()
      raise
    start = int(jax.device_get(state.step))
    config_json = exp.to_json_dict()
    writer = MetricsWriter(self.workdir)
    tokens_per_step = tcfg.global_batch * tcfg.seq_len
    bar = None
    if tcfg.progress_bar and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    pending, last, summary, skipped = None, {}, {"start_step": start}, 0
    window_start, window_steps = None, 0
    gen_window = dict.fromkeys(ONPOLICY_SUMS, 0.0)  # on-policy sums over the timed steps
    with _stop_signals() as preempted:
      try:
        for step in range(start, tcfg.steps + 1):
          if step < tcfg.steps:
            if step == tcfg.profile_start:
              jax.profiler.start_trace(str(self.workdir / "profile"))
            batch = next(self.train_iter)
            with self._sharding_ctx():
              state, metrics = self.train_step(
                state, to_global({k: batch[k] for k in self.batch_keys}, self.sh), self.teacher_params)
            if tcfg.profile_start >= 0 and step == tcfg.profile_start + tcfg.profile_steps - 1:
              jax.block_until_ready(state)
              jax.profiler.stop_trace()
          # Step N's metrics are read only after step N+1 is dispatched: the device never waits.
          if pending is not None:
            done_step, done_metrics = pending
            m = jax.device_get(done_metrics)
            now = time.perf_counter()
            skipped += self._check_finite(m, done_step)
            if window_start is None:  # the first step includes compilation: not timed
              window_start, window_steps = now, 0
            else:
              window_steps += 1
              for k in gen_window:
                gen_window[k] += float(m.get(k, 0.0))
            if (done_step + 1) % tcfg.log_every == 0 or done_step + 1 == tcfg.steps:
              last = {k: float(v) for k, v in m.items() if k not in ("finite", *ONPOLICY_SUMS)}
              if "gen_rows" in m:
                g = gen_window if window_steps else {k: float(m[k]) for k in ONPOLICY_SUMS}
                last["onpolicy_fraction"] = g["gen_rows"] / max(g["rows"], 1.0)
                last["gen_length_mean"] = g["gen_tokens"] / max(g["gen_rows"], 1.0)
                if window_steps:
                  last["gen_tokens_per_s"] = g["gen_tokens"] / (now - window_start)
                gen_window = dict.fromkeys(ONPOLICY_SUMS, 0.0)
              if window_steps:
                dt = (now - window_start) / window_steps
                last["step_time_s"] = dt
                last["tokens_per_s"] = tokens_per_step / dt
                achieved = self.flops_per_token * tokens_per_step / dt / jax.device_count()
                last["tflops_per_device"] = achieved / 1e12
                if self.peak:
                  last["mfu"] = achieved / self.peak
                window_start, window_steps = now, 0
              last["skipped_steps"] = skipped
              writer.write(done_step + 1, last)
              if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}",
                                tok_s=f"{last.get('tokens_per_s', 0):,.0f}")
            if bar is not None:
              bar.update(1)
            if tcfg.eval_every and exp.data_eval and (done_step + 1) % tcfg.eval_every == 0 and (
                done_step + 1) < tcfg.steps:
              writer.write(done_step + 1, self.evaluate(state.params))
          pending = (step, metrics) if step < tcfg.steps else None
          if step == tcfg.steps:
            break
          done = step + 1  # `state` is now the state after `done` steps
          every = exp.checkpoint.save_every
          if preempted() or ckpt.reached_preemption(done):
            # Only a state whose update was finite is saved (read its metrics now, once).
            self._check_finite(jax.device_get(metrics), step)
            ckpt.save(done, state, self.train_iter, config_json, force=True)
            ckpt.wait()
            summary["preempted_at_step"] = done
            break
          if every and done % every == 0 and done < tcfg.steps:
            self._check_finite(jax.device_get(metrics), step)
            ckpt.save(done, state, self.train_iter, config_json)
        if "preempted_at_step" not in summary:
          if ckpt.latest_step() != tcfg.steps:
            ckpt.save(tcfg.steps, state, self.train_iter, config_json, force=True)
          ckpt.wait()
          summary.update(last)
          if exp.data_eval is not None:
            ev = self.evaluate(state.params)
            writer.write(tcfg.steps, ev)
            summary.update(ev)
          if exp.checkpoint.export_hf:
            summary["hf_export"] = str(
              export_hf(state.params, exp.model, self.workdir / f"hf_step{tcfg.steps}"))
      except BaseException:
        self._stop_data()  # its reader threads would log on after the error line
        raise
      finally:
        if bar is not None:
          bar.close()
        writer.close()
        ckpt.close()
    self.state = state
    return summary

  def _stop_data(self):
    """Stops and joins the train data pipeline's threads (so an error is the last line printed)."""
    close = getattr(self.train_iter, "close", None)  # tests may substitute a plain iterator
    if close is not None:
      close()

  def _check_finite(self, m: dict, step: int) -> int:
    """1 if step's update was skipped as non-finite, 0 if finite; raises in 'stop' mode."""
    if m["finite"]:
      return 0
    if self.exp.train.nonfinite == "stop":
      raise TrainingDiverged(
        f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step {step + 1}; "
        "stopping without saving it (the last checkpoint is kept). Lower optimizer.learning_rate, "
        "or set train.nonfinite=skip to skip such steps")
    return 1


# Model fields that may change between runs in one workdir (numerics and memory, not shapes).
_RESUMABLE_MODEL_KEYS = ("attention_impl", "attention_block_size", "remat", "dtype", "scan_layers")


def abstract_state(exp: Experiment, tx, sh: Shardings) -> TrainState:
  """The train state as shapes carrying their target shardings (restore / AOT compile)."""
  params = _abstract_params(exp.model)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params))
  return jax.tree.map(lambda s, shard: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard),
                      shapes, sh.state)


class _OneSliceAtATime:
  """A sharded param whose `[index]` (or whole value) is gathered only when the writer asks for it.

  Each request replicates just that slice (one layer's tensor) and copies it to the host, so an
  export holds one tensor in host RAM and on each device, never the whole model. Every process makes
  the same requests in the same order (they are collectives); only process 0 writes.
  """

  def __init__(self, x: jax.Array):
    self._x = x
    self.shape, self.dtype = x.shape, x.dtype
    # The index is traced: one compile per parameter, not one per layer.
    self._take = jax.jit(lambda x, idx: x[tuple(idx)],
                         out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))

  def _fetch(self, index):
    if self._x.is_fully_addressable:  # one process: assemble the slice's shards on the host directly
      return np.asarray(self._x[index] if index else self._x)
    # Several processes: replicate just this slice (device memory), read this host's copy.
    return np.asarray(self._take(self._x, np.asarray(index, np.int32)).addressable_data(0))

  def __getitem__(self, index):
    return self._fetch(index)

  def __array__(self, dtype=None, copy=None):
    out = self._fetch(())
    return out if dtype is None else out.astype(dtype)


def export_hf(params: dict, model_cfg: ModelConfig, path: epath.Path) -> epath.Path:
  """Writes the (sharded) params as HF safetensors from process 0, tensor by tensor."""
  from jax.experimental import multihost_utils

  from gemma2_jax import distributed

  # One decision for all processes (each one's view of a local path may differ).
  exists = bool(multihost_utils.broadcast_one_to_all(np.int32(path.exists())))
  if exists:  # a finished run re-run: already exported
    return path
  lazy = jax.tree.map(_OneSliceAtATime, params)
  if jax.process_index() == 0:
    checkpoint.save_params(lazy, model_cfg, path, "hf")
  else:
    checkpoint.export_collectives(lazy, model_cfg, "hf")
  distributed.barrier("export_hf", timeout_s=3 * 3600)  # the others wait for the write to end
  return path


@contextlib.contextmanager
def _stop_signals():
  """Yields `stop()`: whether a SIGTERM (preemption, `kill`) or Ctrl-C asked this process to stop.

  One process: a Python handler sets a flag the loop checks once per step. Several processes: the
  decision must be collective (every process saves the same step), and a Python SIGTERM handler
  would displace the notifier that jax.distributed installs; so SIGTERM is left to JAX's preemption
  service, whose sync point (`TrainCheckpointer.reached_preemption`, checked every step) stops all
  processes at one step, and Ctrl-C is turned into a SIGTERM for it.
  """
  received = []
  several = jax.process_count() > 1

  def handler(signum, frame):
    if several:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      received.append(signum)

  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  sigs = (signal.SIGINT,) if several else (signal.SIGTERM, signal.SIGINT)
  old = {sig: signal.signal(sig, handler) for sig in sigs}
  try:
    yield lambda: bool(received)
  finally:
    for sig, h in old.items():
      signal.signal(sig, h)
