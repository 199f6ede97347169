"""The MSK radiograph AI node: DICOM in, model findings back as DICOM."""

__version__ = "0.1.0"
