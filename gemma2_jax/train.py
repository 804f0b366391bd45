"""`python -m gemma2_jax.train`: the command is gemma2_jax/cli/train.py."""

import sys

from gemma2_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
