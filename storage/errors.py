"""Errors of the storage layer: the instance file store and the SQL index.

No DICOM here: the application (``dicom_node.errors``) decides which DIMSE
status answers each of them at the network edge.
"""

from __future__ import annotations


class StorageError(Exception):
    """The instance store or the index failed (unavailable database, I/O error, conflict)."""


class OutOfResources(StorageError):
    """Not enough free space (or another resource) to accept data."""


class PatientConflict(StorageError):
    """An instance names another patient than the study it belongs to (the study's first instance
    decided the patient). Not a resource problem: the instance is refused, the study goes on."""
