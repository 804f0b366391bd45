"""Model merging with mergekit's methods and YAML (`python -m gemma2_jax.merge`), streamed tensor by
tensor, plus WARP's LITI (Rame et al. 2024): see README "Merging".

  config.py   the YAML: keys, methods, parameters (filters, per-layer gradients, precedence)
  kernels.py  the methods on one tensor, in row blocks, with mergekit's arithmetic
  sources.py  each model's tensors in HF layout, from any of our formats
  writer.py   HF safetensors written a block of rows at a time
  merge.py    the whole merge: plan, check, compute, write, move into place
"""

from gemma2_jax.merging.config import METHODS, MergeConfig, MergeError, load_config, parse_config
from gemma2_jax.merging.kernels import liti, merge_arrays, slerp_coefficients
from gemma2_jax.merging.merge import merge, parse_etas

__all__ = ["METHODS", "MergeConfig", "MergeError", "liti", "load_config", "merge", "merge_arrays",
           "parse_config", "parse_etas", "slerp_coefficients"]
