"""The data package's error types (defined once in :mod:`yoloqat.errors`)."""

from __future__ import annotations

from yoloqat.errors import DataError, DataWarning

__all__ = ["DataError", "DataWarning"]
