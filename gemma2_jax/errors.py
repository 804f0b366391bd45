"""The base of every error whose message is the whole report (bad config, data, checkpoint, input)."""


class UserError(ValueError):
  """An error that is the user's to fix: the CLIs print it as one `error: ...` line and exit 1.

  A ValueError, so that callers which caught the subclasses as ValueError before still do.
  """
