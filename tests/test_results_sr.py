"""The TID 1500 Structured Report: validity, round trip through highdicom, identity and versions."""

from __future__ import annotations

from datetime import UTC

import highdicom as hd
import pydicom
import pytest

from dicom_node.errors import EncodingError
from dicom_node.identity import ResultIdentity, derive_uid, device_uid
from dicom_node.results_dicom import build_result_objects, predecessor_reference, write_result_objects
from dicom_node.sr import enum
from dicom_node.sr.content import polyline_box
from dicom_node.sr.sop import read_sr
from inference.results import CodedConcept, ImageResult, ModelInfo
from tests.test_results_support import (
    MODEL,
    cr_study,
    dx_study,
    make_results,
    strict_pydicom,
    validate,
    written_results,
)


@pytest.fixture(scope="module")
def cr(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cr")
    sources = cr_study(tmp)
    return written_results(tmp, sources, make_results(sources, not_processed=1))


@pytest.fixture(scope="module")
def dx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dx")
    sources = dx_study(tmp, n=3)
    return written_results(tmp, sources, make_results(sources, with_kl=True, concepts=True))


def _sr_path(paths):
    return next(p for p in paths if p.name.startswith("sr_"))


def _code(c) -> tuple[str, str]:
    return (c.value, c.scheme_designator)


@pytest.mark.parametrize("study", ["cr", "dx"])
def test_every_object_passes_dciodvfy(study, request):
    _, _, _, paths = request.getfixturevalue(study)
    assert len(paths) >= 3
    for p in paths:
        validate(p)


@pytest.mark.parametrize("study", ["cr", "dx"])
def test_sr_reads_back_with_the_same_findings(study, request):
    sources, results, objs, paths = request.getfixturevalue(study)
    with strict_pydicom():
        ds = pydicom.dcmread(_sr_path(paths))
    sr = hd.sr.srread(_sr_path(paths))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = hd.sr.MeasurementReport.from_sequence(sr.content)

    ident = objs.identity
    groups = report.get_planar_roi_measurement_groups()
    # what OHIF needs (it fails the whole report otherwise): every measurement group has an SCOORD on an image
    assert not report.get_image_measurement_groups()
    for g in groups:
        assert g.roi is not None and g.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        items = list(g[0].ContentSequence)
        # OHIF's "track measurements": the label is the group's Comment, the geometry the first NUM's only child
        comments = [i.TextValue for i in items if i.ValueType == "TEXT"
                    and i.ConceptNameCodeSequence[0].CodeValue == enum.COMMENT.value]
        assert len(comments) == 1 and (comments[0].startswith("Image ") or "(image " in comments[0])
        nums = [i for i in items if i.ValueType == "NUM"]
        if nums:
            (inferred,) = nums[0].ContentSequence
            assert inferred.ValueType == "SCOORD" and inferred.RelationshipType == "INFERRED FROM"
            assert list(inferred.GraphicData) == list(g.roi.GraphicData)
            assert all("ContentSequence" not in n for n in nums[1:])
    for src, res in zip(sources, results):
        uid = str(src.SOPInstanceUID)
        mine = report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=uid)
        image_groups = [g for g in mine if _code(g.finding_type) == _code(enum.IMAGE_FINDINGS)]
        assert len(image_groups) == 1, uid
        g = image_groups[0]
        assert g.tracking_uid == ident.tracking_uid(uid, "image")
        # the image-level findings sit on the whole image
        assert polyline_box(g.roi.value) == (0.0, 0.0, float(src.Columns), float(src.Rows))
        evals = {_code(e.name): e.value for e in g.get_qualitative_evaluations()}
        meas = {_code(m.name): m for m in g.get_measurements()}
        if not res.processed:
            assert _code(evals[_code(enum.PROCESSING_STATUS)]) == _code(enum.STATUS_FAILED)
            texts = [i.TextValue for i in g[0].ContentSequence if i.ValueType == "TEXT"
                     and i.ConceptNameCodeSequence[0].CodeValue == enum.REASON_NOT_PROCESSED.value]
            assert texts == [res.reason]
            assert not meas
            assert mine == image_groups  # no regions on an image that was not processed
            continue
        assert _code(evals[_code(enum.PROCESSING_STATUS)]) == _code(enum.STATUS_SUCCEEDED)
        # binary findings: decision as a code; the probability as a NUM named by the finding and the call,
        # in percent, so that a viewer's label reads "Fracture of bone, definite: 72.00 %"
        names = [m.name.meaning for m in g.get_measurements()]
        for f, concept in ((res.fracture, enum.FRACTURE), (res.tumour, enum.BONE_NEOPLASM)):
            assert _code(evals[_code(concept)]) == _code(enum.DECISION_CODES[f.decision])
            call = enum.decision_probability(concept, f.decision)
            assert call.meaning == f"{concept.meaning}, {f.decision}"
            assert meas[_code(call)].value == pytest.approx(100 * f.probability)
            assert _code(meas[_code(call)].unit) == _code(enum.UNIT_PERCENT)
        assert names[:2] == [enum.decision_probability(enum.FRACTURE, res.fracture.decision).meaning,
                             enum.decision_probability(enum.BONE_NEOPLASM, res.tumour.decision).meaning]
        # categorical findings: the label's concept, and the probability of every label
        for f, concept in ((res.anatomy, enum.ANATOMY), (res.view, enum.VIEW), (res.kl_grade, enum.KL_GRADE)):
            if f is None:
                assert _code(concept) not in evals
                continue
            label_code = enum.LABEL_CONCEPTS[f.name][f.label]
            assert _code(evals[_code(concept)]) == _code(label_code)
            for label, p in zip(f.labels, f.probabilities):
                assert meas[_code(enum.LABEL_CONCEPTS[f.name][label])].value == pytest.approx(100 * p)
        if res.kl_grade is not None:
            oa = "definite" if int(res.kl_grade.label) >= 2 else "absent"
            assert _code(evals[_code(enum.KNEE_OSTEOARTHRITIS)]) == _code(enum.DECISION_CODES[oa])
        # algorithm identification with the thresholds as parameters
        read = read_sr(ds)
        img = next(i for i in read.images if i.source_sop_instance_uid == uid)
        assert {_code(k): v for k, v in img.probabilities.items()}[_code(enum.FRACTURE)] == pytest.approx(
            res.fracture.probability)
        name, version, params = img.algorithm
        assert (name, version) == (MODEL.name, MODEL.version)
        assert "fracture.suspected=0.3" in params and "fracture.definite=0.7" in params
        assert "tumour.suspected=0.2" in params and "tumour.definite=0.6" in params
        # regions: SCOORD boxes on the source image with their scores: exactly the reported regions
        rois = [r for r in mine if r not in image_groups]
        assert len(rois) == len(res.reported_regions())
        got = sorted((r.box, r.peak_score, _code(r.finding_type)) for r in img.regions)
        want = sorted((reg.box, pytest.approx(reg.score),
                       _code(enum.ABNORMAL_REGION if reg.source == "anomaly" else enum.FRACTURE))
                      for reg in res.reported_regions())
        assert got == want
        for roi in rois:
            assert roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID
            first = roi.get_measurements()[0]
            comment = next(i.TextValue for i in roi[0].ContentSequence if i.ValueType == "TEXT"
                           and i.ConceptNameCodeSequence[0].CodeValue == enum.COMMENT.value)
            if _code(roi.finding_type) == _code(enum.FRACTURE):  # the line a viewer shows first: the call
                assert first.name.meaning == f"{enum.FRACTURE.meaning}, {res.fracture.decision}"
                assert first.value == pytest.approx(100 * res.fracture.probability)
                assert comment.startswith(f"Fracture of bone, {res.fracture.decision}, "
                                          f"p = {res.fracture.probability:.2f} (image ")
            else:
                assert _code(first.name) == _code(enum.ANOMALY_SCORE)
            assert _code(first.unit) == _code(enum.UNIT_PERCENT)
        # a positive call with no box says so
        assert img.not_localised == [f"{enum.FRACTURE.meaning if f.name == 'fracture' else enum.BONE_NEOPLASM.meaning}"
                                     f": not localised" for f in res.not_localised()]


