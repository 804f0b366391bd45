"""The one error type of checkpoint I/O: its message is the single line a CLI prints."""


class CheckpointError(ValueError):
  pass
