"""`python -m gemma2_jax.benchmarks`: the command is gemma2_jax/cli/benchmarks.py."""

import sys

from gemma2_jax.cli.benchmarks import main

if __name__ == "__main__":
  sys.exit(main())
