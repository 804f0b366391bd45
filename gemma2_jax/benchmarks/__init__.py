"""Benchmarks: a model backend for lm-evaluation-harness (`gemma2_jax.benchmarks.harness`).

Importing the package imports nothing heavy; `import gemma2_jax.benchmarks.harness` (which needs the
`eval` extra, PyPI `lm-eval` 0.4.x) registers the `gemma2_jax` model with lm_eval.
"""
