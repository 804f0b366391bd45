"""`python -m gemma2_jax.prepare_data`: tokenize a corpus into ArrayRecord shards, or train a
SentencePiece model. See gemma2_jax/data/prepare.py."""

from gemma2_jax.data.prepare import main

__all__ = ["main"]
