"""Data pipeline: sources -> SentencePiece -> packed, sharded, resumable grain batches."""

from gemma2_jax.data.config import DataConfig, SourceConfig
from gemma2_jax.data.pipeline import DataIterator, make_eval_iterator, make_train_iterator
from gemma2_jax.data.sources import STATS, DataError, expand_paths, open_source
from gemma2_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "STATS", "DataConfig", "DataError", "DataIterator",
    "SourceConfig", "Tokenizer", "expand_paths", "make_eval_iterator", "make_train_iterator",
    "open_source", "train_tokenizer",
]
