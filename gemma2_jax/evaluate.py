"""`python -m gemma2_jax.evaluate`: the command is gemma2_jax/cli/evaluate.py."""

import sys

from gemma2_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
