"""The error raised when a data set on disk is missing, malformed or mislaid."""


class DataError(ValueError):
  """Bad or missing data, with a message a user can act on.

  The message is one line: what was wrong, the offending value (a path, a
  count, a name), and how to fix it. It subclasses `ValueError` so callers
  that already guard against bad values keep working.
  """