@pytest.mark.parametrize("study", ["cr", "dx"])
def test_sr_references_evidence_heatmaps_and_flags(study, request):
    sources, results, objs, paths = request.getfixturevalue(study)
    ds = pydicom.dcmread(_sr_path(paths))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    evidence = {str(e[2]) for e in sr.get_evidence()}  # (study, series, instance, class)
    heatmap_uids = {str(h.SOPInstanceUID) for h in objs.heatmaps}
    assert {str(s.SOPInstanceUID) for s in sources} <= evidence
    assert heatmap_uids | {str(objs.summary.SOPInstanceUID)} <= evidence
    assert len(heatmap_uids) == sum(r.processed for r in results)
    read = read_sr(ds)
    assert set(read.library) == {str(s.SOPInstanceUID) for s in sources} | heatmap_uids | {
        str(objs.summary.SOPInstanceUID)}
    # same patient and study, own series
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.PatientID == sources[0].PatientID
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources} | {objs.summary.SeriesInstanceUID}
    # honest flags
    n_failed = sum(not r.processed for r in results)
    assert ds.CompletionFlag == ("PARTIAL" if n_failed else "COMPLETE")
    assert ds.VerificationFlag == "UNVERIFIED"
    assert (ds.get("CompletionFlagDescription") is not None) == bool(n_failed)
    expected_status = enum.STATUS_PARTIAL if n_failed else enum.STATUS_SUCCEEDED
    assert _code(read.status) == _code(expected_status)
    # not for diagnostic use: a text item and the series description
    assert read.use_statement.startswith(enum.NOT_FOR_DIAGNOSTIC_USE_TEXT)
    assert ds.SeriesDescription.startswith(enum.NOT_FOR_DIAGNOSTIC_USE_TEXT)
    # the algorithm as contributing equipment, its Device UID from the weights
    algo = [it for it in ds.ContributingEquipmentSequence if it.get("DeviceUID")]
    assert len(algo) == 1
    item = algo[0]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm")  # IHE AIR's purpose code
    assert "99IHE" in {it.CodingSchemeDesignator for it in ds.CodingSchemeIdentificationSequence}
    assert item.Manufacturer == MODEL.manufacturer and item.ManufacturerModelName == MODEL.name
    assert item.SoftwareVersions == MODEL.version
    assert item.DeviceUID == device_uid(MODEL.name, MODEL.weights_sha256)
    # observer device context carries the same UID
    observers = hd.sr.MeasurementReport.from_sequence(sr.content).get_observer_contexts()
    assert any(o.observer_identifying_attributes.uid == item.DeviceUID for o in observers)


