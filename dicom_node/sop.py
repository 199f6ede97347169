"""What the node accepts: storage SOP classes and transfer syntaxes."""

from __future__ import annotations

from pydicom import uid

#: Radiography and secondary capture storage SOP classes accepted at negotiation.
STORAGE_SOP_CLASSES: dict[str, str] = {
    uid.ComputedRadiographyImageStorage: "CR",
    uid.DigitalXRayImageStorageForPresentation: "DX",
    uid.DigitalXRayImageStorageForProcessing: "DX",
    uid.DigitalMammographyXRayImageStorageForPresentation: "MG",
    uid.DigitalMammographyXRayImageStorageForProcessing: "MG",
    uid.SecondaryCaptureImageStorage: "OT",
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "OT",
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "OT",
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage: "OT",
}

#: Transfer syntaxes accepted for every storage SOP class; stored as they arrive.
TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]

NATIVE_SYNTAXES = {uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
                   uid.ExplicitVRBigEndian}
