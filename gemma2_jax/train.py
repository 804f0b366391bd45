"""`python -m gemma2_jax.train --config=configs/<x>.py [--config.a.b=v ...] --workdir=DIR`"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for metrics, TensorBoard and checkpoints")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "call jax.distributed.initialize() (TPU pods / SLURM auto-detect; "
                                 "or give --coordinator_address/--num_processes/--process_id)")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes")
_PID = flags.DEFINE_integer("process_id", None, "this process's index")


def _fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 1


def run(config, workdir: str) -> int:
  import jax

  from gemma2_jax.checkpoint import CheckpointError
  from gemma2_jax.data import DataError
  from gemma2_jax.experiment import ConfigError, from_config
  from gemma2_jax.trainer import Trainer, TrainingDiverged

  try:
    exp = from_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    trainer = Trainer(exp, workdir)
    summary = trainer.run()
  except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
    return _fail(str(e))
  if jax.process_index() == 0:
    keys = ("loss", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "tokens_per_s", "mfu")
    parts = [f"{k}={summary[k]:.4g}" for k in keys if k in summary]
    print(f"done: {exp.train.steps} steps; " + " ".join(parts) + f"; workdir={workdir}")
    with open(f"{workdir}/summary.json", "w") as f:
      json.dump(summary, f, indent=2)
  return 0


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    return _fail(f"unexpected arguments {argv[1:]}; use --config=FILE and --config.key=value")
  if _CONFIG.value is None:
    return _fail("--config is required, e.g. --config=configs/pretrain_tiny.py")
  if not _WORKDIR.value:
    return _fail("--workdir is required (metrics, TensorBoard and checkpoints go there)")
  if _DISTRIBUTED.value or _COORD.value:
    import jax
    jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
  return run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
