"""Errors of the data package. Each carries a short `kind` so skipped records can be counted by reason."""
from __future__ import annotations


class DataError(ValueError):
    """Base class: data that cannot be used. The message names the file / record and what to do."""

    kind = "bad_data"

    def __init__(self, message: str, *, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class BadImageError(DataError):
    """An image that is missing, truncated, not an image, or in a pixel format we cannot convert."""

    kind = "bad_image"


class BadRecordError(DataError):
    """A conversation record that does not follow the expected format (see `kind` for the reason)."""

    kind = "bad_record"
