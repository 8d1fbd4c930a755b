"""The one user-facing error type of yworld.

A `YWorldError` message is a single line that says what went wrong, where (file, field path, key, record
id) and what to do about it. The CLI prints it without a traceback (unless `--debug`). Library code raises
the most specific subclass; it never prints.
"""


class YWorldError(Exception):
    """A problem the user can fix: bad input, bad configuration, missing weights or storage."""


class ConfigError(YWorldError):
    """A job spec or option is wrong (unknown key, wrong type, bad value)."""


class DataError(YWorldError):
    """An annotation file, image or predictions file is malformed."""


class StorageError(YWorldError):
    """Object storage cannot be reached or used (endpoint, bucket, credentials)."""


class WeightsError(YWorldError):
    """Weights cannot be found or do not fit the model (missing file, key or shape mismatch)."""


class DivergenceError(YWorldError):
    """Training stopped because the loss or the weights stopped being finite (a learning rate too high, bad
    data); the message names the step and the last good checkpoint."""
