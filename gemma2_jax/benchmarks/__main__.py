"""`python -m gemma2_jax.benchmarks ARGS`: lm_eval's own command line (`lm_eval ARGS`) with the
`gemma2_jax` model registered (lm-eval 0.4.x finds external models only by import), e.g.

  python -m gemma2_jax.benchmarks --model gemma2_jax \\
      --model_args checkpoint=CKPT,dtype=float32 --tasks hellaswag --batch_size 16
"""

from __future__ import annotations


def main() -> None:
  from lm_eval.__main__ import cli_evaluate

  import gemma2_jax.benchmarks.harness  # noqa: F401  (registers the model)

  cli_evaluate()


if __name__ == "__main__":
  main()
