"""The training loop: a step generator and the parts that run beside it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import jax

from gemma2_jax import checkpoint, paths
from gemma2_jax.checkpoint.export import export_hf
from gemma2_jax.checkpoint.manager import TrainCheckpointer
from gemma2_jax.distill import onpolicy
from gemma2_jax.distill.teacher import load_teacher
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.parallel.sharding import (
  activation_sharding,
  data_group,
  make_mesh,
)
from gemma2_jax.training import flops
from gemma2_jax.training.experiment import Experiment, dataclass_defaults
from gemma2_jax.training.metrics import MetricsWriter
from gemma2_jax.training.optim import make_optimizer
from gemma2_jax.training.state import TrainState, abstract_state, init_state, state_shardings, to_global
from gemma2_jax.training.steps import BATCH_KEYS, ONPOLICY_SUMS, TOPK_KEYS, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
  pass


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
      self.teacher_cfg, self.teacher_params = load_teacher(exp.teacher, exp.model, exp.rules, self.mesh)
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
      self.eval_step = jax.jit(make_eval_step(exp.model, chunk=exp.train.loss_chunk,
                                              micro_batches=exp.train.grad_accum_steps),
                               in_shardings=(self.sh.state.params, self.sh.batch),
                               out_shardings=self.sh.replicated)
    self.flops_per_token = flops.train_flops_per_token(exp.model, exp.train.seq_len)
    self.peak = flops.peak_flops_per_device(exp.train.peak_tflops_per_device * 1e12)

  def _sharding_ctx(self):
    return activation_sharding(self.mesh, self.exp.rules)

  def evaluate(self, params) -> dict:
    from gemma2_jax.data.pipeline import make_eval_iterator
    from gemma2_jax.training.evaluation import run_eval

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
    from gemma2_jax.parallel import distributed

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
