"""`python -m gemma2_jax.prepare_data`: tokenize a corpus into ArrayRecord shards, or train a
SentencePiece model. See gemma2_jax/data/prepare.py."""

import sys

from gemma2_jax.data.prepare import main

if __name__ == "__main__":
  sys.exit(main())
