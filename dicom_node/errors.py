"""The application's exceptions, and the one place where an error becomes a DICOM status.

``storage`` and ``inference`` raise their own errors (:mod:`storage.errors`,
:mod:`inference.errors`), which know nothing of DICOM. At the network edge
:func:`dicom_status_for` turns any error into the status that answers a C-STORE.
"""

from __future__ import annotations

from inference.errors import BundleError, ImageNotProcessable, InferenceError
from storage.errors import OutOfResources, PatientConflict, StorageError

__all__ = ["NodeError", "ConfigError", "StartupError", "InvalidDataset", "DatasetMismatch", "ImageTooLarge",
           "EncodingError",
           "StorageError", "OutOfResources", "InferenceError", "ImageNotProcessable", "BundleError", "dicom_status_for",
           "EXPECTED_ERRORS", "OUT_OF_RESOURCES", "SOP_CLASS_MISMATCH", "CANNOT_UNDERSTAND"]

#: C-STORE failure statuses (PS3.4 Annex B.2.3)
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210


class NodeError(Exception):
    """Root of the errors the application raises on purpose."""


class ConfigError(NodeError):
    """A configuration file or value is invalid. ``key`` names the offending key."""

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None):
        self.key = key
        self.path = path
        where = f"{path}: " if path else ""
        at = f"{key}: " if key else ""
        super().__init__(f"{where}{at}{message}")


class StartupError(NodeError):
    """The node cannot start (a port in use, storage that cannot be used): one line, exit status 2."""


class InvalidDataset(NodeError):
    """A dataset cannot be understood (truncated, unparsable, missing required UIDs)."""


class DatasetMismatch(InvalidDataset):
    """The dataset does not match the SOP class it was sent under."""


class ImageTooLarge(InvalidDataset):
    """The image declares more pixels than ``limits.max_image_megapixels``, or its codestream declares
    another size than its Rows and Columns: refused before anything decodes it (0xC210, not retried)."""


class EncodingError(NodeError):
    """A result object could not be built or did not validate."""


#: errors raised on purpose anywhere in the product: reported as one line, without a traceback
EXPECTED_ERRORS = (NodeError, StorageError, InferenceError)

#: the status of each error class, most specific first (the first ``isinstance`` match wins)
_STATUS = (
    (DatasetMismatch, SOP_CLASS_MISMATCH),
    (InvalidDataset, CANNOT_UNDERSTAND),
    (PatientConflict, CANNOT_UNDERSTAND),  # the instance names another patient than its study: refused, not retried
    (StorageError, OUT_OF_RESOURCES),  # OutOfResources included: the index or the disk failed us
    (MemoryError, OUT_OF_RESOURCES),
    (OSError, OUT_OF_RESOURCES),       # disk full, quota, too many open files, I/O errors
)


def dicom_status_for(exc: BaseException) -> int:
    """The C-STORE status that answers ``exc``: 0xA900 when the dataset does not match its SOP class,
    0xA700 (out of resources) for storage, memory and OS errors, otherwise 0xC210 (cannot understand)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return CANNOT_UNDERSTAND
