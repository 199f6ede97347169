"""Bad patient/study values and a second patient do not fail a study's results (issue 14, item 4)."""

from __future__ import annotations

import logging
import struct

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_node import stages
from dicom_node.header_clean import clean, one_patient
from dicom_node.sr.sop import read_sr
from tests.test_results_support import MODEL, dx_study, make_results, validate


def _bad_date_and_name(ds: pydicom.Dataset) -> None:
    """PatientBirthDate as 8 bytes of a float (VR FD) and PatientName with VR US: what broken modalities send."""
    ds[Tag(0x00100030)] = RawDataElement(Tag(0x00100030), "FD", 8, struct.pack("<d", 1.2466277879653928e-47), 0,
                                         False, True)
    ds[Tag(0x00100010)] = RawDataElement(Tag(0x00100010), "US", 2, b"\x01\x02", 0, False, True)


def test_bad_values_are_emptied_and_another_patient_is_left_out(tmp_path, caplog):
    sources = dx_study(tmp_path, n=3, offset=9)
    _bad_date_and_name(sources[1])
    sources[2].PatientID = "SOMEONE-ELSE"
    for i, ds in enumerate(sources):
        ds.save_as(tmp_path / f"in{i}.dcm")
    images = [stages.load_file(tmp_path / f"in{i}.dcm", str(ds.SOPInstanceUID)) for i, ds in enumerate(sources)]
    results = make_results([im.ds for im in images])
    with caplog.at_level(logging.WARNING):
        objs = stages.encode(images, results, MODEL)
    read = read_sr(objs.sr)
    # the first two images have results, the other patient's image is not in this study's results
    assert [i.source_sop_instance_uid for i in read.images] == [str(s.SOPInstanceUID) for s in sources[:2]]
    assert objs.sr.PatientID == sources[0].PatientID
    for path in stages.write_files(objs, tmp_path / "out"):
        validate(path)
    text = caplog.text
    assert "PatientBirthDate" in text and "names another patient" in text
    assert "1.2466" not in text and "SOMEONE-ELSE" not in text  # tags and reasons, never values


def test_clean_keeps_a_good_header_and_empties_type_2():
    ds = pydicom.Dataset()
    ds.PatientName = "GOOD^NAME"
    ds.PatientID = "P1"
    assert clean(ds) is ds
    _bad_date_and_name(ds)
    out = clean(ds)
    assert out is not ds and out.PatientBirthDate == "" and out.PatientName == "" and out.PatientID == "P1"
    assert one_patient([ds, out]) == ([0, 1], [])


def test_good_values_are_kept_whole(tmp_path, caplog):
    """A well-formed image loses nothing: its numbers (IS, DS: pydicom converts them) are kept."""
    from dicom_node.header_clean import _bad

    rg3 = pydicom.dcmread(pydicom.data.get_testdata_file("RG3_UNCR.dcm"))
    dx = dx_study(tmp_path, n=1)[0]
    for ds in (rg3, dx):
        bad = {e.keyword: _bad(ds, e.keyword) for e in ds if e.keyword and e.keyword != "PixelData"}
        assert {k: v for k, v in bad.items() if v} == {}
        assert isinstance(ds.InstanceNumber, int) and ds.WindowCenter is not None
    with caplog.at_level(logging.WARNING):
        cleaned = clean(dx, "image 1")
    assert "cannot be used" not in caplog.text
    assert cleaned.InstanceNumber == dx.InstanceNumber and cleaned.PixelSpacing == dx.PixelSpacing
    # a value that is not a number for its VR is still caught
    dx.InstanceNumber = "1.5"
    assert _bad(dx, "InstanceNumber") is not None
