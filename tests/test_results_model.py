"""The default model's real results as DICOM: CR (pydicom-data) and DX (FracAtlas) inputs, the CLI's --dicom-out."""

from __future__ import annotations

import subprocess
import sys

import highdicom as hd
import pydicom
import pytest

from dicom_node.results_dicom import build_result_objects, card_concepts, write_result_objects
from dicom_node.sr import enum
from tests.test_results_support import cr_study, dx_study, validate


@pytest.fixture(scope="module")
def model():
    from inference import load_bundle

    return load_bundle(device="cpu")


def _code(c) -> tuple[str, str]:
    return (c.value, c.scheme_designator)


def _check_round_trip(sr_path, sources, results, card):
    """The SR read back with highdicom carries each result's findings with the card's codes."""
    from dicom_node.sr.sop import read_sr

    hd.sr.srread(sr_path)  # highdicom reads it as an SR
    read = {i.source_sop_instance_uid: i for i in read_sr(pydicom.dcmread(sr_path)).images}
    concepts = card_concepts(card)
    for src, res in zip(sources, results):
        img = read[str(src.SOPInstanceUID)]
        evals = {_code(k): _code(v) for k, v in img.evaluations.items()}
        meas = {_code(k): v for k, v in img.probabilities.items()}
        if not res.processed:
            assert _code(img.status) == _code(enum.STATUS_FAILED)
            continue
        assert _code(img.status) == _code(enum.STATUS_SUCCEEDED)
        for f in (res.fracture, res.tumour):
            if f is None:
                continue
            assert f.concept is not None, "the card gives every binary head a concept"
            assert evals[_code(f.concept)] == _code(enum.DECISION_CODES[f.decision])
            assert meas[_code(f.concept)] == pytest.approx(f.probability, abs=1e-6)
        for f in (res.kl_grade, res.anatomy, res.view):
            if f is None:
                continue
            question = concepts.get(f.name)
            assert question is not None, f"the card gives the {f.name} head a concept"
            if f.uncertain:  # below the card's confidence floor: probabilities only, no coded answer
                assert _code(question) not in evals
            else:
                assert evals[_code(question)] == _code(f.concept)
            for c, p in zip(f.concepts, f.probabilities):
                assert meas[_code(c)] == pytest.approx(p, abs=1e-6)
        assert len(img.regions) == len(res.reported_regions())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cr", "dx"])
def test_default_model_results_encode_validate_and_read_back(model, kind, tmp_path):
    # RG3 (an ankle CR): RG1 is a chest radiograph, outside the model's domain and declined
    sources = (cr_study(tmp_path, names=("RG3_UNCI.dcm", "RG3_J2KI.dcm", "RG3_J2KR.dcm")) if kind == "cr"
               else dx_study(tmp_path, n=3))
    results = model.predict_datasets(sources)
    assert all(r.processed for r in results), [r.reason for r in results]
    objs = build_result_objects(sources, results, model.info, concept_overrides=card_concepts(model.card))
    paths = write_result_objects(objs, tmp_path / "out")
    assert len(objs.heatmaps) == len(sources) and len(objs.presentation_states) == len(sources)
    for p in paths:
        validate(p)
    _check_round_trip(next(p for p in paths if p.name.startswith("sr_")), sources, results, model.card)
    sr = pydicom.dcmread(next(p for p in paths if p.name.startswith("sr_")))
    algo = [it for it in sr.ContributingEquipmentSequence if it.get("DeviceUID")][0]
    assert algo.ManufacturerModelName == model.info.name and algo.SoftwareVersions == model.info.version


@pytest.mark.slow
def test_cli_infer_dicom_out(tmp_path):
    sources = cr_study(tmp_path / "in", names=("RG3_J2KI.dcm", "RG3_J2KR.dcm"))
    files = sorted((tmp_path / "in").glob("*.dcm"))
    assert len(files) == len(sources)
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    proc = subprocess.run([sys.executable, "-m", "dicom_node.cli", "infer", *map(str, files), "--out", str(out),
                           "--dicom-out", str(dicom_out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = sorted(dicom_out.rglob("*.dcm"))
    kinds = sorted(p.name.split("_")[0] for p in written)
    assert kinds == ["gsps", "gsps", "heatmap", "heatmap", "sr", "summary"], written
    for p in written:
        validate(p)
    sr = pydicom.dcmread(next(p for p in written if p.name.startswith("sr_")))
    refs = {str(r.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
            for ser in s.ReferencedSeriesSequence for r in ser.ReferencedSOPSequence}
    assert {str(s.SOPInstanceUID) for s in sources} <= refs
