"""`python -m gemma2_jax.train --config=configs/<x>.py [--config.a.b=v ...] --workdir=DIR`

Re-running the same command continues the run in the workdir. Bad input (config, data, checkpoint)
ends with one `error: ...` line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from gemma2_jax.cli.common import ArgumentParser, add_distributed_flags, parse_with_overrides, run_job


def parse_args(argv):
  parser = ArgumentParser(prog="python -m gemma2_jax.train", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiment config file (configs/*.py)")
  parser.add_argument("--workdir", required=True, help="metrics, TensorBoard and checkpoints")
  add_distributed_flags(parser)
  return parse_with_overrides(parser, argv)


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)

  def train() -> int:
    import jax

    from gemma2_jax.parallel.sharding import num_slices
    from gemma2_jax.training.experiment import apply_overrides, from_config, load_config_file
    from gemma2_jax.training.loop import Trainer
    from gemma2_jax.training.metrics import write_json

    config = apply_overrides(load_config_file(args.config), overrides)
    exp = from_config(config, num_devices=jax.device_count(), num_slices=num_slices(jax.devices()))
    summary = Trainer(exp, args.workdir).run()
    if jax.process_index() == 0:
      if "preempted_at_step" in summary:
        print(f"stopped: preempted at step {summary['preempted_at_step']} of {exp.train.steps}; "
              f"the checkpoint is saved, re-run the same command to resume; workdir={args.workdir}")
      else:
        keys = ("loss", "eval_loss", "eval_perplexity", "eval_bits_per_byte")
        keys += tuple(k for k in summary if k.startswith("eval/") and k.endswith(("/loss", "/bits_per_byte")))
        parts = [f"{k}={summary[k]:.4g}" for k in (*keys, "tokens_per_s", "mfu", "goodput") if k in summary]
        print(f"done: {exp.train.steps} steps; " + " ".join(parts) + f"; workdir={args.workdir}")
      write_json(f"{args.workdir}/summary.json", summary)
    return 0

  return run_job(args, train)

