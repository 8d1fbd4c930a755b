"""The one user-facing error type of yworld.

A `YWorldError` message is a single line that says what went wrong, where (file, field path, key, record
id) and what to do about it. The CLI prints it without a traceback (unless `--debug`). Library code raises
the most specific subclass; it never prints.

`check_range` is how a spec section's `__post_init__` refuses a number (the spec loader adds file and field
path to its ValueError); it lives here so that sections owned by yworld.model (loss, optim) need nothing above.
"""
from __future__ import annotations

from typing import Any


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


def check_range(section: Any, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError when field `name` of `section` (each item, for a tuple) is outside the interval.
    `low_open` / `high_open` exclude the bound: check_range(o, "lr", 0, low_open=True) means lr > 0."""
    value = getattr(section, name)
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
        if v is None:
            continue
        if (low is not None and (v <= low if low_open else v < low)) or (
                high is not None and (v >= high if high_open else v > high)):
            if high is None:
                want = f"{'>' if low_open else '>='} {low}"
            elif low is None:
                want = f"{'<' if high_open else '<='} {high}"
            else:
                want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"{name}: {value!r} must be {want}")
