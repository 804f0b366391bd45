"""Periodic lm-evaluation-harness benchmarks during training (config `train.benchmarks`).

Every `every` steps the trainer calls the hook with the training params as they are on the mesh:
the `gemma2_jax` lm-eval model scores with them in place (no export, no second copy of the weights;
params are only read: the scoring programs donate nothing) and the hook returns
`{"bench/<task>/<metric>": value}` for metrics.jsonl and TensorBoard. Every process calls it at the
same step and runs the same programs (see gemma2_jax/benchmarks/harness.py); the metrics are the same
on all of them. Needs the `eval` extra (PyPI `lm-eval`), imported at the first construction.
"""

from __future__ import annotations

import dataclasses

from gemma2_jax.errors import UserError


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarksConfig:
  # lm-eval task names (`kobest_copa`, groups such as `kobest`, `kmmlu`) and/or local task YAML paths.
  tasks: tuple[str, ...] = ()
  every: int = 0  # run after every `every` steps (0: never)
  limit: int | None = None  # examples per task (None: all)
  num_fewshot: int | None = None  # None: each task's default
  batch_size: int = 16  # rows per scoring batch (rounded up to the mesh's batch shards)
  max_length: int | None = None  # None: the training seq_len's context (harness default 8192)
  max_gen_toks: int | None = None  # generate_until tasks (harness default 256)
  seed: int = 0  # lm_eval's few-shot and sampling seeds

  def __post_init__(self):
    if isinstance(self.tasks, str):
      object.__setattr__(self, "tasks", tuple(t for t in self.tasks.split(",") if t))
    object.__setattr__(self, "tasks", tuple(self.tasks))
    if self.every < 0:
      raise UserError(f"train.benchmarks.every must be >= 0, got {self.every}")
    if self.every and not self.tasks:
      raise UserError("train.benchmarks.every is set but train.benchmarks.tasks is empty")

  @property
  def enabled(self) -> bool:
    return bool(self.every and self.tasks)


class BenchmarkHook:
  """`due(done)` after `done` steps; `hook(done, params) -> {"bench/<task>/<metric>": value}`.

  The task index (built here: an unknown task fails before training starts) and the model's
  compiled programs are built once and reused at every call. `done` labels nothing here: the caller
  writes the metrics under its step.
  """

  def __init__(self, config: BenchmarksConfig, model_cfg, tokenizer, *, mesh=None, rules=None):
    self.config = config
    self.model_cfg, self.tokenizer, self.mesh, self.rules = model_cfg, tokenizer, mesh, rules
    self._tasks = self._lm = None
    self.last: dict[str, float] = {}  # the latest call's metrics (for the run's summary)
    if config.enabled:
      try:
        from gemma2_jax.benchmarks.evaluate import Tasks
      except ImportError as e:  # lm-eval is the `eval` extra
        raise UserError(f"train.benchmarks needs lm-evaluation-harness ({e.name or e} is not "
                        "installed): pip install -e '.[eval]' (scripts/pod.sh setup --extras=tpu,eval), "
                        "or set train.benchmarks.every=0") from None
      self._tasks = Tasks(config.tasks)  # an unknown task fails here, before training starts

  def due(self, done: int) -> bool:
    return bool(self.config.enabled and done > 0 and done % self.config.every == 0)

  def __call__(self, done: int, params) -> dict[str, float]:
    from gemma2_jax.benchmarks.evaluate import evaluate, metrics

    if not self.config.enabled:
      return {}
    if self._lm is None:
      from gemma2_jax.benchmarks.harness import Gemma2JaxLM

      c = self.config
      self._lm = Gemma2JaxLM.from_params(
        self.model_cfg, params, self.tokenizer, mesh=self.mesh, rules=self.rules,
        batch_size=c.batch_size, max_length=c.max_length, max_gen_toks=c.max_gen_toks, seed=c.seed,
        progress=False)
    else:
      self._lm.use_params(params)
    try:
      results = evaluate(self._lm, self._tasks, limit=self.config.limit,
                         num_fewshot=self.config.num_fewshot, seed=self.config.seed)
    finally:
      self._lm.use_params(None)  # hold no reference to this step's params between calls
    self.last = metrics(results)
    return self.last
