"""Receiving with real peers: dcmtk's storescu/echoscu against the node as a subprocess."""

from __future__ import annotations

import pydicom

from tests.dicomgen import copy_with_new_uids, dataset_part, fracatlas_images, pydicom_radiographs, write_dx_study
from tests.peers import Storescp, echoscu, storescu


def _by_uid(node, study_uid):
    return {r["SOPInstanceUID"]: r for r in __import__("json").loads(node.cli("instances", study_uid,
                                                                                  "--json").stdout)}


def test_storescu_real_radiographs_arrive_byte_identical_and_study_turns_stable(node, tmp_path):
    # MONOCHROME1 CR; uncompressed, JPEG 2000 lossless and lossy. The three encodings of each image share
    # one SOP Instance UID in pydicom-data: give each its own (pixel data untouched).
    (tmp_path / "cr").mkdir()
    cr = [copy_with_new_uids(p, tmp_path / "cr" / p.name) for p in pydicom_radiographs()]
    dx = write_dx_study(tmp_path / "dx", fracatlas_images(4))
    r = storescu("127.0.0.1", node.port, cr + dx)
    assert r.returncode == 0, r.stderr
    # The reference for "what arrived": dcmtk's storescp in bit-preserving mode receives the same
    # transmission (storescu re-encodes sequences with explicit lengths, so the wire differs from the file).
    with Storescp(tmp_path / "reference", bit_preserving=True) as ref:
        assert storescu("127.0.0.1", ref.port, cr + dx, called="STORESCP").returncode == 0
    wire = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: dataset_part(p) for p in ref.files()}
    assert len(wire) == len(cr) + len(dx)

    sent = {}
    for f in cr + dx:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sent[ds.SOPInstanceUID] = (f, ds.StudyInstanceUID, str(ds.file_meta.TransferSyntaxUID))
    studies = {s["StudyInstanceUID"]: s for s in node.studies()}
    assert set(studies) == {v[1] for v in sent.values()}

    for study_uid in studies:
        stored = _by_uid(node, study_uid)
        for sop_uid, (src, s_uid, ts) in sent.items():
            if s_uid != study_uid:
                continue
            row = stored[sop_uid]
            on_disk = node.storage / row["file_path"]
            assert on_disk.is_file()
            assert on_disk.resolve().is_relative_to(node.storage.resolve())
            assert sop_uid not in row["file_path"]  # names from hashes, never from a UID
            assert row["TransferSyntaxUID"] == ts  # stored as it arrived, compressed included
            assert dataset_part(on_disk) == wire[sop_uid], f"{src.name}: stored bytes differ from what arrived"
            written = pydicom.dcmread(on_disk, stop_before_pixels=True)
            assert str(written.file_meta.TransferSyntaxUID) == ts
            assert written.file_meta.MediaStorageSOPInstanceUID == sop_uid

    status = node.status()
    assert status["instances"] == len(cr) + len(dx)
    # quiet period 1 s: every study turns stable
    node.wait_for(lambda: all(s["state"] == "stable" for s in node.studies()), timeout=30, what="stable studies")
    assert node.status()["studies_by_state"]["stable"] == len(studies)
    assert "PatientName" not in node.log() and "TEST^MSK" not in node.log()


def test_echo_from_allowed_peer_and_rejections(make_node):
    node = make_node(peers=[{"ae_title": "STORESCU", "host": "127.0.0.1"},
                            {"ae_title": "ELSEWHERE", "host": "127.0.0.2"}])
    ok = echoscu("127.0.0.1", node.port, calling="STORESCU")
    assert ok.returncode == 0, ok.stderr
    unknown = echoscu("127.0.0.1", node.port, calling="INTRUDER")
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr
    wrong_called = echoscu("127.0.0.1", node.port, calling="STORESCU", called="NOTME")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    # a configured peer connecting from another address than its configured host
    wrong_host = echoscu("127.0.0.1", node.port, calling="ELSEWHERE")
    assert wrong_host.returncode != 0 and "Calling AE Title Not Recognized" in wrong_host.stderr
    log = node.log()
    assert "INTRUDER" in log and "not a configured peer" in log and "not from its configured host" in log
    assert node.alive()


def test_resend_replaces_and_late_image_reopens_stable_study(node, tmp_path):
    cr = pydicom_radiographs()[3]  # RG3_UNCI
    assert storescu("127.0.0.1", node.port, [cr]).returncode == 0
    assert storescu("127.0.0.1", node.port, [cr]).returncode == 0  # the same instance again
    sop = pydicom.dcmread(cr, stop_before_pixels=True)
    rows = _by_uid(node, sop.StudyInstanceUID)
    assert len(rows) == 1 and rows[sop.SOPInstanceUID]["receive_count"] == 2
    files = [p for p in (node.storage / "instances").rglob("*.dcm")]
    assert len(files) == 1

    node.wait_for(lambda: node.studies()[0]["state"] == "stable", timeout=30, what="stable")
    # a late image for the same study: back to receiving, marked updated, then stable again
    late = copy_with_new_uids(cr, tmp_path / "late.dcm")
    assert storescu("127.0.0.1", node.port, [late]).returncode == 0
    study = node.studies()[0]  # the CLI may take longer than the 1 s quiet period: receiving, or stable again
    assert study["state"] in ("receiving", "stable") and study["updated"] is True and study["generation"] == 2
    node.wait_for(lambda: node.studies()[0]["state"] == "stable", timeout=30, what="stable again")
    assert node.studies()[0]["instances"] == 2
    assert "late instance, receiving again" in node.log()


def test_cli_status_and_studies_json(node):
    st = node.status()
    assert st.pop("node")["running"] is True  # asked through the node's /healthz
    assert st == {"instances": 0, "studies": 0,
                  "studies_by_state": {k: 0 for k in ("receiving", "stable", "inferring", "results_ready", "sent",
                                                      "failed", "skipped")}}
    assert storescu("127.0.0.1", node.port, pydicom_radiographs()[:1]).returncode == 0
    (study,) = node.studies()
    assert study["calling_ae"] == "STORESCU" and study["instances"] == 1
    assert study["state"] in ("receiving", "stable")
    text = node.cli("studies").stdout
    assert study["StudyInstanceUID"] in text


def test_an_image_naming_another_patient_is_refused_and_the_study_goes_on(node, tmp_path):
    """The study's first image decides its patient; a later image of the same study that names another
    patient is refused with 0xC210 and not stored, re-sending the first image is still fine."""
    from pynetdicom import AE

    first = copy_with_new_uids(pydicom_radiographs()[3], tmp_path / "first.dcm")
    ds1 = pydicom.dcmread(first)
    ds2 = pydicom.dcmread(first)
    ds2.SOPInstanceUID = pydicom.uid.generate_uid()
    ds2.PatientID = "ANOTHER-PATIENT"
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds1.SOPClassUID, ds1.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds1).Status == 0x0000
        assert assoc.send_c_store(ds2).Status == 0xC210
        assert assoc.send_c_store(ds1).Status == 0x0000
    finally:
        assoc.release()
    rows = _by_uid(node, ds1.StudyInstanceUID)
    assert set(rows) == {ds1.SOPInstanceUID}
    assert len(list((node.storage / "instances").rglob("*.dcm"))) == 1
    assert "ANOTHER-PATIENT" not in node.log()
    assert "PatientConflict" in node.log() or "another patient" in node.log()
