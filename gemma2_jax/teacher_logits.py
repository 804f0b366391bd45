"""`python -m gemma2_jax.teacher_logits`: the command is gemma2_jax/cli/teacher_logits.py."""

import sys

from gemma2_jax.cli.teacher_logits import main

if __name__ == "__main__":
  sys.exit(main())
