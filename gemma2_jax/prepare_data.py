"""`python -m gemma2_jax.prepare_data`: the command is gemma2_jax/cli/prepare_data.py."""

import sys

from gemma2_jax.cli.prepare_data import main

if __name__ == "__main__":
  sys.exit(main())
