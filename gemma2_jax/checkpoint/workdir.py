"""A training workdir as a (read-only) weights source: the params of its newest complete checkpoint.

Lets `python -m gemma2_jax.convert --src WORKDIR --to hf` export on demand, and `init_from` /
`teacher.checkpoint` point at a run of our own (e.g. a teacher trained here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gemma2_jax.checkpoint import orbax_io
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.model.config import ModelConfig


def is_workdir(path: Path) -> bool:
  if not (path / "checkpoints").is_dir() or not (path / "config.json").exists():
    return False
  try:
    return "train" in json.loads((path / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return False


def latest_state(path: Path) -> Path:
  # Orbax renames a step directory into place only once its save is finalized: numeric = complete.
  steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
  if not steps:
    raise CheckpointError(f"workdir {path} has no complete checkpoint yet")
  return path / "checkpoints" / str(steps[-1]) / "state"


def _params_tree(state: Path) -> dict:
  tree = orbax_io.metadata(state)
  if "params" not in tree:
    raise CheckpointError(f"{state} holds no params")
  return {"params": tree["params"]}


def stored_dtype(path: Path) -> np.dtype:
  return orbax_io.leaf_dtype(_params_tree(latest_state(path)), ("params", "embedder", "input_embedding"))


def load(path: Path, dtype, config: ModelConfig | None = None, progress=None):
  model = json.loads((path / "config.json").read_text())["model"]
  cfg = config or ModelConfig.from_dict(model)
  state = latest_state(path)
  params = orbax_io.restore(state, _params_tree(state), dtype, partial=True)["params"]
  if progress is not None:
    progress.reset(total=1)
    progress.update(1)
  return cfg, params
