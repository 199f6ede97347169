"""The node's Key Object Selection documents: IHE IOCM rejection notes for superseded results."""

from dicom_node.ko.enum import REJECTED_FOR_QUALITY_REASONS, SOP_CLASS_UID
from dicom_node.ko.sop import build_rejection_note, series_description

__all__ = ["REJECTED_FOR_QUALITY_REASONS", "SOP_CLASS_UID", "build_rejection_note", "series_description"]
