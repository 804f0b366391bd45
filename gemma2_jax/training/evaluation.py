"""The eval step's statistics and their reduction (the trainer's periodic eval and `evaluate`)."""

from __future__ import annotations

import math

EVAL_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")




def run_eval(eval_step, params, batches, to_global, *, max_batches: int | None = None,
             progress=None) -> dict:
  """Sums `eval_step` over host batches (dicts of numpy rows) and reduces them to metrics."""
  import jax

  totals = None
  for n, batch in enumerate(batches):
    if max_batches is not None and n >= max_batches:
      break
    out = eval_step(params, to_global({k: batch[k] for k in EVAL_KEYS}))
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
