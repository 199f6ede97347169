"""The node's Grayscale Softcopy Presentation States: the boxes and findings drawn over the original image."""

from dicom_node.pr.sop import build_gsps

__all__ = ["build_gsps"]
