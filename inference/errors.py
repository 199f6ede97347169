"""Errors of the model package.

No DICOM statuses here: ``inference`` reads arrays and metadata and returns
plain results; the application maps these errors at its edge.
"""

from __future__ import annotations


class InferenceError(Exception):
    """The model cannot process an input."""


class ImageNotProcessable(InferenceError):
    """One image cannot be processed; ``reason`` says why (reported, not fatal)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class BundleError(InferenceError):
    """A model bundle is missing, malformed, or its weights do not match their hash."""
