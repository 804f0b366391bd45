"""Test driver: runs `python -m gemma2_jax.train ARGS` and SIGKILLs itself at a chosen point.

  python tests/run_with_kill.py MODE STEP -- <train args>
MODE: `after_step` (killed when the batch for STEP+1 is requested, i.e. mid-run with no save in
flight), `during_save` (killed right after the async save of STEP was started, before it is
finalized) or `raise_after_step` (a RuntimeError instead of the kill: a bug on one host).
Used by tests/test_resume.py and tests/test_multiprocess.py; never by the library.
"""

import os
import signal
import sys

from gemma2_jax.checkpoint.manager import TrainCheckpointer
from gemma2_jax.cli import train
from gemma2_jax.training.loop import Trainer


def main():
  mode, step = sys.argv[1], int(sys.argv[2])
  args = sys.argv[sys.argv.index("--") + 1:]
  if mode == "during_save":
    original = TrainCheckpointer.save

    def save(self, s, *a, **kw):
      original(self, s, *a, **kw)
      if s == step:
        os.kill(os.getpid(), signal.SIGKILL)

    TrainCheckpointer.save = save
  elif mode in ("after_step", "raise_after_step"):
    original_global_batch = Trainer.global_batch
    calls = {"n": 0}

    def global_batch(self, batch):  # called once per train step, with that step's host batch
      if calls["n"] == step:
        if mode == "raise_after_step":
          raise RuntimeError(f"injected failure before step {step + 1}")
        os.kill(os.getpid(), signal.SIGKILL)
      calls["n"] += 1
      return original_global_batch(self, batch)

    Trainer.global_batch = global_batch
  else:
    raise SystemExit(f"unknown mode {mode}")
  sys.exit(train.main(args))


if __name__ == "__main__":
  main()
