"""`python -m gemma2_jax.convert`: the command is gemma2_jax/cli/convert.py."""

import sys

from gemma2_jax.cli.convert import main

if __name__ == "__main__":
  sys.exit(main())
