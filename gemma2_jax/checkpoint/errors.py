"""The one error type of checkpoint I/O: its message is the single line a CLI prints."""

from gemma2_jax.errors import UserError


class CheckpointError(UserError):
  pass


def cause_line(e: BaseException, limit: int = 400) -> str:
  """`Type: first line` of the innermost exception `e` was raised from.

  Orbax wraps a storage failure (the one that names the array and the file) in exceptions whose
  text is a dump of the TensorStore spec; the innermost one is what a user can act on.
  """
  root = e
  while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
    root = root.__cause__ or root.__context__
  text = (str(root).strip().splitlines() or [""])[0]
  return f"{type(root).__name__}: {' '.join(text.split())[:limit]}"
