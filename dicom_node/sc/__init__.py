"""The node's secondary captures: heatmaps over the source images and a summary page per study."""

from dicom_node.sc.sop import SOP_CLASS_UID, build_sc

__all__ = ["SOP_CLASS_UID", "build_sc"]
