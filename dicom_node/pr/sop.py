"""The node's Grayscale Softcopy Presentation States: one per processed greyscale source image.

Built with ``highdicom.pr.GrayscaleSoftcopyPresentationState`` in the source study, in a PR series
of its own, referencing the source image: the graphics of :mod:`dicom_node.pr.content`, the
source's modality LUT, a VOI that shows the image as the node's captures do (the image's own VOI LUT
or first window, else the percentile window the node falls back to), a Presentation LUT Shape that
keeps bone bright (INVERSE for MONOCHROME1), and the algorithm as Contributing Equipment.
"""

from __future__ import annotations

import copy
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import dicom_node
from dicom_node.errors import EncodingError, ImageNotProcessable
from dicom_node.identity import ResultIdentity
from dicom_node.logs import describe_error
from dicom_node.pr import content, enum
from dicom_node.result_series import created_now, series_description, stamp
from dicom_node.sr import content as sr_content
from inference.results import ImageResult, ModelInfo

SOP_CLASS_UID = enum.SOP_CLASS_UID

#: Type 2 attributes highdicom reads from the referenced image without a default
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def presentable(ds: Dataset) -> bool:
    """Whether a grayscale presentation state can be made for ``ds`` (one sample per pixel, MONOCHROME1/2)."""
    return (int(ds.get("SamplesPerPixel", 1) or 1) == 1
            and str(ds.get("PhotometricInterpretation", "") or "").strip().upper() in ("MONOCHROME1", "MONOCHROME2"))


def _first(value) -> float:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, bytes))):
        value = value[0]
    return float(value)


#: ``window`` not given: decode the image to find it
_DECODE = object()


def voi_transformation(ds: Dataset, window=_DECODE) -> hd.pr.SoftcopyVOILUTTransformation:
    """The VOI the node's captures apply to ``ds`` (see :func:`inference.pixels.display_float`); ``window``,
    when given, is what :func:`inference.pixels.fallback_window` says of it (from the decode the capture
    was made of: :class:`inference.pixels.Displayed`), else the image is decoded to find it."""
    from inference.pixels import fallback_window

    if window is _DECODE:
        try:
            fallback = fallback_window(ds)
        except ImageNotProcessable as exc:
            raise EncodingError(f"the image cannot be displayed: {exc.reason}") from exc
    else:
        fallback = window
    if fallback is None and "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        desc = [int(v) for v in item.LUTDescriptor]
        bits = desc[2]
        data = item.LUTData
        lut = (np.frombuffer(data, dtype=np.uint8 if bits <= 8 else np.uint16) if isinstance(data, bytes)
               else np.asarray(data, dtype=np.uint8 if bits <= 8 else np.uint16))
        voi = hd.VOILUT(first_mapped_value=desc[1], lut_data=lut[:desc[0] or 65536],
                        lut_explanation=str(item.get("LUTExplanation", "") or "") or None)
        return hd.pr.SoftcopyVOILUTTransformation(voi_luts=[voi])
    if fallback is None:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        explanation = ds.get("WindowCenterWidthExplanation")
        if explanation is not None and not isinstance(explanation, str):
            explanation = explanation[0] if len(explanation) else None
        function = str(ds.get("VOILUTFunction", "") or "") or None
        return hd.pr.SoftcopyVOILUTTransformation(window_center=center, window_width=width,
                                                  window_explanation=explanation or None, voi_lut_function=function)
    lo, hi = fallback
    # LINEAR maps c - 0.5 - (w-1)/2 .. c - 0.5 + (w-1)/2 to black..white (PS3.3 C.11.2.1.2.1)
    width = max(1.0, hi - lo + 1.0)
    center = (lo + hi) / 2.0 + 0.5
    return hd.pr.SoftcopyVOILUTTransformation(window_center=round(center, 4), window_width=round(width, 4),
                                              window_explanation="AI node percentile window")


