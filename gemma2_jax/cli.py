"""Shared by the `python -m gemma2_jax.*` entry points: argument errors are one line, not usage."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_with_overrides(parser: ArgumentParser, argv) -> tuple[argparse.Namespace, dict[str, str]]:
  """parse_known_args, then every leftover must be a `--config.a.b=value` override."""
  args, rest = parser.parse_known_args(argv)
  overrides = {}
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      parser.error(f"unexpected argument {item!r}; overrides look like --config.train.steps=100")
    key, value = item[len("--config."):].split("=", 1)
    overrides[key] = value
  return args, overrides