def test_codes_are_standard_or_declared(cr):
    _, _, _, paths = cr
    ds = pydicom.dcmread(_sr_path(paths))
    used: set[str] = set()

    def walk(items):
        for it in items:
            for kw in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
                for code in it.get(kw, []):
                    used.add(code.CodingSchemeDesignator)
            walk(it.get("ContentSequence", []))

    walk([ds])
    declared = {it.CodingSchemeDesignator for it in ds.get("CodingSchemeIdentificationSequence", [])}
    assert enum.PRIVATE_SCHEME in used and enum.PRIVATE_SCHEME in declared
    assert used - declared <= {"SCT", "DCM", "UMLS", "UCUM"}
    private = next(it for it in ds.CodingSchemeIdentificationSequence
                   if it.CodingSchemeDesignator == enum.PRIVATE_SCHEME)
    assert private.CodingSchemeName and private.CodingSchemeResponsibleOrganization
    # the findings the issue names have standard codes
    for code in (enum.FRACTURE, enum.BONE_NEOPLASM, enum.KNEE_OSTEOARTHRITIS, enum.ANATOMY, enum.VIEW):
        assert code.scheme_designator in ("SCT", "DCM")


def test_uids_are_deterministic_and_versions_supersede(cr, tmp_path):
    sources, results, objs, paths = cr
    again = build_result_objects(sources, results, MODEL)
    assert [str(d.SOPInstanceUID) for d in again.datasets()] == [str(d.SOPInstanceUID) for d in objs.datasets()]
    assert again.sr.SeriesInstanceUID == objs.sr.SeriesInstanceUID
    paths2 = write_result_objects(again, tmp_path)
    assert [p.name for p in paths2] == [p.name for p in paths]
    # file names come from derived ids, never from UIDs
    for p in paths2:
        assert not any(str(d.SOPInstanceUID) in p.name for d in again.datasets())
    # a re-run: higher version, new UIDs, the SR names the one it supersedes
    v2 = build_result_objects(sources, results, MODEL, result_version=2, predecessor=objs.sr)
    assert not {str(d.SOPInstanceUID) for d in v2.datasets()} & {str(d.SOPInstanceUID) for d in objs.datasets()}
    pred = v2.sr.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == objs.sr.StudyInstanceUID
    ref = pred.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == objs.sr.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == objs.sr.SOPInstanceUID
    assert v2.sr.SeriesNumber != objs.sr.SeriesNumber
    # the same from the superseded SR's UIDs alone
    ref = predecessor_reference(objs.sr.StudyInstanceUID, objs.sr.SeriesInstanceUID, objs.sr.SOPInstanceUID)
    v2b = build_result_objects(sources, results, MODEL, result_version=2, predecessor=ref)
    assert v2b.sr.PredecessorDocumentsSequence == v2.sr.PredecessorDocumentsSequence
    out = write_result_objects(v2, tmp_path / "v2")
    validate(next(p for p in out if p.name.startswith("sr_")))
    # a new model (other weights) gives other UIDs and another Device UID
    other = ModelInfo(MODEL.name, MODEL.version, "1e" * 32, MODEL.manufacturer)
    v_other = build_result_objects(sources, results, other)
    assert v_other.sr.SOPInstanceUID != objs.sr.SOPInstanceUID
    assert v_other.sr.DeviceUID != objs.sr.DeviceUID
    # tracking UIDs of a finding are stable across result versions of one bundle
    assert read_sr(v2.sr).images[0].tracking_uid == read_sr(objs.sr).images[0].tracking_uid
    # where a radiologist looks: the series description names the version and what it supersedes
    for d in objs.datasets():
        assert " v1 " in d.SeriesDescription and "supersedes" not in d.SeriesDescription
    for d in v2.datasets():
        assert " v2 supersedes v1 " in d.SeriesDescription and len(d.SeriesDescription) <= 64
    assert v2.sr.SeriesDescription != objs.sr.SeriesDescription


