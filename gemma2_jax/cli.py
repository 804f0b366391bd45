"""Shared by the `python -m gemma2_jax.*` entry points: argument errors are one line, not usage."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")
