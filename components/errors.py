"""The one exception type that reaches users as a message instead of a traceback."""


class CapfiltError(Exception):
    """A user-facing error: bad input, bad parameters, a missing file. The CLI prints its
    message on one line (or a few, for lists of problems) and exits non-zero."""