def _reference(ds: Dataset) -> Dataset:
    """The source's header for highdicom (no pixel data), its empty Type 2 attributes present."""
    ref = Dataset()
    for elem in ds:  # copies: the caller's dataset stays as it is (copy.copy would share its elements)
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            ref.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        ref.file_meta = ds.file_meta
    for kw in _TYPE2:
        if kw not in ref:
            setattr(ref, kw, "")
    if "SeriesInstanceUID" not in ref:
        raise EncodingError("a source dataset has no SeriesInstanceUID")
    return ref


def build_gsps(ds: Dataset, result: ImageResult, model: ModelInfo, identity: ResultIdentity, *,
               instance_number: int, created: datetime | None = None, window=_DECODE
               ) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The presentation state of one processed greyscale image ``ds`` (pixel data needed for the VOI, unless
    ``window`` says what :func:`voi_transformation` would find in them)."""
    if not result.processed:
        raise EncodingError("a presentation state is made for processed images only")
    if not presentable(ds):
        raise EncodingError("a grayscale presentation state needs a MONOCHROME1 or MONOCHROME2 image")
    rows, columns = int(ds.Rows), int(ds.Columns)
    if (rows, columns) != (int(result.rows), int(result.columns)):
        raise EncodingError(f"the result is {result.columns}x{result.rows}, the image is {columns}x{rows}")
    voi = voi_transformation(ds, window)  # from the pixels: before the header copy drops them
    ref = _reference(ds)
    description = f"AI processing algorithm {model.name} {model.version}, weights sha256 {model.weights_sha256}"
    monochrome1 = str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1"
    try:
        graphic_annotations, layers, drawn = content.graphic_annotations(ref, result, model)
        pr = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[ref],
            series_instance_uid=identity.pr_series_uid,
            series_number=identity.pr_series_number,
            sop_instance_uid=identity.pr_uid(str(ds.SOPInstanceUID)),
            instance_number=instance_number,
            manufacturer=(model.manufacturer or "unknown")[:64],
            manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64],
            device_serial_number=model.weights_sha256[:16],
            content_label=enum.CONTENT_LABEL,
            content_description=f"{model.name} {model.version} findings and boxes"[:64],
            graphic_annotations=graphic_annotations,
            graphic_layers=layers,
            voi_lut_transformations=[voi],
            presentation_lut_transformation=hd.PresentationLUTTransformation(
                presentation_lut_shape=(hd.PresentationLUTShapeValues.INVERSE if monochrome1
                                        else hd.PresentationLUTShapeValues.IDENTITY)),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[sr_content.contributing_equipment(model, identity, description)],
            series_description=series_description(model, "PR", identity),
            coding_schemes=[sr_content.ihe_scheme()],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"the presentation state could not be built: {describe_error(exc)}") from exc
    content.overlay_elements(pr, drawn, rows, columns)
    # highdicom types SoftwareVersions as str | tuple[str] (one-tuple); the LO element is multi-valued
    pr.SoftwareVersions = [model.version[:64], f"msk-dicom-node {dicom_node.__version__}"]  # type: ignore[assignment]
    pr.DeviceUID = identity.device_uid
    sr_content.add_device_uid(pr, model, identity)
    when = created or created_now()
    stamp(pr, when)
    # a presentation state has no Content Date/Time (no General Image module): its Presentation Creation
    # Date/Time is that instant
    del pr.ContentDate, pr.ContentTime
    pr.PresentationCreationDate, pr.PresentationCreationTime = pr.SeriesDate, pr.SeriesTime
    # General Series Laterality (Type 2C): the source's, or its image laterality when that is R or L
    laterality = str(ds.get("Laterality", "") or ds.get("ImageLaterality", "") or "")
    pr.Laterality = laterality if laterality in ("R", "L") else ""
    return pr


__all__ = ["SOP_CLASS_UID", "build_gsps", "presentable", "voi_transformation"]
