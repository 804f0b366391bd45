"""The parts that run beside the training steps, each knowing how often it runs.

Trainer.run (gemma2_jax.training.loop) dispatches the steps and calls these parts; none of them
dispatches a step. Step numbers: `step` is a step's 0-based index, `done = step + 1` the number of
steps whose update a state holds (what metrics rows and checkpoints are labelled with).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import jax

from gemma2_jax.checkpoint.export import export_hf
from gemma2_jax.training.flops import StepFlops
from gemma2_jax.training.lora import export as lora_export
from gemma2_jax.training.metrics import MetricsWriter
from gemma2_jax.training.modes import ONPOLICY_SUMS


class Profiler:
  """A JAX trace of steps first .. first+count-1 (0-based) written to `logdir`; first < 0: none."""

  def __init__(self, logdir: str, first: int, count: int):
    self.logdir, self.first, self.count = logdir, first, count

  def before(self, step: int):
    if step == self.first:
      jax.profiler.start_trace(self.logdir)

  def after(self, step: int, state):
    if self.first >= 0 and step == self.first + self.count - 1:
      jax.block_until_ready(state)  # else the trace would end before the step's work does
      jax.profiler.stop_trace()


class MetricsLogger:
  """Reads each step's metrics (one step late, see Trainer.run) and writes a metrics.jsonl row every
  `log_every` steps and at the last step; drives the progress bar (process 0).

  A row holds the step's metrics, skipped_steps, and over the steps since the previous row: step
  time, tokens/s (loss-bearing tokens: the steps' `tokens`), slots/s (the batch's positions, padding
  included), TFLOP/s per device, MFU (every model FLOP of the step: `flops.StepFlops`) and
  student_mfu, and the on-policy rates made from the step's raw sums (ONPOLICY_SUMS: rows,
  gen_rows, gen_tokens). The first step read is not timed: it includes compilation. Time spent in
  `paused()` (evals, saves) is kept out of the step times and reported apart (`times()`).
  `check_finite(metrics, step)` returns 1 for a skipped step (or raises).
  """

  def __init__(self, workdir, train, *, start: int, flops: StepFlops, peak: float | None,
               check_finite: Callable[[dict, int], int]):
    self.writer = MetricsWriter(workdir)
    self.bar = None
    if train.progress_bar and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    self.steps, self.log_every = train.steps, train.log_every
    self.slots_per_step = train.global_batch * train.seq_len
    self.flops, self.peak = flops, peak
    self.sums, self.check_finite = ONPOLICY_SUMS, check_finite
    self.last: dict = {}  # the last row written
    self.skipped = 0
    self.window_start, self.window_steps = None, 0
    self.window = dict.fromkeys(("tokens", *ONPOLICY_SUMS), 0.0)  # sums over the timed steps
    self.started = time.perf_counter()
    self.spent = {"first_step_s": 0.0, "step_s": 0.0, "eval_s": 0.0, "save_s": 0.0}

  @contextlib.contextmanager
  def paused(self, kind: str):
    """Time spent inside goes to `kind` ("eval", "save"), not to the step-time window."""
    start = time.perf_counter()
    try:
      yield
    finally:
      spent = time.perf_counter() - start
      self.spent[f"{kind}_s"] += spent
      if self.window_start is not None:
        self.window_start += spent

  def times(self) -> dict:
    """Wall time of the run so far by kind, and goodput: the share of it spent in timed steps."""
    now = time.perf_counter()
    spent = dict(self.spent)
    if self.window_steps:  # timed steps not yet in a row
      spent["step_s"] += now - self.window_start
    wall = now - self.started
    return {"wall_time_s": wall, **spent, "goodput": spent["step_s"] / max(wall, 1e-9)}

  def due(self, done: int) -> bool:
    return done % self.log_every == 0 or done == self.steps

  def __call__(self, step: int, metrics):
    m = jax.device_get(metrics)
    now = time.perf_counter()
    self.skipped += self.check_finite(m, step)
    if self.window_start is None:  # the first step includes compilation: not timed
      self.window_start, self.window_steps = now, 0
      self.spent["first_step_s"] = now - self.started - self.spent["eval_s"] - self.spent["save_s"]
    else:
      self.window_steps += 1
      for k in self.window:
        self.window[k] += float(m.get(k, 0.0))
    if self.due(step + 1):
      self.last = self._row(m, now)
      self.writer.write(step + 1, self.last)
      if self.bar is not None:
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}",
                             tok_s=f"{self.last.get('tokens_per_s', 0):,.0f}")
    if self.bar is not None:
      self.bar.update(1)

  def _row(self, m: dict, now: float) -> dict:
    """The step's metrics; the rates over the window's timed steps (no timed step yet: the on-policy
    rates of this step's sums alone); the window then restarts."""
    row = {k: float(v) for k, v in m.items() if k not in ("finite", *self.sums)}
    steps, dt = self.window_steps, now - self.window_start
    sums = self.window if steps else {k: float(m.get(k, 0.0)) for k in self.window}
    if "gen_rows" in m:
      row["onpolicy_fraction"] = sums["gen_rows"] / max(sums["rows"], 1.0)
      row["gen_length_mean"] = sums["gen_tokens"] / max(sums["gen_rows"], 1.0)
      if steps:
        row["gen_tokens_per_s"] = sums["gen_tokens"] / dt
    if steps:
      row.update(self._throughput(sums, steps, dt))
      self.spent["step_s"] += dt
      self.window_start, self.window_steps = now, 0
    self.window = dict.fromkeys(self.window, 0.0)
    row["skipped_steps"] = self.skipped
    return row

  def _throughput(self, sums: dict, steps: int, dt: float) -> dict:
    slots = self.slots_per_step * steps
    per_device = dt * jax.device_count()
    model = self.flops.total(slots, sums["gen_tokens"])
    out = {"step_time_s": dt / steps, "tokens_per_s": sums["tokens"] / dt, "slots_per_s": slots / dt,
           "tflops_per_device": model / per_device / 1e12}
    if self.peak:
      out["mfu"] = model / per_device / self.peak
      out["student_mfu"] = self.flops.student * slots / per_device / self.peak
    return out

  def close(self):
    if self.bar is not None:
      self.bar.close()
    self.writer.close()


class Evaluator:
  """Eval every `every` steps (not at the last: the final eval follows the final save) and at the end;
  its metrics go to metrics.jsonl under the step they are reported at. every=0: only the final one.
  `evaluate` takes what the loop passes (Trainer.evaluate_state: the train state)."""

  def __init__(self, evaluate: Callable[..., dict], writer: MetricsWriter, *, every: int, steps: int,
               enabled: bool):
    self.evaluate, self.writer = evaluate, writer
    self.every, self.steps, self.enabled = every, steps, enabled

  def due(self, done: int) -> bool:
    return bool(self.enabled and self.every and done % self.every == 0 and done < self.steps)

  def __call__(self, done: int, state):
    if self.due(done):
      self.writer.write(done, self.evaluate(state))

  def final(self, state) -> dict:
    if not self.enabled:
      return {}
    ev = self.evaluate(state)
    self.writer.write(self.steps, ev)
    return ev


class Checkpointer:
  """Saves every `save_every` steps and/or every `checkpoint.save_every_minutes` of wall time (not at
  the last step: `final` saves it), and on preemption.

  The time cadence counts from the start of the run or the last save. With several processes one
  clock decides, so that every process saves the same step: process 0 publishes its decision for
  each step in the coordination service's key-value store and the others read it at that step (as
  Orbax's ContinuousCheckpointingPolicy does: a host-side RPC, no device collective, so the device
  queue never drains for it).

  Preemption: a stop asked of this process (`stop_requested()`, see loop._stop_signals) or the
  collective sync point `ckpt.reached_preemption(done)`, checked after every step on every process;
  the state is then saved at once and waited for. Only a state whose update was finite is saved:
  its metrics are read (one device_get) before saving, and `check_finite` raises in 'stop' mode.
  """

  def __init__(self, ckpt, data_iter, config_json: dict, *, save_every: int, steps: int,
               stop_requested: Callable[[], bool], check_finite: Callable[[dict, int], int],
               save_every_minutes: float | None = None, clock: Callable[[], float] = time.monotonic):
    self.ckpt, self.data_iter, self.config_json = ckpt, data_iter, config_json
    self.every, self.steps = save_every, steps
    self.stop_requested, self.check_finite = stop_requested, check_finite
    if save_every_minutes is None:  # the workdir checkpointer's setting (checkpoint.save_every_minutes)
      save_every_minutes = getattr(getattr(ckpt, "cfg", None), "save_every_minutes", 0.0)
    self.interval_s = 60.0 * float(save_every_minutes or 0.0)
    self.clock = clock
    self.last_save = clock()
    self._decided: tuple[int, bool] | None = None  # (done, due) of the last step decided

  def due(self, done: int) -> bool:
    if not (done < self.steps):
      return False
    if self.every and done % self.every == 0:
      return True
    if not self.interval_s:
      return False
    if self._decided is None or self._decided[0] != done:  # decided once per step (a KV exchange)
      self._decided = (done, self._time_due(done))
    return self._decided[1]

  def _time_due(self, done: int) -> bool:
    mine = self.clock() - self.last_save >= self.interval_s
    if jax.process_count() == 1:
      return mine
    from jax._src import distributed as dist

    client, key = dist.global_state.client, f"gemma2_jax/timed_save/{done}"
    if jax.process_index() == 0:
      client.key_value_set(key, "1" if mine else "0", allow_overwrite=True)
      if done > 1000:  # every process read that step's decision long ago (the steps' collectives)
        try:
          client.key_value_delete(f"gemma2_jax/timed_save/{done - 1000}")
        except Exception:  # housekeeping only
          pass
      return mine
    return client.blocking_key_value_get(key, 3_600_000) == "1"

  def __call__(self, done: int, state, metrics) -> bool:
    """Saves `state` (after `done` steps) where due; True: preempted (saved), the run must stop."""
    if self.stop_requested() or self.ckpt.reached_preemption(done):
      self._save(done, state, metrics, force=True)
      self.ckpt.wait()
      return True
    if self.due(done):
      self._save(done, state, metrics)
    return False

  def _save(self, done: int, state, metrics, **kw):
    self.check_finite(jax.device_get(metrics), done - 1)
    self.ckpt.save(done, state, self.data_iter, self.config_json, **kw)
    self.last_save = self.clock()

  def final(self, state):
    """The last step's state, unless a run that already finished saved it; waits for the writes."""
    if self.ckpt.latest_step() != self.steps:
      self.ckpt.save(self.steps, state, self.data_iter, self.config_json, force=True)
    self.ckpt.wait()


class HFExport:
  """At the end of a finished run: the params as a Hugging Face checkpoint in workdir/hf_step{steps}
  (`lora_run`, a LoRA run's experiment: the merged weights, and the adapter as PEFT in
  workdir/peft_step{steps}: training/lora.py), and the EMA's (train.ema_decay) beside them in
  hf_step{steps}_ema (a LoRA run: also peft_step{steps}_ema, the EMA of the adapter)."""

  def __init__(self, workdir, model_cfg, *, steps: int, enabled: bool, lora_run=None):
    self.workdir, self.model_cfg, self.steps, self.enabled = workdir, model_cfg, steps, enabled
    self.lora_run = lora_run

  def __call__(self, params, ema=None) -> dict:
    if not self.enabled:
      return {}
    out = self._export(params, "")
    if ema is not None:
      out.update({f"{k}_ema": v for k, v in self._export(ema, "_ema").items()})
    return out

  def _export(self, params, suffix: str) -> dict:
    if self.lora_run is not None:
      return lora_export(params, self.lora_run, self.workdir, self.steps, suffix)
    return {"hf_export": str(export_hf(params, self.model_cfg,
                                       self.workdir / f"hf_step{self.steps}{suffix}"))}
