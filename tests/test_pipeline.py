"""The whole loop with real peers: Orthanc pushes a study, the node (a real subprocess with its inference
worker) stores, infers, encodes and sends the results back; Orthanc holds them in the same study."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicomgen import copy_with_new_uids, fracatlas_images, pydicom_radiographs, write_dx_study
from tests.peers import Orthanc, Storescp, dciodvfy, echoscu, free_port, storescu, wait_until

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PR_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document (IOCM rejection note)

FAST_SENDING = {"base_delay_seconds": 0.5, "multiplier": 2, "max_delay_seconds": 2, "max_attempts": 100,
                "timeout_seconds": 10, "poll_seconds": 0.3}


def pipeline_node(make_node, pacs_port: int, *, port: int | None = None, name: str = "node", **kw):
    return make_node(name=name, port=port, quiet_seconds=kw.pop("quiet_seconds", 2),
                     peers=kw.pop("peers", [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]),
                     pipeline={"enabled": True, "batch_size": 4, **kw.pop("pipeline", {})},
                     sending={**FAST_SENDING, **kw.pop("sending", {})}, **kw)


def study_files(tmp: Path, n_dx: int = 2, offset: int = 0) -> list[Path]:
    """One study: the MONOCHROME1 JPEG 2000 CR radiograph of pydicom-data and DX images from FracAtlas."""
    tmp.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    cr = copy_with_new_uids(pydicom_radiographs()[4], tmp / "cr.dcm", study_uid=study_uid)  # RG3_J2KI
    return [cr] + write_dx_study(tmp / "dx", fracatlas_images(n_dx, offset=offset), like=cr)


def orthanc_instances(pacs: Orthanc, study_uid: str) -> list[dict]:
    ids = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
    return [dict(pacs.get(f"/instances/{i}/simplified-tags"), _id=i) for i in ids]


def results_at(pacs: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"sr": [], "sc": [], "pr": []}
    for inst in orthanc_instances(pacs, study_uid):
        if inst["SOPClassUID"] == SR_CLASS:
            out["sr"].append(inst)
        elif inst["SOPClassUID"] == SC_CLASS:
            out["sc"].append(inst)
        elif inst["SOPClassUID"] == PR_CLASS:
            out["pr"].append(inst)
    return out


def check_valid(pacs: Orthanc, instances: list[dict], tmp: Path) -> None:
    for inst in instances:
        f = tmp / f"{inst['_id']}.dcm"
        f.write_bytes(pacs.get_bytes(f"/instances/{inst['_id']}/file"))
        r = dciodvfy(f)
        errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
        assert r.returncode == 0 and not errors, f"{inst['SOPClassUID']}: {errors}"


def sr_evidence(pacs: Orthanc, sr: dict) -> set[str]:
    ds = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{sr['_id']}/file")))
    refs = set()
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for item in series.ReferencedSOPSequence:
                refs.add(str(item.ReferencedSOPInstanceUID))
    return refs


@pytest.mark.slow
def test_orthanc_study_in_results_back_then_late_image_supersedes(make_node, tmp_path):
    node_port = free_port()
    with Orthanc(tmp_path / "orthanc", aet="PACS", modalities={"msknode": ("MSKNODE", "127.0.0.1", node_port)}) \
            as pacs:
        # Orthanc has no IOCM: the rejection note is stored like any instance and v1 stays (docs/operations.md)
        node = pipeline_node(make_node, pacs.dicom_port, port=node_port,
                             peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port,
                                     "superseded_results": "reject"}])
        files = study_files(tmp_path / "study")
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        for f in files:
            pacs.upload(f)
        pacs.store_to("msknode", pacs.get("/studies"))
        node.wait_for(lambda: node.studies()[0]["state"] == "sent", timeout=240, interval=1, what="study sent")

        got = results_at(pacs, study_uid)
        assert len(got["sr"]) == 1, got
        assert len(got["sc"]) == len(files) + 1  # a heatmap per image and the summary page
        assert len(got["pr"]) == len(files)  # a presentation state per image
        check_valid(pacs, got["sr"] + got["sc"] + got["pr"], tmp_path)
        assert sources <= sr_evidence(pacs, got["sr"][0])  # the SR references every source instance
        for sc in got["sc"]:
            assert sc["StudyInstanceUID"] == study_uid and sc["BurnedInAnnotation"] == "YES"

        # a late image: the study is processed again and a superseding version arrives
        late = write_dx_study(tmp_path / "late", fracatlas_images(1, offset=10), like=files[0])
        pacs.upload(late[0])
        late_id = pacs.post("/tools/find", {"Level": "Instance", "Query": {
            "SOPInstanceUID": pydicom.dcmread(late[0], stop_before_pixels=True).SOPInstanceUID}})
        pacs.store_to("msknode", late_id)
        node.wait_for(lambda: node.studies()[0]["state"] == "sent" and
                      json.loads(node.cli("jobs", "--json").stdout)[0]["result_version"] == 2,
                      timeout=240, interval=1, what="version 2 sent")
        got2 = results_at(pacs, study_uid)
        assert len(got2["sr"]) == 2
        new_sr = [s for s in got2["sr"] if s["SOPInstanceUID"] != got["sr"][0]["SOPInstanceUID"]][0]
        ds = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{new_sr['_id']}/file")))
        pred = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert pred.ReferencedSOPInstanceUID == got["sr"][0]["SOPInstanceUID"]
        assert len(sr_evidence(pacs, new_sr)) >= len(sources) + 1

        # superseded_results: reject -> after v2, a rejection note listing exactly the v1 objects
        v1 = {i["SOPInstanceUID"] for i in got["sr"] + got["sc"] + got["pr"]}
        kos = wait_until(lambda: [i for i in orthanc_instances(pacs, study_uid) if i["SOPClassUID"] == KOS_CLASS],
                         timeout=60, what="the rejection note at Orthanc", interval=0.5)
        assert len(kos) == 1
        check_valid(pacs, kos, tmp_path)
        note = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{kos[0]['_id']}/file")))
        title = note.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
        assert sr_evidence(pacs, kos[0]) == v1
        assert note.SeriesDescription == "REJECTS AI results v1 superseded by v2"
        # Orthanc does not implement IOCM: every v1 object is still there, beside v2 and the note
        got3 = results_at(pacs, study_uid)
        assert v1 <= {i["SOPInstanceUID"] for i in got3["sr"] + got3["sc"] + got3["pr"]}
        assert len(got3["sr"]) == 2 and len(got3["sc"]) == 2 * (len(files) + 1) + 1
        assert len(got3["pr"]) == 2 * len(files) + 1  # v1's and v2's (one more image)
        # what docs/operations.md tells its administrator: delete the series the note lists (REST)
        for series_uid in {s.SeriesInstanceUID for st in note.CurrentRequestedProcedureEvidenceSequence
                           for s in st.ReferencedSeriesSequence}:
            for orthanc_id in pacs.post("/tools/find", {"Level": "Series",
                                                        "Query": {"SeriesInstanceUID": series_uid}}):
                pacs.delete(f"/series/{orthanc_id}")
        left = {i["SOPInstanceUID"] for i in orthanc_instances(pacs, study_uid)}
        assert not (left & v1) and new_sr["SOPInstanceUID"] in left and sources <= left


def _jobs(node) -> list[dict]:
    return json.loads(node.cli("jobs", "--json").stdout)


@pytest.mark.slow
def test_outage_results_arrive_once_orthanc_is_back(make_node, tmp_path):
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", aet="PACS", modalities={"msknode": ("MSKNODE", "127.0.0.1", node_port)})
    pacs.start()
    try:
        node = pipeline_node(make_node, pacs.dicom_port, port=node_port)
        files = study_files(tmp_path / "study", n_dx=1)
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        ids = [pacs.upload(f)["ID"] for f in files]
        pacs.store_to("msknode", ids)
        pacs.stop()  # the PACS goes down before the results are ready
        node.wait_for(lambda: (_jobs(node)[0]["deliveries"] or [{}])[0].get("attempts", 0) >= 2, timeout=240,
                      interval=1, what="failed delivery attempts")
        job = _jobs(node)[0]
        assert job["state"] == "results_ready" and job["deliveries"][0]["last_error"]
        pacs.start()  # back, same ports and storage
        node.wait_for(lambda: _jobs(node)[0]["state"] == "sent", timeout=120, interval=1, what="sent after outage")
        got = results_at(pacs, study_uid)
        assert len(got["sr"]) == 1 and len(got["sc"]) == len(files) + 1 and len(got["pr"]) == len(files)
        # once: each result arrived in a single NewInstance event, never replaced
        changes = pacs.get("/changes?limit=1000")["Changes"]
        new = [c for c in changes if c["ChangeType"] == "NewInstance"]
        assert len(new) == len(files) + len(got["sr"]) + len(got["sc"]) + len(got["pr"])
    finally:
        pacs.stop()


@pytest.mark.slow
def test_sigkill_during_inference_and_during_sending_each_result_exactly_once(make_node, tmp_path):
    from tests.counting_scp import CountingSCPProcess

    # the destination answers each C-STORE after 1.5 s, so the node can be killed while it sends
    with CountingSCPProcess(tmp_path / "received.json", aet="COUNTER", delay=1.5) as counter:
        node = pipeline_node(make_node, counter.port,
                             peers=[{"ae_title": "COUNTER", "host": "127.0.0.1", "port": counter.port}])
        files = study_files(tmp_path / "study", n_dx=2)
        assert storescu("127.0.0.1", node.port, files, calling="COUNTER").returncode == 0

        node.wait_for(lambda: _jobs(node)[0]["state"] == "inferring", timeout=120, interval=0.1,
                      what="inferring")
        node.kill()  # 1: during inference
        node.start()
        assert "back to stable" in node.log()
        node.wait_for(lambda: counter.state()["stores"] >= 1 and _jobs(node)[0]["state"] == "results_ready",
                      timeout=240, interval=0.1, what="sending in progress")
        node.kill()  # 2: during sending
        node.start()
        node.wait_for(lambda: _jobs(node)[0]["state"] == "sent", timeout=240, interval=1, what="sent")

        counts = counter.counts()
        received = counter.received()
        n_expected = 2 * len(files) + 2  # a heatmap and a presentation state per image, the summary, the SR
        assert len(counts) == n_expected, counts
        assert all(c == 1 for c in counts.values()), counts
        classes = sorted(r["SOPClassUID"] for r in received.values())
        assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == len(files) + 1
        assert classes.count(PR_CLASS) == len(files)
        assert _jobs(node)[0]["result_version"] == 1


@pytest.mark.slow
def test_mixed_study_good_undecodable_and_sr_object(make_node, tmp_path):
    from tests.counting_scp import CountingSCPProcess
    from tests.test_bad_input import _corrupt_j2k

    with CountingSCPProcess(tmp_path / "received.json", aet="COUNTER") as counter:
        node = pipeline_node(make_node, counter.port,
                             peers=[{"ae_title": "COUNTER", "host": "127.0.0.1", "port": counter.port}])
        files = study_files(tmp_path / "study", n_dx=1)  # [CR J2K, DX]
        corrupt = _corrupt_j2k(files[0], tmp_path / "corrupt.dcm")
        # an SR object in the same study: not a radiograph, refused at negotiation
        sr = pydicom.dcmread(pydicom.data.get_testdata_file("test-SR.dcm"))
        sr.StudyInstanceUID = pydicom.dcmread(files[1], stop_before_pixels=True).StudyInstanceUID
        sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
        storescu("127.0.0.1", node.port, [files[1], corrupt, tmp_path / "sr.dcm"], calling="COUNTER")
        node.wait_for(lambda: _jobs(node) and _jobs(node)[0]["state"] == "sent", timeout=240, interval=1,
                      what="sent")
        assert node.status()["instances"] == 2  # the DX and the corrupt CR; the SR object was refused

        received = counter.received()
        heatmaps = [r for r in received.values() if r["SOPClassUID"] == SC_CLASS]
        assert len(heatmaps) == 2  # one heatmap (the good image) and the summary: nothing for the broken one
        assert [r["SOPClassUID"] for r in received.values()].count(PR_CLASS) == 1  # the good image's
        srs = [u for u, r in received.items() if r["SOPClassUID"] == SR_CLASS]
        assert len(srs) == 1
        # the SR says which image was not processed, and why
        stored = json.loads(node.cli("instances", sr.StudyInstanceUID, "--json").stdout)
        corrupt_uid = pydicom.dcmread(corrupt, stop_before_pixels=True).SOPInstanceUID
        assert corrupt_uid in {r["SOPInstanceUID"] for r in stored}
        from storage.index import Index
        from storage.jobs import Jobs

        index = Index(node.cfg["storage"]["database_url"])
        (sr_row,) = [r for r in Jobs(index).result_objects(sr.StudyInstanceUID) if r["kind"] == "sr"]
        index.close()
        ds = pydicom.dcmread(node.storage / sr_row["file_path"])
        text = str(ds)
        assert "PARTIAL" in text and corrupt_uid in text
        assert "not processed" in text.lower() or "NOTPROCREASON" in text
        assert echoscu("127.0.0.1", node.port, calling="COUNTER").returncode == 0  # and it keeps serving


def test_a_study_the_model_declines_gets_a_report_not_silence(make_node, tmp_path):
    """A chest radiograph sent alone (RG1: outside the model's domain) comes back as an SR and a summary
    capture that say it was not processed and why; no maps. With pipeline.report_not_processed off, such a
    study is skipped and nothing is sent."""
    from tests.counting_scp import CountingSCPProcess

    with CountingSCPProcess(tmp_path / "received.json", aet="COUNTER") as counter:
        peers = [{"ae_title": "COUNTER", "host": "127.0.0.1", "port": counter.port}]
        chest = copy_with_new_uids(pydicom_radiographs()[0], tmp_path / "rg1.dcm", study_uid=generate_uid())
        study_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
        node = pipeline_node(make_node, counter.port, peers=peers)
        storescu("127.0.0.1", node.port, [chest], calling="COUNTER")
        node.wait_for(lambda: _jobs(node) and _jobs(node)[0]["state"] == "sent", timeout=240, interval=1,
                      what="sent")
        received = counter.received()
        assert sorted(r["SOPClassUID"] for r in received.values()) == sorted([SC_CLASS, SR_CLASS])  # no maps
        from storage.index import Index
        from storage.jobs import Jobs

        index = Index(node.cfg["storage"]["database_url"])
        rows = {r["kind"]: r for r in Jobs(index).result_objects(study_uid)}
        index.close()
        assert set(rows) == {"sr", "summary"}
        sr_file = node.storage / rows["sr"]["file_path"]
        texts = [str(e.value) for e in pydicom.dcmread(sr_file).iterall() if e.keyword == "TextValue"]
        assert any(t.startswith("outside the model's domain") for t in texts), texts
        r = dciodvfy(sr_file)
        assert r.returncode == 0 and not [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
        node.stop()

        quiet = pipeline_node(make_node, counter.port, peers=peers, name="quiet",
                              pipeline={"report_not_processed": False})
        again = copy_with_new_uids(pydicom_radiographs()[0], tmp_path / "rg1b.dcm", study_uid=generate_uid())
        storescu("127.0.0.1", quiet.port, [again], calling="COUNTER")
        quiet.wait_for(lambda: _jobs(quiet) and _jobs(quiet)[0]["state"] == "skipped", timeout=240, interval=1,
                       what="skipped")
        assert "outside the model's domain" in _jobs(quiet)[0]["state_reason"]
        assert len(counter.received()) == 2  # nothing more arrived


@pytest.mark.slow
def test_dead_letter_retry_and_retention_keeps_undelivered(make_node, tmp_path):
    """A destination that stays down: deliveries go dead and the study fails; `dicom-node retry` re-queues
    them once it is back. Retention removes old delivered studies, files and rows, never undelivered ones."""
    from tests.counting_scp import CountingSCPProcess

    up = CountingSCPProcess(tmp_path / "up.json", aet="UP").start()
    down_port = free_port()
    try:
        node = pipeline_node(
            make_node, up.port,
            peers=[{"ae_title": "UP", "host": "127.0.0.1", "port": up.port},
                   {"ae_title": "DOWN", "host": "127.0.0.1", "port": down_port}],
            sending={"max_attempts": 2, "base_delay_seconds": 0.2, "timeout_seconds": 2},
            retention={"max_age_days": 20 / 86400, "interval_minutes": 0.05})  # 20 s, checked every 3 s
        delivered = study_files(tmp_path / "a", n_dx=1, offset=0)
        undelivered = study_files(tmp_path / "b", n_dx=1, offset=3)
        assert storescu("127.0.0.1", node.port, delivered, calling="UP").returncode == 0
        assert storescu("127.0.0.1", node.port, undelivered, calling="DOWN").returncode == 0
        uid_a = pydicom.dcmread(delivered[0], stop_before_pixels=True).StudyInstanceUID
        uid_b = pydicom.dcmread(undelivered[0], stop_before_pixels=True).StudyInstanceUID

        # a's files, listed now: on a slow machine a may be sent and then removed by retention before b fails
        files_a = [node.storage / r["file_path"] for r in
                   json.loads(node.cli("instances", uid_a, "--json").stdout)]
        assert files_a and all(f.exists() for f in files_a)

        def state(uid):
            return {j["StudyInstanceUID"]: j for j in _jobs(node)}.get(uid, {}).get("state")

        node.wait_for(lambda: state(uid_a) in ("sent", None) and state(uid_b) == "failed", timeout=240,
                      interval=1, what="a sent (or sent and removed), b failed")
        assert re.search(rf"study {uid_a} to UP: \d+ sent, 0 failed", node.log())
        job_b = {j["StudyInstanceUID"]: j for j in _jobs(node)}[uid_b]
        assert "DOWN" in job_b["state_reason"] and job_b["deliveries"][0]["states"]["dead"] == 6

        # retention: a is removed (rows and files) once older than 20 s; b, undelivered, stays
        node.wait_for(lambda: state(uid_a) is None, timeout=90, interval=1, what="retention of a")
        assert not any(f.exists() for f in files_a)
        assert state(uid_b) == "failed" and "retention: removed 1 study" in node.log()

        # the destination comes back; retry re-queues the dead letters and they are delivered once
        with CountingSCPProcess(tmp_path / "down.json", aet="DOWN", port=down_port) as down:
            out = node.cli("retry").stdout
            assert "re-queued 6 dead deliveries" in out  # 2 images: 2 heatmaps, 2 PRs, the summary, the SR
            # b is old enough for retention: once delivered it may be removed at once, so the
            # delivery is checked at the destination and in the log, not on the study row
            node.wait_for(lambda: len(down.counts()) == 6, timeout=60, interval=1, what="b delivered after retry")
            node.wait_for(lambda: f"study {uid_b} to DOWN: 6 sent, 0 failed" in node.log(), timeout=30,
                          what="b recorded as sent")
            assert state(uid_b) in ("sent", None)  # sent, or sent and then removed by retention
            assert sorted(down.counts().values()) == [1] * 6
    finally:
        up.stop()


@pytest.mark.slow
def test_late_image_rejection_note_to_storescp_after_the_new_version(make_node, tmp_path):
    """superseded_results: the origin (reject) gets v2, then one rejection note listing exactly the v1
    objects it received; another destination (keep, the default) gets v2 and no note."""
    with Storescp(tmp_path / "origin") as origin, Storescp(tmp_path / "archive") as archive:
        both = ["origin", "ARCHIVE"]
        node = pipeline_node(make_node, origin.port,
                             peers=[{"ae_title": "STORESCU", "host": "127.0.0.1", "port": origin.port,
                                     "superseded_results": "reject"},
                                    {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}],
                             routing={"default": {"name": "default", "outputs": {"sr": both, "heatmaps": both,
                                                                                   "summary": both, "gsps": both}}})
        files = study_files(tmp_path / "study", n_dx=1)
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu("127.0.0.1", node.port, files).returncode == 0
        node.wait_for(lambda: _jobs(node)[0]["state"] == "sent", timeout=240, interval=1, what="v1 sent")
        v1 = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in origin.files()}
        assert len(v1) == 2 * len(files) + 2 and len(archive.files()) == len(v1)  # a heatmap and a PR per image

        late = write_dx_study(tmp_path / "late", fracatlas_images(1, offset=10), like=files[0])
        assert storescu("127.0.0.1", node.port, late).returncode == 0
        node.wait_for(lambda: len(origin.files()) == 2 * len(v1) + 3, timeout=240, interval=1,
                      what="v2 and the rejection note at the origin")
        node.wait_for(lambda: _jobs(node)[0]["state"] == "sent" and _jobs(node)[0]["result_version"] == 2,
                      timeout=60, interval=1, what="v2 sent")
        arrived = [pydicom.dcmread(f) for f in sorted(origin.files(), key=lambda p: p.stat().st_mtime_ns)]
        v2 = arrived[len(v1):-1]
        assert {str(d.SOPInstanceUID) for d in arrived[:len(v1)]} == v1
        assert len(v2) == len(v1) + 2 and not ({str(d.SOPInstanceUID) for d in v2} & v1)  # the late image's two
        assert all(d.SOPClassUID != KOS_CLASS for d in arrived[:-1]), "the note comes after the new version"
        note = arrived[-1]
        assert note.SOPClassUID == KOS_CLASS and note.StudyInstanceUID == study_uid
        refs = {str(i.ReferencedSOPInstanceUID) for st in note.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        assert refs == v1
        r = dciodvfy(sorted(origin.files(), key=lambda p: p.stat().st_mtime_ns)[-1])
        assert r.returncode == 0 and not [x for x in r.stderr.splitlines() if x.startswith("Error")], r.stderr
        import highdicom as hd

        assert hd.ko.KeyObjectSelectionDocument.from_dataset(note).SeriesDescription == \
            "REJECTS AI results v1 superseded by v2"
        # the archive keeps superseded results: v2 arrived, no note
        node.wait_for(lambda: len(archive.files()) == 2 * len(v1) + 2, timeout=60, what="v2 at the archive")
        assert all(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID != KOS_CLASS for f in archive.files())
        assert f"rejection note queued for {len(v1)} object(s) of v1" in node.log()
