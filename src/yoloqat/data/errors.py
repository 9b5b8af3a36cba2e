"""The one exception the data package raises on purpose.

It lives in its own module so every converter can import it without importing the package
``__init__`` (which imports the converters and would make the import circular).
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset that cannot be prepared; the message is a single line a stage can print."""


class DataWarning(UserWarning):
    """Items skipped while importing (unreadable images, malformed labels); never fatal."""
