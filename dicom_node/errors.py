"""The project's one exception hierarchy.

This module is a leaf (standard library only) so that ``storage`` and
``inference`` can raise from the same hierarchy without importing anything
else of the application. At the network edge :func:`dicom_status_for` turns an
error into the DICOM status that answers it.
"""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node raises on purpose."""

    #: DICOM status a C-STORE gets when this error stops it (0xC000 family: cannot understand).
    dicom_status: int = 0xC210


class ConfigError(NodeError):
    """A configuration file or value is invalid. ``key`` names the offending key."""

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None):
        self.key = key
        self.path = path
        where = f"{path}: " if path else ""
        at = f"{key}: " if key else ""
        super().__init__(f"{where}{at}{message}")


class StorageError(NodeError):
    """The instance store or the index failed."""

    dicom_status = 0xA700


class OutOfResources(StorageError):
    """Not enough free space (or another resource) to accept data."""

    dicom_status = 0xA700


class InvalidDataset(NodeError):
    """A dataset cannot be understood (truncated, unparsable, missing required UIDs)."""

    dicom_status = 0xC210


class InferenceError(NodeError):
    """The model cannot process an input."""


class ImageNotProcessable(InferenceError):
    """One image cannot be processed; ``reason`` says why (reported, not fatal)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class BundleError(InferenceError):
    """A model bundle is missing, malformed, or its weights do not match their hash."""


class EncodingError(NodeError):
    """A result object could not be built or did not validate."""


class SendError(NodeError):
    """A result could not be delivered to a destination."""


def dicom_status_for(exc: BaseException) -> int:
    """DICOM status for ``exc``: its class's status; 0xA700 (out of resources) for memory and OS errors
    (disk full, quota, too many open files, I/O errors); otherwise 0xC210 (cannot understand)."""
    if isinstance(exc, NodeError):
        return exc.dicom_status
    if isinstance(exc, (MemoryError, OSError)):
        return 0xA700
    return 0xC210


class DatasetMismatch(InvalidDataset):
    """The dataset does not match the SOP class it was sent under (0xA900)."""

    dicom_status = 0xA900
