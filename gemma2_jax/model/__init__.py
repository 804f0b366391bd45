"""Gemma 2 in Flax NNX.

Axis alphabet used in names and einsums throughout the package (matches the checkpoints):
  B batch, T query length, S key length, N query heads, K kv heads, G query heads per kv head,
  H head dim, D d_model, F ffn hidden, V vocab, L layers, P local+global layer pairs, C stacked
  projections (k/v or gate/up).
"""

from gemma2_jax.model.config import (
  PRESETS,
  ModelConfig,
  gemma2_2b,
  gemma2_9b,
  gemma2_27b,
  get_preset,
  tiny,
)
from gemma2_jax.model.transformer import Transformer, param_shapes

__all__ = [
  "PRESETS", "ModelConfig", "Transformer", "gemma2_2b", "gemma2_9b", "gemma2_27b", "get_preset",
  "param_shapes", "tiny",
]
