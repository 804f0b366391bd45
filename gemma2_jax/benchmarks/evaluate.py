"""lm-eval tasks on a `Gemma2JaxLM` from Python (the training hook, scripts): tasks named as lm_eval
registers them and/or given as local task YAML files, results flattened to `bench/<task>/<metric>`.

    tasks = Tasks(["kobest_copa", "path/to/my_task.yaml"])
    results = evaluate(lm, tasks, limit=100)      # lm_eval.simple_evaluate's dict, on every process
    metrics(results)                              # {"bench/kobest_copa/acc": 0.61, ...}

With several processes every process calls `evaluate` alike (see harness.py); the results are the
same on all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gemma2_jax.benchmarks.harness import HarnessError


def is_task_file(task: str) -> bool:
  return task.endswith((".yaml", ".yml"))


class Tasks:
  """lm_eval's TaskManager for `tasks`, built once: a local YAML's folder is indexed, and lm_eval's
  built-in tasks (about 15k YAMLs, ~10 s) only when a task is named rather than given as a file."""

  def __init__(self, tasks: Sequence[str]):
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    if isinstance(tasks, str) or not tasks:
      raise HarnessError(f"tasks must be a non-empty list of task names or YAML paths, got {tasks!r}")
    self.names, folders = [], []
    for task in tasks:
      if not is_task_file(task):
        self.names.append(task)
        continue
      path = Path(task).expanduser()
      if not path.is_file():
        raise HarnessError(f"task file {task} does not exist")
      config = load_yaml(path, resolve_func=False)
      name = config.get("task") or config.get("group")
      if not isinstance(name, str):
        raise HarnessError(f"task file {task} names no task (a `task:` or `group:` key)")
      self.names.append(name)
      folders.append(str(path.resolve().parent))
    named = len(folders) < len(self.names)
    self.manager = TaskManager(include_path=sorted(set(folders)) or None, include_defaults=named)
    unknown = [n for n in self.names if n not in self.manager.all_tasks]
    if unknown:
      raise HarnessError(f"unknown lm-eval task {unknown[0]!r} (a registered name, e.g. kobest_copa, "
                         "or the path of a task YAML)")


def evaluate(lm, tasks: Tasks, *, limit: int | float | None = None, num_fewshot: int | None = None,
             log_samples: bool = False, bootstrap_iters: int = 0, seed: int = 0) -> dict:
  """lm_eval.simple_evaluate of `tasks` on `lm`."""
  import lm_eval

  return lm_eval.simple_evaluate(
    model=lm, tasks=list(tasks.names), task_manager=tasks.manager, limit=limit,
    num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def metrics(results: dict, prefix: str = "bench") -> dict[str, float]:
  """`{prefix}/<task>/<metric>` of every task (and group) in `results` ("acc,none" is `acc`; another
  filter than "none" is kept: `exact_match_strict-match`); stderrs and non-numbers left out."""
  out = {}
  for task, values in results["results"].items():
    for key, value in values.items():
      metric, _, filt = key.partition(",")
      if not filt or "_stderr" in metric or isinstance(value, bool):
        continue
      if not isinstance(value, int | float) or math.isnan(value):
        continue
      name = metric if filt == "none" else f"{metric}_{filt}"
      out[f"{prefix}/{task}/{name}"] = float(value)
  return out