def test_every_result_object_carries_series_and_content_dates(cr):
    """Series Date/Time (a PACS files a series without them under "?"), Content Date/Time and Instance
    Creation Date/Time: one instant for every object of a result version."""
    from datetime import datetime

    sources, results, objs, _ = cr

    def content(d):
        # a presentation state has no Content Date/Time (PS3.3 A.33.1): its Presentation Creation Date/Time
        if d.Modality == "PR":
            assert "ContentDate" not in d
            return d.PresentationCreationDate, d.PresentationCreationTime
        return d.ContentDate, d.ContentTime

    assert objs.presentation_states
    stamps = {(d.SeriesDate, d.SeriesTime, *content(d), d.InstanceCreationDate,
               d.InstanceCreationTime) for d in objs.datasets()}
    assert len(stamps) == 1
    (series_date, series_time, content_date, content_time, *_), = stamps
    assert series_date == content_date and series_time == content_time
    when = datetime.strptime(series_date + series_time.split(".")[0], "%Y%m%d%H%M%S")
    assert abs((datetime.now() - when).total_seconds()) < 3600
    fixed = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    again = build_result_objects(sources, results, MODEL, created=fixed)
    for d in again.datasets():
        assert (d.SeriesDate, d.SeriesTime, content(d)[0]) == ("20260102", "030405.600000", "20260102")


def test_identity_uid_form():
    ident = ResultIdentity("1.2.3", "b", "1", "aa" * 32)
    for uid in (ident.sr_instance_uid, ident.sr_series_uid, ident.sc_series_uid, ident.summary_uid,
                ident.heatmap_uid("1.2.3.4"), ident.device_uid, ident.tracking_uid("1.2.3.4", "image")):
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    assert len({ident.sr_instance_uid, ident.sr_series_uid, ident.sc_series_uid, ident.summary_uid}) == 4
    assert derive_uid("a", "bc") != derive_uid("ab", "c")
    with pytest.raises(EncodingError):
        ResultIdentity("1.2.3", "b", "1", "aa" * 32, result_version=0)
    with pytest.raises(EncodingError):
        ResultIdentity("1.2.3", "b", "1", "")


def test_all_processed_is_complete_and_card_concepts_win(dx):
    sources, results, objs, paths = dx
    ds = pydicom.dcmread(_sr_path(paths))
    assert ds.CompletionFlag == "COMPLETE" and "CompletionFlagDescription" not in ds
    # a concept the card gives for a finding is what the SR carries
    custom = CodedConcept("F-TEST", "99CARD", "Card fracture concept")
    results2 = [ImageResult(**{**r.__dict__, "fracture": type(r.fracture)(
        r.fracture.name, r.fracture.probability, r.fracture.operating_points, custom)}) for r in results]
    objs2 = build_result_objects(sources, results2, MODEL)
    read = read_sr(objs2.sr)
    assert any(k.value == "F-TEST" and k.scheme_designator == "99CARD" for k in read.images[0].evaluations)
    declared = {it.CodingSchemeDesignator for it in objs2.sr.CodingSchemeIdentificationSequence}
    assert "99CARD" in declared


