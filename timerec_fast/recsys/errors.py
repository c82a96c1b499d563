"""Errors raised for user mistakes (bad paths, columns, ids, options).

The CLI catches :class:`RecsysError` and prints its message without a traceback;
anything else is a bug and keeps its traceback.
"""


class RecsysError(Exception):
    """A user-facing error with a message that says what to do."""


class DataError(RecsysError):
    """The input log cannot be read or nothing usable is left in it."""


class CheckpointError(RecsysError):
    """A checkpoint directory is missing, incomplete or incompatible."""
