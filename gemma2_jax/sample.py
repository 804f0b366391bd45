"""`python -m gemma2_jax.sample`: the command is gemma2_jax/cli/sample.py."""

import sys

from gemma2_jax.cli.sample import main

if __name__ == "__main__":
  sys.exit(main())
