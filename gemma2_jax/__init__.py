"""gemma2_jax: Gemma 2 pre-training, continued pre-training and distillation in JAX / Flax NNX."""

from gemma2_jax.checkpoint import CheckpointError, load_model, load_params, save_model, save_params
from gemma2_jax.model import ModelConfig, Transformer, get_preset
from gemma2_jax.sampler import Sampler, SamplingConfig, generate

__all__ = ["CheckpointError", "ModelConfig", "Sampler", "SamplingConfig", "Transformer", "generate",
           "get_preset", "load_model", "load_params", "save_model", "save_params"]
