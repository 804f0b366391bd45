"""The eval step's statistics and their reduction (the trainer's periodic eval and `evaluate`)."""

from __future__ import annotations

import math
import sys

from gemma2_jax.errors import UserError
from gemma2_jax.training.modes import EVAL_BATCH


class EvalError(UserError):
  """Bad evaluation input found after parsing (e.g. data with no tokens)."""


def run_eval(eval_step, params, batches, to_global, *, max_batches: int | None = None,
             progress=None) -> dict:
  """Sums `eval_step` over host batches (dicts of numpy rows, taken as the eval program's batch spec)
  and reduces them to metrics."""
  import jax

  totals = None
  for n, batch in enumerate(batches):
    if max_batches is not None and n >= max_batches:
      break
    out = eval_step(params, to_global(EVAL_BATCH.host(batch)))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    if progress is not None:
      progress.update(1)
  if totals is None:
    return metrics({"nll": 0.0, "weight": 0.0, "correct": 0.0, "bytes": 0.0})
  return metrics(jax.device_get(totals))


def metrics(totals: dict) -> dict:
  nll, tokens = float(totals["nll"]), float(totals["weight"])
  weight = max(tokens, 1.0)
  return {"eval_loss": nll / weight, "eval_perplexity": math.exp(min(nll / weight, 50.0)),
          "eval_accuracy": float(totals["correct"]) / weight,
          "eval_bits_per_byte": nll / math.log(2) / max(float(totals["bytes"]), 1.0),
          "eval_tokens": int(tokens)}


def evaluate_checkpoint(checkpoint_path: str, data: str, *, tokenizer: str | None = None,
                        data_format: str = "auto", text_field: str = "text", seq_len: int = 1024,
                        batch: int = 8, max_batches: int | None = None, dtype: str = "auto",
                        mesh: str = "data=-1", loss_chunk: int = 1024, progress: bool = True) -> dict:
  """`run_eval`'s metrics of a checkpoint (HF, Kaggle, native or a training workdir) on the corpus of
  the comma-separated globs `data`: one deterministic pass of packed rows of `seq_len`, `batch` rows
  a step over the mesh `mesh` (as `sample --mesh`). Every process of the job calls it.

  The tokenizer defaults to the checkpoint's (`inference.prompts.default_tokenizer`); `dtype` is
  `sample --dtype`'s. Data with no tokens is an EvalError.
  """
  import jax
  from tqdm import tqdm

  from gemma2_jax import checkpoint
  from gemma2_jax.inference.generation import dtype_for, make_sampler_mesh
  from gemma2_jax.inference.prompts import default_tokenizer
  from gemma2_jax.model.transformer import LOGICAL_AXES
  from gemma2_jax.parallel.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    check_batch,
    host_to_global,
    logical_to_sharding,
  )
  from gemma2_jax.training.programs import eval_program

  cfg = checkpoint.read_config(checkpoint_path)
  tokenizer = tokenizer or default_tokenizer(checkpoint_path)
  dtype = dtype_for(dtype)
  device_mesh = make_sampler_mesh(mesh, cfg)
  check_batch(batch, device_mesh.shape, DEFAULT_RULES, "--batch")
  rows_sharding = batch_sharding(device_mesh, DEFAULT_RULES)
  batches = _eval_batches(data, data_format, text_field, seq_len, batch, max_batches, rows_sharding,
                          tokenizer, cfg)
  param_shardings = logical_to_sharding(LOGICAL_AXES, device_mesh, DEFAULT_RULES)
  cfg, params = checkpoint.load_sharded(checkpoint_path, dtype, param_shardings, config=cfg)
  cfg = cfg.replace(dtype=dtype)
  step = eval_program(cfg, device_mesh, DEFAULT_RULES, batch=batch, seq_len=seq_len,
                      chunk=min(loss_chunk, seq_len))
  bar = tqdm(total=max_batches, desc="evaluate", unit="batch", file=sys.stderr,
             disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  with bar:
    result = run_eval(step, params, batches,
                      lambda b: {k: host_to_global(v, rows_sharding) for k, v in b.items()},
                      max_batches=max_batches, progress=bar)
  if result["eval_tokens"] == 0:
    raise EvalError(f"no tokens to evaluate in {data}")
  return result


def _eval_batches(data: str, data_format: str, text_field: str, seq_len: int, batch: int,
                  max_batches: int | None, batch_sharding, tokenizer: str, cfg):
  """This process's host batches of the corpus: its data group's rows of each global batch."""
  from gemma2_jax.data.config import DataConfig, SourceConfig
  from gemma2_jax.data.pipeline import make_eval_iterator
  from gemma2_jax.parallel.sharding import data_group

  config = DataConfig(sources=(SourceConfig(paths=tuple(data.split(",")), format=data_format,
                                            text_field=text_field),),
                      seq_len=seq_len, global_batch=batch, shuffle=False, num_epochs=1)
  group = data_group(batch_sharding, batch)
  return make_eval_iterator(config, process_index=group.index, process_count=group.count,
                            tokenizer_path=tokenizer, vocab_size=cfg.vocab_size,
                            num_real_tokens=cfg.num_real_tokens, num_batches=max_batches)
