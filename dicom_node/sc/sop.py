"""The node's secondary captures: one heatmap per processed image and one summary page per study.

Built with ``highdicom.sc.SCImage`` (RGB, 8 bits, explicit VR little endian), in
the source study, in a series of their own, with Burned In Annotation YES, a
Source Image Sequence pointing at the original(s) and the algorithm as
Contributing Equipment.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import dicom_node
from dicom_node.errors import EncodingError
from dicom_node.identity import ResultIdentity
from dicom_node.logs import describe_error
from dicom_node.result_series import created_now, series_description, stamp
from dicom_node.sc import enum
from dicom_node.sr import content as sr_content
from inference.results import ModelInfo

SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage

def _str_or_none(ds: Dataset, kw: str) -> str | None:
    value = ds.get(kw)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _patient_sex(ds: Dataset) -> str | None:
    sex = _str_or_none(ds, "PatientSex")
    return sex if sex in ("M", "F", "O") else None


def _source_reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _lossy(sources: Sequence[Dataset]) -> tuple[str, list[str]]:
    """Lossy Image Compression of a derived image: "01" if any source was lossy compressed."""
    methods: list[str] = []
    lossy = False
    for ds in sources:
        if str(ds.get("LossyImageCompression", "00")) == "01":
            lossy = True
            value = ds.get("LossyImageCompressionMethod")
            for m in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and
                      not isinstance(value, str) else [value]):
                if m and str(m) not in methods:
                    methods.append(str(m))
    return ("01" if lossy else "00"), methods


def build_sc(pixels: np.ndarray, sources: Sequence[Dataset], model: ModelInfo, identity: ResultIdentity, *,
             sop_instance_uid: str, instance_number: int, derivation: str,
             created: datetime | None = None) -> hd.sc.SCImage:
    """One RGB secondary capture in the results' SC series of the sources' study."""
    if not sources:
        raise EncodingError("a secondary capture needs at least one source image")
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise EncodingError(f"secondary capture pixels must be uint8 (rows, columns, 3), got {pixels.shape} "
                            f"{pixels.dtype}")
    if max(pixels.shape[:2]) > enum.MAX_SIDE:
        raise EncodingError(f"secondary capture {pixels.shape[1]}x{pixels.shape[0]} exceeds {enum.MAX_SIDE} pixels")
    first = sources[0]
    description = f"AI processing algorithm {model.name} {model.version}, weights sha256 {model.weights_sha256}"
    try:
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=("L", "F"),  # replaced below by the source's own value
            study_instance_uid=first.StudyInstanceUID,
            series_instance_uid=identity.sc_series_uid,
            series_number=identity.sc_series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=(model.manufacturer or "unknown")[:64],
            patient_id=_str_or_none(first, "PatientID"),
            patient_name=first.get("PatientName") or None,
            patient_birth_date=_str_or_none(first, "PatientBirthDate"),
            patient_sex=_patient_sex(first),
            accession_number=_str_or_none(first, "AccessionNumber"),
            study_id=_str_or_none(first, "StudyID"),
            study_date=_str_or_none(first, "StudyDate"),
            study_time=_str_or_none(first, "StudyTime"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[sr_content.contributing_equipment(model, identity, description)],
            series_description=series_description(model, "images", identity),
            manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64],
            device_serial_number=model.weights_sha256[:16],
            specific_character_set=first.get("SpecificCharacterSet") or None,
            coding_schemes=[sr_content.ihe_scheme()],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"the secondary capture could not be built: {describe_error(exc)}") from exc
    # patient orientation: the image is not rotated or flipped, so the source's value holds (Type 2C: may be empty)
    orientation = list(first.get("PatientOrientation") or []) if len(sources) == 1 else []
    # highdicom types PatientOrientation as list[str]; the Type 2C element may be empty
    sc.PatientOrientation = orientation if len(orientation) == 2 else ""  # type: ignore[assignment]
    # General Series Laterality (Type 2C): the source's, or its image laterality when that is R or L
    laterality = {str(ds.get("Laterality", "") or ds.get("ImageLaterality", "") or "") for ds in sources}
    sc.Laterality = laterality.pop() if len(laterality) == 1 and laterality <= {"R", "L"} else ""
    # copied as the source has it (highdicom would warn about, not change, an unusual name)
    sc.ReferringPhysicianName = first.get("ReferringPhysicianName", "")
    for kw in ("IssuerOfPatientID", "PatientAge", "OtherPatientIDsSequence"):
        if kw in first:
            setattr(sc, kw, cast(DataElement, first.data_element(kw)).value)  # a known keyword, present
    # highdicom types SoftwareVersions as str | tuple[str] (one-tuple); the LO element is multi-valued
    sc.SoftwareVersions = [model.version[:64], f"msk-dicom-node {dicom_node.__version__}"]  # type: ignore[assignment]
    sc.DeviceUID = identity.device_uid
    sr_content.add_device_uid(sc, model, identity)
    stamp(sc, created or created_now())
    sc.ConversionType = enum.CONVERSION_TYPE
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.SourceImageSequence = [_source_reference(ds) for ds in sources]
    sc.DerivationDescription = derivation[:1024]
    lossy, methods = _lossy(sources)
    sc.LossyImageCompression = lossy
    if lossy == "01" and methods:
        sc.LossyImageCompressionMethod = methods
    return sc
