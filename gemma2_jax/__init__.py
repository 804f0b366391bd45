"""gemma2_jax: Gemma 2 pre-training, continued pre-training and distillation in JAX / Flax NNX."""

from gemma2_jax.checkpoint import CheckpointError, load_model, load_params, save_model, save_params
from gemma2_jax.inference.sampler import Sampler, SamplingConfig, generate
from gemma2_jax.model import ModelConfig, Transformer, get_preset

__all__ = ["CheckpointError", "ModelConfig", "Sampler", "SamplingConfig", "Transformer", "generate",
           "get_preset", "load_model", "load_params", "save_model", "save_params"]
