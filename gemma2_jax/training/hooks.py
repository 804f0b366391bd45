"""The parts that run beside the training steps, each knowing how often it runs.

Trainer.run (gemma2_jax.training.loop) dispatches the steps and calls these parts; none of them
dispatches a step. Step numbers: `step` is a step's 0-based index, `done = step + 1` the number of
steps whose update a state holds (what metrics rows and checkpoints are labelled with).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

from gemma2_jax.checkpoint.export import export_hf
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
  time, tokens/s, TFLOP/s per device and MFU, and the on-policy rates made from the step's raw sums
  (ONPOLICY_SUMS: rows, gen_rows, gen_tokens). The first step read is not timed: it includes
  compilation. `check_finite(metrics, step)` returns 1 for a skipped step (or raises).
  """

  def __init__(self, workdir, train, *, start: int, flops_per_token: float, peak: float | None,
               check_finite: Callable[[dict, int], int]):
    self.writer = MetricsWriter(workdir)
    self.bar = None
    if train.progress_bar and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    self.steps, self.log_every = train.steps, train.log_every
    self.tokens_per_step = train.global_batch * train.seq_len
    self.flops_per_token, self.peak = flops_per_token, peak
    self.sums, self.check_finite = ONPOLICY_SUMS, check_finite
    self.last: dict = {}  # the last row written
    self.skipped = 0
    self.window_start, self.window_steps = None, 0
    self.gen_window = dict.fromkeys(ONPOLICY_SUMS, 0.0)  # on-policy sums over the timed steps

  def due(self, done: int) -> bool:
    return done % self.log_every == 0 or done == self.steps

  def __call__(self, step: int, metrics):
    m = jax.device_get(metrics)
    now = time.perf_counter()
    self.skipped += self.check_finite(m, step)
    if self.window_start is None:  # the first step includes compilation: not timed
      self.window_start, self.window_steps = now, 0
    else:
      self.window_steps += 1
      for k in self.gen_window:
        self.gen_window[k] += float(m.get(k, 0.0))
    if self.due(step + 1):
      self.last = self._row(m, now)
      self.writer.write(step + 1, self.last)
      if self.bar is not None:
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}",
                             tok_s=f"{self.last.get('tokens_per_s', 0):,.0f}")
    if self.bar is not None:
      self.bar.update(1)

  def _row(self, m: dict, now: float) -> dict:
    row = {k: float(v) for k, v in m.items() if k not in ("finite", *self.sums)}
    if "gen_rows" in m:
      row.update(self._onpolicy_rates(m, now))
    if self.window_steps:
      row.update(self._throughput(now))
    row["skipped_steps"] = self.skipped
    return row

  def _onpolicy_rates(self, m: dict, now: float) -> dict:
    """Over the window (before its timing restarts); no timed step yet: this step's sums alone."""
    g = self.gen_window if self.window_steps else {k: float(m[k]) for k in self.sums}
    rates = {"onpolicy_fraction": g["gen_rows"] / max(g["rows"], 1.0),
             "gen_length_mean": g["gen_tokens"] / max(g["gen_rows"], 1.0)}
    if self.window_steps:
      rates["gen_tokens_per_s"] = g["gen_tokens"] / (now - self.window_start)
    self.gen_window = dict.fromkeys(self.sums, 0.0)
    return rates

  def _throughput(self, now: float) -> dict:
    dt = (now - self.window_start) / self.window_steps
    achieved = self.flops_per_token * self.tokens_per_step / dt / jax.device_count()
    out = {"step_time_s": dt, "tokens_per_s": self.tokens_per_step / dt,
           "tflops_per_device": achieved / 1e12}
    if self.peak:
      out["mfu"] = achieved / self.peak
    self.window_start, self.window_steps = now, 0
    return out

  def close(self):
    if self.bar is not None:
      self.bar.close()
    self.writer.close()


class Evaluator:
  """Eval every `every` steps (not at the last: the final eval follows the final save) and at the end;
  its metrics go to metrics.jsonl under the step they are reported at. every=0: only the final one."""

  def __init__(self, evaluate: Callable[..., dict], writer: MetricsWriter, *, every: int, steps: int,
               enabled: bool):
    self.evaluate, self.writer = evaluate, writer
    self.every, self.steps, self.enabled = every, steps, enabled

  def due(self, done: int) -> bool:
    return bool(self.enabled and self.every and done % self.every == 0 and done < self.steps)

  def __call__(self, done: int, params):
    if self.due(done):
      self.writer.write(done, self.evaluate(params))

  def final(self, params) -> dict:
    if not self.enabled:
      return {}
    ev = self.evaluate(params)
    self.writer.write(self.steps, ev)
    return ev


class Checkpointer:
  """Saves every `save_every` steps (not at the last: `final` saves it) and on preemption.

  Preemption: a stop asked of this process (`stop_requested()`, see loop._stop_signals) or the
  collective sync point `ckpt.reached_preemption(done)`, checked after every step on every process;
  the state is then saved at once and waited for. Only a state whose update was finite is saved:
  its metrics are read (one device_get) before saving, and `check_finite` raises in 'stop' mode.
  """

  def __init__(self, ckpt, data_iter, config_json: dict, *, save_every: int, steps: int,
               stop_requested: Callable[[], bool], check_finite: Callable[[dict, int], int]):
    self.ckpt, self.data_iter, self.config_json = ckpt, data_iter, config_json
    self.every, self.steps = save_every, steps
    self.stop_requested, self.check_finite = stop_requested, check_finite

  def due(self, done: int) -> bool:
    return bool(self.every and done % self.every == 0 and done < self.steps)

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

  def final(self, state):
    """The last step's state, unless a run that already finished saved it; waits for the writes."""
    if self.ckpt.latest_step() != self.steps:
      self.ckpt.save(self.steps, state, self.data_iter, self.config_json, force=True)
    self.ckpt.wait()


class HFExport:
  """At the end of a finished run: the params as a Hugging Face checkpoint in workdir/hf_step{steps}."""

  def __init__(self, workdir, model_cfg, *, steps: int, enabled: bool):
    self.workdir, self.model_cfg, self.steps, self.enabled = workdir, model_cfg, steps, enabled

  def __call__(self, params) -> dict:
    if not self.enabled:
      return {}
    return {"hf_export": str(export_hf(params, self.model_cfg, self.workdir / f"hf_step{self.steps}"))}
