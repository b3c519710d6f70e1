"""The one error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A data-pipeline problem the user can fix: the message is one line and names the path or value."""
