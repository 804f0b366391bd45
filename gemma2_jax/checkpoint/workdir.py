"""A training workdir as a (read-only) weights source: the params of its newest complete checkpoint.

Lets `python -m gemma2_jax.convert --src WORKDIR --to hf` export on demand, and `init_from` /
`teacher.checkpoint` point at a run of our own (e.g. a teacher trained here).
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from gemma2_jax.checkpoint import native, orbax_io
from gemma2_jax.checkpoint.errors import CheckpointError
from gemma2_jax.model.config import ModelConfig


def is_workdir(path: epath.Path) -> bool:
  """A `checkpoints/` directory beside a `config.json` that is not an HF config (a damaged one
  counts: `run_config` then says what is wrong and how to restore it)."""
  if not (path / "checkpoints").is_dir() or not (path / "config.json").exists():
    return False
  try:
    return "train" in json.loads((path / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return True


def run_config(path: epath.Path) -> dict:
  """The run's config.json (the experiment as JSON); a CheckpointError saying how to restore it from a
  checkpoint's copy when it is not one."""
  file = path / "config.json"
  try:
    saved = json.loads(file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    saved = e
  if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
    why = (f"not valid JSON ({saved})" if isinstance(saved, Exception)
           else "not the config of a training run (no model section)")
    raise CheckpointError(f"{file} is {why}; every checkpoint keeps a copy of it: restore it with cp "
                          f"{path / 'checkpoints'}/STEP/config/metadata {file}")
  return saved


def latest_state(path: epath.Path) -> epath.Path:
  _model_run(path)
  # Locally Orbax renames a step directory into place once its save is finalized; in a bucket it
  # writes in place and marks the step complete at the end: ask Orbax, not the name.
  import orbax.checkpoint as ocp

  steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir()
                 if p.name.isdigit() and ocp.path.step.is_checkpoint_finalized(p))
  if not steps:
    raise CheckpointError(f"workdir {path} has no complete checkpoint yet")
  return path / "checkpoints" / str(steps[-1]) / "state"


def _params_tree(state: epath.Path) -> dict:
  tree = orbax_io.metadata(state)
  if "params" not in tree:
    raise CheckpointError(f"{state} holds no params")
  return {"params": tree["params"]}


def stored_dtype(path: epath.Path) -> np.dtype:
  return orbax_io.leaf_dtype(_params_tree(latest_state(path)), ("params", "embedder", "input_embedding"))


def read_config(path: epath.Path) -> ModelConfig:
  return ModelConfig.from_dict(_model_run(path)["model"])


def _model_run(path: epath.Path) -> dict:
  """The run's config; a CheckpointError for a LoRA run, whose checkpoints hold adapters (the model is
  its base plus them), naming what to use instead."""
  saved = run_config(path)
  if saved.get("lora"):
    raise CheckpointError(
      f"workdir {path} is a LoRA run: its checkpoints hold adapters, not a model; use its merged export "
      f"({path}/hf_step<N>) or merge its adapter into the base: python -m gemma2_jax.convert "
      f"--src {saved.get('init_from') or 'BASE'} --merge_lora {path}/peft_step<N> --dst OUT --to hf")
  return saved


def _open(path: epath.Path, config: ModelConfig | None) -> tuple[ModelConfig, epath.Path, dict]:
  cfg = config or read_config(path)
  state = latest_state(path)
  tree = _params_tree(state)
  native.check_tree(state, tree["params"], cfg)
  return cfg, state, tree


def _restore(state: epath.Path, tree: dict, **kwargs) -> dict:
  """As for a resume (TrainCheckpointer.restore): an unreadable newest step is refused, never
  skipped on its own; the message says how to skip it."""
  try:
    return orbax_io.restore(state, tree, partial=True, **kwargs)["params"]
  except CheckpointError as e:
    step = state.parent
    raise CheckpointError(f"{e}; nothing was changed. To use the step before it, move {step} out of "
                          f"the checkpoints (e.g. mv {step} {step.parent.parent}/unreadable_step_"
                          f"{step.name})") from None


def load(path: epath.Path, dtype, config: ModelConfig | None = None, progress=None):
  cfg, state, tree = _open(path, config)
  params = _restore(state, tree, dtype=dtype)
  if progress is not None:
    progress.reset(total=1)
    progress.update(1)
  return cfg, params


def load_sharded(path: epath.Path, dtype, shardings, config: ModelConfig | None = None):
  """Only the params of the newest checkpoint, restored straight onto their target shardings."""
  cfg, state, tree = _open(path, config)
  args = {"params": native.sharded_args(cfg, tree["params"], dtype, shardings)}
  return cfg, _restore(state, tree, restore_args=args)
