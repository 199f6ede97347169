"""The node's Structured Report: a Comprehensive 3D SR with a TID 1500 Measurement Report root."""

from dicom_node.sr.sop import SOP_CLASS_UID, build_sr, read_sr

__all__ = ["SOP_CLASS_UID", "build_sr", "read_sr"]
