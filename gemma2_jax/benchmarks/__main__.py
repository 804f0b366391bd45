"""`python -m gemma2_jax.benchmarks ARGS`: lm_eval's own command line (`lm_eval ARGS`) with the
`gemma2_jax` model registered (lm-eval 0.4.x finds external models only by import), e.g.

  python -m gemma2_jax.benchmarks --model gemma2_jax \\
      --model_args checkpoint=CKPT,dtype=float32 --tasks hellaswag --batch_size 16

On several hosts (a TPU pod, SLURM) add `--distributed` (or --coordinator_address, --num_processes,
--process_id) and run the same command on every host: every process runs every batch on the global
mesh (its rows of it), and only process 0 prints and writes the results (`--output_path`). A failure
on one process stops the others with its error line (gemma2_jax.parallel.distributed).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gemma2_jax.benchmarks", add_help=False)
  parser.add_argument("--distributed", action="store_true")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  several = bool(args.distributed or args.coordinator_address)
  if several:
    from gemma2_jax.parallel import distributed

    rc = distributed.supervise()  # the launched process only watches the job's process
    if rc is not None:
      return rc
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  import jax
  from lm_eval.__main__ import cli_evaluate

  import gemma2_jax.benchmarks.harness  # noqa: F401  (registers the model)
  from gemma2_jax.errors import UserError

  if jax.process_index() > 0:
    # lm_eval's convention for processes that share every request (tensor parallel): only
    # LOCAL_RANK 0 aggregates, returns and writes the results.
    os.environ["LOCAL_RANK"] = str(jax.process_index())
  sys.argv = [sys.argv[0], *rest]
  try:
    cli_evaluate()
  except UserError as e:
    line = f"error: {' '.join(str(e).split())}"
    if jax.process_count() > 1:
      distributed.fail(line)  # the others stop with it too; never returns
    print(line, file=sys.stderr)
    return 1
  except Exception as e:
    if jax.process_count() > 1:  # tell the other processes, or they would wait in a collective
      import traceback

      traceback.print_exc()
      distributed.fail(f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (traceback "
                       "above)")
    raise
  if several:
    distributed.finished()
  return 0


if __name__ == "__main__":
  sys.exit(main())
