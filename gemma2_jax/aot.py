"""`python -m gemma2_jax.aot`: the command is gemma2_jax/cli/aot.py."""

import sys

from gemma2_jax.cli.aot import main

if __name__ == "__main__":
  sys.exit(main())
