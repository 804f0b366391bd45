"""`python -m gemma2_jax.train --config=configs/<x>.py [--config.a.b=v ...] --workdir=DIR`

Re-running the same command continues the run in the workdir. Bad input (config, data, checkpoint)
ends with one `error: ...` line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from gemma2_jax.cli import ArgumentParser, parse_with_overrides


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--workdir", required=True, help="metrics, TensorBoard and checkpoints")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (TPU pods / SLURM auto-detect, or "
                           "with --coordinator_address/--num_processes/--process_id)")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args, overrides = parse_with_overrides(parser, argv)
  return args, overrides


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from gemma2_jax import distributed

  several = bool(args.distributed or args.coordinator_address)
  if several:
    rc = distributed.supervise()  # before the heavy imports: the parent only watches the child
    if rc is not None:
      return rc
  import jax

  from gemma2_jax.checkpoint import CheckpointError
  from gemma2_jax.data import DataError
  from gemma2_jax.experiment import ConfigError, apply_overrides, from_config, load_config_file
  from gemma2_jax.metrics import write_json
  from gemma2_jax.trainer import Trainer, TrainingDiverged

  if several:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  error = None
  try:
    config = apply_overrides(load_config_file(args.config), overrides)
    exp = from_config(config, num_devices=jax.device_count())
    summary = Trainer(exp, args.workdir).run()
  except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
    error = f"error: {' '.join(str(e).split())}"
  except OSError as e:  # e.g. a workdir that cannot be created or written
    error = f"error: {e.strerror or e}: {e.filename or ''} (check --workdir and the data paths)"
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      error = (f"error: out of device memory ({' '.join(str(e).split())[:300]}); check the config "
               "first with python -m gemma2_jax.aot, or raise train.grad_accum_steps")
    elif jax.process_count() > 1:
      distributed.collective_failed(e)  # a lost peer: one line naming it, then exit
    else:
      raise
  except BaseException as e:
    if jax.process_count() > 1:  # tell the other processes, or they would wait in a collective
      traceback.print_exc()
      distributed.fail(f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (traceback "
                       "above)")
    raise
  if error:
    if jax.process_count() > 1:
      distributed.fail(error)
    print(error, file=sys.stderr)
    return 1
  distributed.finished()
  if jax.process_index() == 0:
    if "preempted_at_step" in summary:
      print(f"stopped: preempted at step {summary['preempted_at_step']} of {exp.train.steps}; the "
            f"checkpoint is saved, re-run the same command to resume; workdir={args.workdir}")
    else:
      keys = ("loss", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "tokens_per_s", "mfu")
      parts = [f"{k}={summary[k]:.4g}" for k in keys if k in summary]
      print(f"done: {exp.train.steps} steps; " + " ".join(parts) + f"; workdir={args.workdir}")
    write_json(f"{args.workdir}/summary.json", summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
