"""The node's Key Object Selection documents: IHE IOCM rejection notes for superseded results.

Built with ``highdicom.ko.KeyObjectSelectionDocument`` (TID 2010, explicit VR little endian), in
the study of the rejected objects, in a series of its own. The document title is a rejection
reason of CID 7011 (:data:`~dicom_node.ko.enum.REJECTED_FOR_QUALITY_REASONS`); the content and
the Current Requested Procedure Evidence Sequence list every rejected instance, and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

import dicom_node
from dicom_node.errors import EncodingError
from dicom_node.identity import derive_uid
from dicom_node.ko import enum
from dicom_node.logs import describe_error
from dicom_node.result_series import created_now, stamp

#: the Patient and General Study attributes the note takes over from the rejected objects
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")
_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def _evidence(header: Dataset, first: bool) -> Dataset:
    """What the note needs of one rejected object: its UIDs, whether it is an image (an IMAGE rather
    than a COMPOSITE content item) and, for the first, the patient and study it belongs to."""
    ds = Dataset()
    for kw in _UIDS:
        value = str(header.get(kw, "") or "")
        if not value:
            raise EncodingError(f"a rejected object has no {kw}")
        setattr(ds, kw, value)
    if "Rows" in header and "Columns" in header:
        ds.Rows, ds.Columns = header.Rows, header.Columns
    if first:
        for kw in _PATIENT_STUDY:
            setattr(ds, kw, header.get(kw, "") or "")
        if ds.PatientSex not in ("M", "F", "O"):
            ds.PatientSex = ""
        if header.get("SpecificCharacterSet"):
            ds.SpecificCharacterSet = header.SpecificCharacterSet
    return ds


def series_description(rejected_versions: Sequence[int], superseding_version: int) -> str:
    """LO (64 characters): which result versions the note rejects and which version replaces them."""
    versions = sorted(set(rejected_versions))
    which = f"v{versions[0]}" if len(versions) == 1 else f"v{versions[0]}-v{versions[-1]}"
    return f"REJECTS AI results {which} superseded by v{superseding_version}"[:64]


def build_rejection_note(rejected: Sequence[Dataset], *, rejected_versions: Sequence[int], superseding_version: int,
                         series_instance_uid: str, sop_instance_uid: str, manufacturer: str = "",
                         reason: hd.sr.CodedConcept = enum.REJECTED_FOR_QUALITY_REASONS
                         ) -> hd.ko.KeyObjectSelectionDocument:
    """A rejection note listing ``rejected`` (headers of the rejected objects, one study).

    ``rejected_versions`` are their result versions, ``superseding_version`` the version that
    replaces them (series number and description). Raises :class:`EncodingError`.
    """
    if not rejected:
        raise EncodingError("a rejection note needs at least one rejected object")
    studies = {str(h.get("StudyInstanceUID", "") or "") for h in rejected}
    if len(studies) != 1:
        raise EncodingError(f"the rejected objects belong to {len(studies)} studies; a rejection note is per study")
    uids = [str(h.get("SOPInstanceUID", "")) for h in rejected]
    if len(set(uids)) != len(uids):
        raise EncodingError("the rejected objects repeat a SOP Instance UID")
    if not rejected_versions or max(rejected_versions) >= superseding_version:
        raise EncodingError("the rejected versions must be older than the superseding version")
    evidence = [_evidence(h, i == 0) for i, h in enumerate(rejected)]
    versions = sorted(set(rejected_versions))
    label = series_description(versions, superseding_version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device-observer", enum.DEVICE_OBSERVER_NAME), name=enum.DEVICE_OBSERVER_NAME,
            model_name=f"msk-dicom-node {dicom_node.__version__}"[:64]))
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=reason,
            referenced_objects=evidence,
            observer_device_context=observer,
            description=(f"AI result objects of version(s) {', '.join(f'v{v}' for v in versions)} superseded by "
                         f"version v{superseding_version} (the study was processed again after late images)"),
        )
        doc = hd.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=enum.SERIES_NUMBER_BASE + superseding_version,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=manufacturer[:64] or None,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=label,
            manufacturer_model_name="msk-dicom-node",
            software_versions=dicom_node.__version__,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"the rejection note could not be built: {describe_error(exc)}") from exc
    stamp(doc, created_now())  # Series/Content/Instance Creation Date and Time, as on every result object
    return doc
