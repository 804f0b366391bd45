"""`python -m gemma2_jax.benchmarks ARGS`: lm_eval's own command line (`lm_eval ARGS`) with the
`gemma2_jax` model registered (lm-eval 0.4.x finds external models only by import), e.g.

  python -m gemma2_jax.benchmarks --model gemma2_jax \\
      --model_args checkpoint=CKPT,dtype=float32 --tasks hellaswag --batch_size 16

On several hosts (a TPU pod, SLURM) add `--distributed` (or --coordinator_address, --num_processes,
--process_id) and run the same command on every host: every process runs every batch on the global
mesh (its rows of it), and only process 0 prints and writes the results (`--output_path`). As every
command: one `error:` line for bad input, a failure on one process stops the others with its line,
and the persistent compilation cache is on (cli/common.run_job).
"""

from __future__ import annotations

import argparse
import os
import sys

from gemma2_jax.cli.common import add_distributed_flags, run_job
from gemma2_jax.errors import UserError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gemma2_jax.benchmarks", add_help=False)
  add_distributed_flags(parser)
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    import jax

    try:
      from lm_eval.__main__ import cli_evaluate

      import gemma2_jax.benchmarks.harness  # noqa: F401  (registers the model)
    except ImportError as e:
      raise UserError(f"lm-evaluation-harness is not installed ({e.name or e}): pip install -e "
                      "'.[eval]'") from None
    if jax.process_index() > 0:
      # lm_eval's convention for processes that share every request (tensor parallel): only
      # LOCAL_RANK 0 aggregates, returns and writes the results.
      os.environ["LOCAL_RANK"] = str(jax.process_index())
    sys.argv = [sys.argv[0], *rest]
    cli_evaluate()
    return 0

  return run_job(args, body)
