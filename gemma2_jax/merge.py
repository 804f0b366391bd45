"""`python -m gemma2_jax.merge`: the command is gemma2_jax/cli/merge.py."""

import sys

from gemma2_jax.cli.merge import main

if __name__ == "__main__":
  sys.exit(main())