def test_diagnostic_use_statement_follows_the_card(dx, tmp_path):
    sources, results, _, _ = dx
    cleared = ModelInfo(MODEL.name, MODEL.version, MODEL.weights_sha256, MODEL.manufacturer, for_diagnostic_use=True)
    objs = build_result_objects(sources, results, cleared)
    assert enum.NOT_FOR_DIAGNOSTIC_USE_TEXT not in objs.sr.SeriesDescription
    assert enum.NOT_FOR_DIAGNOSTIC_USE_TEXT not in (read_sr(objs.sr).use_statement or "")


def test_inconsistent_inputs_are_refused(cr, dx):
    sources, results, objs, _ = cr
    dx_sources, dx_results, _, _ = dx
    with pytest.raises(EncodingError):  # two studies
        build_result_objects([sources[0], dx_sources[0]], [results[0], dx_results[0]], MODEL)
    with pytest.raises(EncodingError):  # a result whose geometry is not the image's
        bad = ImageResult(**{**results[0].__dict__, "rows": results[0].rows + 1})
        build_result_objects([sources[0]], [bad], MODEL)
    with pytest.raises(EncodingError):  # counts differ
        build_result_objects(sources, results[:1], MODEL)
    with pytest.raises(EncodingError):  # a predecessor needs a higher version
        build_result_objects(sources, results, MODEL, result_version=1, predecessor=objs.sr)
    with pytest.raises((EncodingError, ValueError)):  # a probability outside 0..1
        from inference.results import BinaryFinding
        f = results[0].fracture
        bad = ImageResult(**{**results[0].__dict__, "fracture": BinaryFinding(f.name, 1.5, f.operating_points)})
        build_result_objects([sources[0]], [bad], MODEL)


def test_strict_pydicom_builds_and_reads(tmp_path):
    with strict_pydicom():
        sources = dx_study(tmp_path, n=2, offset=10)
        results = make_results(sources)
        objs = build_result_objects(sources, results, MODEL)
        paths = write_result_objects(objs, tmp_path / "out")
        for p in paths:
            pydicom.dcmread(p)
    for p in paths:
        validate(p)


@pytest.mark.parametrize("study", ["cr", "dx"])
def test_dcmtk_reads_the_sr_without_complaint(study, request):
    """dcmtk's SR parser (dsrdump) checks the content tree against the IOD's relationship constraints."""
    import subprocess

    from tests.peers import require

    _, _, _, paths = request.getfixturevalue(study)
    proc = subprocess.run([require("dsrdump"), "-Ee", str(_sr_path(paths))], capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    complaints = [ln for ln in out.splitlines() if ln.startswith(("W:", "E:", "F:"))]
    assert not complaints, "\n".join(complaints)
    assert "Comprehensive 3D SR Document" in out and "Imaging Measurement Report" in out


def test_dicom_out_for_files_groups_studies_and_skips_repeats(tmp_path):
    """``infer --dicom-out``: results of files -> one folder per study; a repeated instance is skipped."""
    from dicom_node.results_dicom import write_results_for_files
    from tests.dicomgen import pydicom_radiographs

    files = {p.name: p for p in pydicom_radiographs()}
    # RG1_UNCI and RG1_J2KI are one instance (same SOP Instance UID) in two transfer syntaxes; RG3 is another study
    chosen = [files["RG1_UNCI.dcm"], files["RG1_J2KI.dcm"], files["RG3_J2KR.dcm"]]
    datasets = [pydicom.dcmread(p) for p in chosen]
    results = make_results(datasets)
    results = [ImageResult(**{**r.__dict__, "image_id": str(p)}) for r, p in zip(results, chosen)]  # ids = paths
    written, errors = write_results_for_files(list(zip(chosen, results)), MODEL, tmp_path)
    assert len(errors) == 1 and "RG1_J2KI.dcm" in errors[0]
    folders = {p.parent for p in written}
    assert len(folders) == 2
    for folder in folders:
        names = sorted(p.name.split("_")[0] for p in folder.iterdir())
        assert names == ["gsps", "heatmap", "sr", "summary"]
    for p in written:
        validate(p)
