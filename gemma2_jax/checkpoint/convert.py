"""Conversion of a checkpoint to another format, tensor by tensor (`python -m gemma2_jax.convert`)."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from gemma2_jax.checkpoint import (
  CheckpointError,
  check_config,
  load_params,
  read_config,
  save_params,
  stored_dtype,
)
from gemma2_jax.model.config import FLOAT_DTYPES, ModelConfig, float_dtype


def read_model_config(path: str | os.PathLike) -> ModelConfig:
  """A JSON file of ModelConfig fields, bare or under "model" (gemma2_jax.json, a workdir's config)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"--model_config {path}: not valid JSON ({e})") from None
  if isinstance(d, dict) and isinstance(d.get("model"), dict):
    d = d["model"]
  if not isinstance(d, dict):
    raise CheckpointError(f"--model_config {path}: expected a JSON object of ModelConfig fields")
  try:
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"--model_config {path}: {e}") from None


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, dtype: str | None = None,
            config: ModelConfig | None = None, max_shard_bytes: int | None = None,
            progress=None,
            merge_lora: str | os.PathLike | None = None) -> tuple[ModelConfig, np.dtype, os.PathLike]:
  """Writes the checkpoint `src` (any format, detected) as format `to` to the new directory `dst`.

  `dtype`: of the written tensors (default: the one `src` stores; reading in it keeps the copy in
  memory the size of the checkpoint). `config`: the model config of a Kaggle tree, which stores none;
  a source that stores its own must agree with it. `max_shard_bytes`: HF output shard size.
  `progress(phase)`: a context manager giving a tqdm-like bar for phase "read" or "write".
  `merge_lora`: a PEFT LoRA adapter directory of `src`'s model (checkpoint/peft.py), merged into
  the weights before they are written (W + alpha / r * B A, layer by layer in fp32).
  Returns (the model config, the dtype written, the output path).
  """
  if config is not None:
    check_config(src, config, what="--src",
                 fix="it stores its own config: leave out --preset / --model_config")
  # Weights are floats: a cast to an integer type would write zeros (silently).
  dtype = np.dtype(float_dtype(dtype)) if dtype else stored_dtype(src)
  if dtype.name not in FLOAT_DTYPES:
    raise CheckpointError(f"{src} stores {dtype.name} weights; give --dtype ({', '.join(FLOAT_DTYPES)})")
  bar = progress or (lambda phase: contextlib.nullcontext())
  if merge_lora:
    from gemma2_jax.checkpoint import peft

    adapter = peft.load_adapter(merge_lora, config or read_config(src))  # refused before the base is read
  with bar("read") as b:
    cfg, params = load_params(src, dtype, config=config, progress=b)
  if merge_lora:
    params = peft.merge(params, cfg, adapter)
  kwargs = {"max_shard_bytes": max_shard_bytes} if to == "hf" and max_shard_bytes else {}
  with bar("write") as b:
    out = save_params(params, cfg, dst, to, dtype, progress=b, **kwargs)
  return cfg, dtype, out
