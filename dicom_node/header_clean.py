"""Bad values in the patient and study modules never fail a study's results.

The result objects copy the source's patient and study attributes (name, ID, birth date, sex,
study date and time, accession number, ...). A value that pydicom cannot convert to its VR (a
date stored as 8 bytes of a float, a name with a wrong VR, a value longer than its VR allows)
would make the SR or a capture fail to build, and the whole study would get no results. Before
encoding, every such attribute is read once; one that does not convert or validate is emptied
(Type 2 attributes stay present, empty) or removed, and its tag is logged, never its value.

The images of a study that name another patient than the study's first image are not encoded
with it (:func:`one_patient`): the listener refuses such an image at C-STORE time, and an index
that predates that check cannot make the study fail whole.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

log = logging.getLogger("dicom_node.header_clean")

#: attributes the result objects copy from their sources (patient, study, equipment-independent)
COPIED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
          "OtherPatientIDsSequence", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
          "ReferringPhysicianName", "PatientOrientation", "Laterality", "ImageLaterality", "SpecificCharacterSet",
          "BodyPartExamined", "ViewPosition", "InstanceNumber", "SeriesNumber", "PixelSpacing",
          "ImagerPixelSpacing")
#: Type 2 in the result IODs: kept present and empty when their value is bad
TYPE_2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName"}


def _bad(ds: Dataset, keyword: str) -> str | None:
    """Why the attribute's value is unusable (exception type or "invalid for VR"), None if it is fine."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elem = ds[keyword]
            value = elem.value
            if elem.VR == "SQ":
                return None
            dictionary_vr = _dictionary_vr(keyword)
            if dictionary_vr and elem.VR != dictionary_vr and not (
                    dictionary_vr.startswith(("US", "OB", "OW", "SS")) or elem.VR in ("UN",)):
                return f"VR {elem.VR} where the dictionary says {dictionary_vr}"
            values = value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(
                value, (str, bytes)) else [value]
            for v in values:
                if v is None or v == "":
                    continue
                if elem.VR in ("DS", "IS") and not isinstance(v, str):
                    # pydicom has converted the string (DSfloat, IS): validate the string it came from,
                    # not the number (validate_value refuses any number for these VRs)
                    v = getattr(v, "original_string", None) or str(v)
                validate_value(elem.VR, v, pydicom_config.RAISE)
            str(value)
    except Exception as exc:  # any conversion or validation failure: the value is not usable
        return type(exc).__name__
    return None


def _dictionary_vr(keyword: str) -> str | None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    try:
        return dictionary_VR(tag) if tag is not None else None
    except KeyError:
        return None


def clean(ds: Dataset, label: str = "an image") -> Dataset:
    """``ds`` itself when every copied attribute is usable, else a shallow copy with the bad ones emptied
    (Type 2) or removed. Logs one line per attribute: its keyword and tag, and why, never its value."""
    bad = {kw: why for kw in COPIED if kw in ds and (why := _bad(ds, kw)) is not None}
    if not bad:
        return ds
    out = ds.copy()
    for kw, why in bad.items():
        elem = out.data_element(kw)
        tag = elem.tag if elem is not None else None
        del out[kw]
        if kw in TYPE_2:
            setattr(out, kw, "")
        log.warning("%s: %s %s has a value that cannot be used (%s); %s in the results", label, kw, tag, why,
                    "left empty" if kw in TYPE_2 else "left out")
    return out


def patient_key(ds: Dataset) -> tuple[str, str]:
    """(PatientID, IssuerOfPatientID) as the index keys a patient; empty where unreadable."""
    out = []
    for kw in ("PatientID", "IssuerOfPatientID"):
        try:
            out.append(str(ds.get(kw, "") or "").strip())
        except Exception:
            out.append("")
    return out[0], out[1]


def one_patient(datasets: Sequence[Dataset]) -> tuple[list[int], list[int]]:
    """Indices of the images that name the study's first patient, and of those that name another."""
    if not datasets:
        return [], []
    first = patient_key(datasets[0])
    keep = [i for i, ds in enumerate(datasets) if patient_key(ds) == first]
    other = [i for i in range(len(datasets)) if i not in keep]
    return keep, other


__all__ = ["clean", "one_patient", "patient_key", "COPIED"]
