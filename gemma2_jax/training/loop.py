"""The training loop: a step generator and the parts that run beside it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading

import jax

from gemma2_jax import checkpoint, paths
from gemma2_jax.checkpoint.manager import TrainCheckpointer
from gemma2_jax.checkpoint.workdir import run_config
from gemma2_jax.errors import UserError
from gemma2_jax.model.config import ModelConfig
from gemma2_jax.parallel.deadline import bounded, deadline, set_timeout
from gemma2_jax.parallel.sharding import (
  data_group,
  make_mesh,
)
from gemma2_jax.training import flops, lora, modes, programs
from gemma2_jax.training.benchmark_hook import BenchmarkHook
from gemma2_jax.training.experiment import Experiment, dataclass_defaults, eval_metric_name
from gemma2_jax.training.hooks import Checkpointer, Evaluator, HFExport, MetricsLogger, Profiler
from gemma2_jax.training.state import TrainState, abstract_state, init_state, start_ema, to_global


class TrainingDiverged(UserError):
  pass


class Trainer:
  def __init__(self, exp: Experiment, workdir: str | os.PathLike):
    self.workdir = paths.as_path(workdir)
    # Every storage operation from here on ends the run with one line if it does not end in time.
    set_timeout(exp.checkpoint.storage_timeout_s)
    self.notes = []  # printed once the workdir is known to be this run's
    self.exp = exp = self._keep_schedule(exp)
    if exp.init_from:
      # A wrong path, or a checkpoint of another model, fails here, before the workdir is touched.
      with deadline("reading the init_from config", exp.init_from):
        checkpoint.check_config(exp.init_from, exp.model, what="init_from")
    self.mode = modes.for_experiment(exp)
    self.mesh = make_mesh(exp.mesh)
    self.train_step = programs.train_program(exp, self.mode, self.mesh)
    self.eval_step = programs.trainer_eval_program(exp, self.mesh)
    self.tx, self.sh = self.train_step.tx, self.train_step.shardings
    # Processes whose devices address the same batch rows read the same data shard.
    self.train_source = exp.offline_paths or _first_path(exp.data_train)
    with deadline("opening the training data", self.train_source):
      self.train_iter = self.mode.train_iterator(data_group(self.sh.batch, exp.train.global_batch))
    self.data_kw = dict(tokenizer_path=exp.tokenizer, vocab_size=exp.model.vocab_size,
                        num_real_tokens=exp.model.num_real_tokens)
    with deadline(*self.mode.loading()):  # the frozen inputs: the teacher, a LoRA run's base
      self.teacher_params = self.mode.load_teacher(self.mesh)
    self.eval_iters = {}  # eval set name -> its iterator, built at the first eval
    # lm-eval tasks every train.benchmarks.every steps (an unknown task or YAML fails here)
    self.bench = BenchmarkHook(exp.train.benchmarks, exp.model, exp.tokenizer, mesh=self.mesh,
                               rules=exp.rules)
    self.flops = flops.step_flops(exp.model, exp.train.seq_len, teacher=self.mode.teacher_cfg,
                                  onpolicy=self.mode.sampling is not None, lora=exp.lora,
                                  anchor=exp.anchored)
    self.peak = flops.peak_flops_per_device(exp.train.peak_tflops_per_device * 1e12)

  def global_batch(self, host_batch: dict) -> dict:
    """This process's rows -> the train program's global batch (the mode's keys and dtypes)."""
    return to_global(self.mode.batch.host(host_batch), self.sh)

  def evaluate(self, params, ema_params=None) -> dict:
    """Every eval set's metrics (`experiment.eval_metric_name`); each set's iterator (and so its
    index of the data) is built once, at the first eval, and rewound for the next. `ema_params`:
    also the EMA's metrics (train.eval_ema), on the same batches."""
    from gemma2_jax.data.pipeline import make_eval_iterator
    from gemma2_jax.training.evaluation import run_eval

    out = {}
    for name, data in self.exp.data_eval.items():
      it = self.eval_iters.get(name)
      source = _first_path(data)
      if it is None:
        group = data_group(self.sh.batch, data.global_batch)
        with deadline(f"opening the eval data {name!r}", source):
          it = self.eval_iters[name] = make_eval_iterator(
            data, num_batches=self.exp.train.eval_batches, process_index=group.index,
            process_count=group.count, **self.data_kw)
      else:
        it.rewind()
      for ema, p in ((False, params), (True, ema_params)):
        if p is None:
          continue
        if ema:  # the same batches as the params'
          it.rewind()
        ev = run_eval(self.eval_step, p, bounded(it, f"reading the eval data {name!r}", source),
                      lambda b: to_global(b, self.sh), max_batches=self.exp.train.eval_batches)
        out.update({eval_metric_name(name, k, ema=ema): v for k, v in ev.items()})
    return out

  def evaluate_state(self, state) -> dict:
    """`evaluate` of a train state: its params, and its EMA with train.eval_ema."""
    ema = self.ema_model_params(state) if self.exp.train.eval_ema else None
    return self.evaluate(self.model_params(state), ema)

  def _check_workdir(self):
    """A workdir belongs to one model: refuse (before touching anything) to mix runs.

    Process 0 checks (or writes) config.json while the others wait: a process reading it while
    process 0 writes it would see a half-written file. A refusal reaches the others through the
    job's watchdog (gemma2_jax.distributed).
    """
    from gemma2_jax.parallel import distributed

    if jax.process_index() == 0:
      with deadline("checking config.json", self.workdir / "config.json"):
        self._check_or_write_config()
    distributed.barrier("workdir_checked", timeout_s=3600)

  def _check_or_write_config(self):
    path = self.workdir / "config.json"
    mine = self.exp.to_json_dict()
    if path.exists():
      try:  # never rewritten here: it is what ties the workdir's checkpoints to their model
        saved = run_config(self.workdir)
      except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"{e}, or use a new --workdir") from None
      # Fields added to ModelConfig after that run was written take their defaults.
      theirs = {**dataclass_defaults(ModelConfig), **saved["model"]}
      diff = sorted(k for k in set(theirs) | set(mine["model"])
                    if theirs.get(k) != mine["model"].get(k) and k not in _RESUMABLE_MODEL_KEYS)
      if diff:
        k = diff[0]
        raise checkpoint.CheckpointError(
          f"workdir {self.workdir} holds a run of a different model (model.{k}: "
          f"{theirs.get(k)!r} there, {mine['model'].get(k)!r} now); use a new --workdir")
      lora.check_resume(self.workdir, saved, mine)
    else:
      self.workdir.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(mine, indent=2))

  def _keep_schedule(self, exp: Experiment) -> Experiment:
    """A resume with another train.steps keeps the learning-rate schedule the run started with: a
    schedule spanning train.steps (optimizer.decay_steps 0) would otherwise jump at the resumed step.
    It continues without a jump (and holds end_learning_rate past its end); an explicit decay_steps
    is the user's choice of another schedule."""
    opt = exp.optimizer
    path = self.workdir / "config.json"
    if opt.schedule == "constant" or opt.decay_steps:
      return exp
    with deadline("reading config.json", path):
      if not path.exists():
        return exp
      try:
        was = run_config(self.workdir)["train"]["steps"]
      except (checkpoint.CheckpointError, KeyError, TypeError):
        return exp  # reported by _check_workdir
    if not isinstance(was, int) or was == exp.train.steps:
      return exp
    self.notes.append(f"note: train.steps {was} -> {exp.train.steps}: the {opt.schedule} learning-rate "
                      f"schedule keeps the run's {was} steps (no jump; end_learning_rate "
                      f"{opt.end_learning_rate:g} after step {was}); set optimizer.decay_steps for another")
    return dataclasses.replace(exp, optimizer=dataclasses.replace(opt, decay_steps=was))

  def restore_or_init(self, ckpt: TrainCheckpointer) -> TrainState:
    """The one place that decides where training starts: workdir checkpoint > init_from > scratch.

    A checkpoint is read as it was saved, with or without an EMA. train.ema_decay switched on for a
    run whose checkpoint has none starts the EMA at the restored params; switched off, drops it
    (each says so on stderr).
    """
    step = ckpt.latest_step()
    if step is None:
      if not self.exp.init_from:
        return init_state(self.exp, self.tx, self.sh)
      with deadline("loading the init_from weights", self.exp.init_from):
        return init_state(self.exp, self.tx, self.sh)
    want = bool(self.exp.train.ema_decay)
    saved = "ema" in ckpt.saved_state_keys(step)
    state = ckpt.restore(step, abstract_state(self.exp, self.tx, self.sh, ema=saved), self.train_iter)
    if want and not saved:
      self._note(f"note: checkpoint step {step} has no EMA of the weights: train.ema_decay "
                 f"{self.exp.train.ema_decay:g} starts it at that step's params")
      return start_ema(state, self.sh)
    if saved and not want:
      self._note(f"note: checkpoint step {step} holds an EMA of the weights; train.ema_decay is 0: "
                 "it is dropped (its next checkpoint has none)")
      return state.replace(ema=None)
    return state

  def _note(self, line: str):
    if jax.process_index() == 0:
      print(line, file=sys.stderr)

  def run(self) -> dict:
    """Trains from where restore_or_init starts to train.steps; returns the summary: start_step, then
    preempted_at_step, or the last logged metrics, the final eval's metrics and hf_export."""
    self._check_workdir()
    for note in self.notes if jax.process_index() == 0 else ():
      print(note, file=sys.stderr)
    ckpt = TrainCheckpointer(self.workdir, self.exp.checkpoint)
    try:
      state = self.restore_or_init(ckpt)
    except BaseException:
      ckpt.close()  # stop Orbax's background threads before the error propagates
      self._stop_data()
      raise
    start = int(jax.device_get(state.step))
    logger = MetricsLogger(self.workdir, self.exp.train, start=start, flops=self.flops,
                           peak=self.peak, check_finite=self._check_finite)
    with _stop_signals() as preempted:
      try:
        state, summary = self._train(state, start, ckpt, logger, preempted)
      except BaseException:
        self._stop_data()  # its reader threads would log on after the error line
        raise
      finally:
        logger.close()
        ckpt.close()
    self.state = state
    return summary

  def _train(self, state, start: int, ckpt: TrainCheckpointer, logger: MetricsLogger,
             preempted) -> tuple[TrainState, dict]:
    """The steps from `start`, then (unless preempted) the final save, the final eval and the export."""
    exp, tcfg = self.exp, self.exp.train
    profiler = Profiler(str(self.workdir / "profile"), tcfg.profile_start, tcfg.profile_steps)
    evaluator = Evaluator(self.evaluate_state, logger.writer, every=tcfg.eval_every, steps=tcfg.steps,
                          enabled=bool(exp.data_eval))
    saver = Checkpointer(ckpt, self.train_iter, exp.to_json_dict(), save_every=exp.checkpoint.save_every,
                         steps=tcfg.steps, stop_requested=preempted, check_finite=self._check_finite)
    export = HFExport(self.workdir, exp.model, steps=tcfg.steps, enabled=bool(exp.checkpoint.export_hf),
                      lora_run=exp if exp.lora else None)
    summary, late = {"start_step": start}, None
    dispatched = self._steps(state, start, profiler)
    for step, state, metrics in dispatched:
      # Step N's metrics are read only after step N+1 is dispatched: the device never waits.
      if late is not None:
        logger(*late)
      late = (step, metrics)
      if evaluator.due(step + 1) or saver.due(step + 1) or self.bench.due(step + 1):
        jax.block_until_ready(state)  # the step's own time stays in the step-time window
      if evaluator.due(step + 1):
        with logger.paused("eval"):  # the params of exactly step + 1 updates, labelled so
          evaluator(step + 1, state)
      if self.bench.due(step + 1):  # before the next step is dispatched (it donates the state)
        with logger.paused("eval"):
          logger.writer.write(step + 1, self.bench(step + 1, self.model_params(state)))
      with logger.paused("save"):
        preempted_now = saver(step + 1, state, metrics)
      if preempted_now:
        summary["preempted_at_step"] = step + 1
        return state, summary
    if late is not None:
      logger(*late)  # the last step (no periodic eval there: the final eval follows)
    with logger.paused("save"):
      saver.final(state)
    summary.update(logger.last)
    with logger.paused("eval"):
      summary.update(evaluator.final(state))
    summary.update(self.bench.last)
    summary.update(export(self.model_params(state), ema=self.ema_model_params(state)))
    summary.update(logger.times())
    return state, summary

  def _steps(self, state, start: int, profiler: Profiler):
    """Dispatches steps start .. train.steps-1; yields (step, the state after it, its unread metrics)."""
    for step in range(start, self.exp.train.steps):
      profiler.before(step)
      with deadline("reading the training data", self.train_source):
        batch = next(self.train_iter)
      state, metrics = self._dispatch(state, batch)
      profiler.after(step, state)
      yield step, state, metrics

  def model_params(self, state):
    """What evaluation and the export take: the params (a LoRA run's: with its frozen base)."""
    return self.mode.model_params(state.params, self.teacher_params)

  def ema_model_params(self, state):
    """`model_params` of the state's EMA (None without one)."""
    return None if state.ema is None else self.mode.model_params(state.ema, self.teacher_params)

  def _dispatch(self, state, batch: dict):
    """One train step on a host batch, dispatched, not waited for: (new state, metrics on device)."""
    return self.train_step(state, self.global_batch(batch), self.teacher_params)

  def _stop_data(self):
    """Stops and joins the data pipelines' threads (so an error is the last line printed)."""
    for it in (self.train_iter, *self.eval_iters.values()):
      close = getattr(it, "close", None)  # tests may substitute a plain iterator
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


def _first_path(data) -> str:
  """What a data-read deadline names: the first path of the data's sources."""
  return next((p for source in data.sources for p in source.paths), "the data")


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
