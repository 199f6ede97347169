"""Superseded results at the destinations: IHE IOCM rejection notes (dicom_node/rejections.py, dicom_node/ko/).

The send queue and the sender against real dcmtk storescp peers, with the pipeline's part (results
recorded, a re-run superseding them) done through storage's own calls (:meth:`storage.jobs.Jobs.finish`);
the whole loop with the model, late images and Orthanc is in tests/test_pipeline.py.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from dicom_node.errors import EncodingError
from dicom_node.ko import SOP_CLASS_UID as KOS_CLASS
from dicom_node.ko import build_rejection_note
from dicom_node.ko.sop import series_description
from storage.jobs import ClaimedStudy, Jobs, NewResult
from storage.models import Delivery, ResultObject, Study, utcnow
from tests.peers import Storescp, dciodvfy
from tests.test_sender import FAST, Rig, make_objects


def dciodvfy_errors(path: Path) -> list[str]:
    r = dciodvfy(path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert r.returncode == 0, r.stderr
    return errors


def kos_references(ds: Dataset) -> set[str]:
    """The SOP Instance UIDs a KOS lists in its evidence, after checking that its content lists the same."""
    evidence = {str(i.ReferencedSOPInstanceUID) for st in ds.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    content = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in ds.ContentSequence
               if item.ValueType in ("IMAGE", "COMPOSITE")}
    assert content == evidence
    return evidence


def received(scp: Storescp) -> list[Dataset]:
    """What a storescp holds, in the order it arrived (file modification times)."""
    files = sorted(scp.files(), key=lambda p: p.stat().st_mtime_ns)
    return [pydicom.dcmread(f) for f in files]


class Node:
    """A Rig (store, index, queue, sender) plus the pipeline's recording of new result versions."""

    def __init__(self, tmp: Path, peers: list[dict], sending: dict | None = None):
        self.rig = Rig(tmp / "node", peers, {**FAST, **(sending or {})})
        self.jobs = Jobs(self.rig.index)
        self.tmp = tmp
        self.n = 0

    def record(self, study_uid: str, version: int, destinations: list[str]) -> list[str]:
        """What the pipeline does for result version ``version`` of the study (a first run, or a re-run
        after late images): claim, then Jobs.finish with three objects to ``destinations``."""
        rig = self.rig
        if version == 1:
            sid, _, uids = rig.add_study(destinations, study_uid=study_uid)
            return uids
        self.n += 1
        with rig.index.Session.begin() as s:
            study = s.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
            s.execute(update(Study).where(Study.id == study.id).values(state="inferring", claimed_by="w"))
            claim = ClaimedStudy(study.id, study_uid, study.generation, study.result_version, True, "", "w")
        results = []
        for kind, path in make_objects(self.tmp / f"v{version}-{self.n}", study_uid, "SEND001"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            rel = rig.store.result_relpath(study_uid, f"{kind}:{ds.SOPInstanceUID}")
            stored = rig.store.write(rel, path.read_bytes())
            results.append(NewResult(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
                                     str(ds.file_meta.TransferSyntaxUID), rel, stored.size, tuple(destinations)))
        assert self.jobs.finish(claim, version, results)
        return [r.SOPInstanceUID for r in results]

    def run(self, passes: int = 3) -> None:
        for _ in range(passes):
            self.rig.sender.run_once()

    def deliveries(self, kind: str | None = None) -> list[tuple[str, str, int, str]]:
        """(destination, kind, result version, state) of every delivery."""
        with self.rig.index.Session() as s:
            q = (select(Delivery.destination, ResultObject.kind, ResultObject.result_version, Delivery.state)
                 .join(ResultObject, ResultObject.id == Delivery.result_id).order_by(Delivery.id))
            rows = [tuple(r) for r in s.execute(q).all()]
        return [r for r in rows if kind is None or r[1] == kind]


@pytest.fixture
def nodes(tmp_path):
    made: list[Node] = []

    def _make(peers, sending=None):
        n = Node(tmp_path, peers, sending)
        made.append(n)
        return n

    yield _make
    for n in made:
        n.rig.close()


def test_rejection_note_is_valid_and_reads_back(tmp_path):
    study = generate_uid()
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for _, path in make_objects(tmp_path / "o", study, "P1")]
    doc = build_rejection_note(headers, rejected_versions=[1], superseding_version=2,
                               series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    path = tmp_path / "kos.dcm"
    doc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    title = back.content[0].ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == \
        ("113001", "DCM", "Rejected for Quality Reasons")
    assert back.SOPClassUID == KOS_CLASS and back.Modality == "KO" and back.StudyInstanceUID == study
    assert kos_references(back) == {str(h.SOPInstanceUID) for h in headers}
    for h in headers:
        assert back.resolve_reference(str(h.SOPInstanceUID)) == (study, str(h.SeriesInstanceUID),
                                                                 str(h.SOPInstanceUID))
    assert back.SeriesDescription == "REJECTS AI results v1 superseded by v2" and back.SeriesNumber == 9902
    assert series_description([1, 2, 1], 3) == "REJECTS AI results v1-v2 superseded by v3"
    with pytest.raises(EncodingError):
        build_rejection_note([], rejected_versions=[1], superseding_version=2, series_instance_uid="1.2",
                             sop_instance_uid="1.3")
    with pytest.raises(EncodingError):
        build_rejection_note(headers, rejected_versions=[2], superseding_version=2, series_instance_uid="1.2",
                             sop_instance_uid="1.3")


def test_reject_sends_a_note_after_the_new_version_keep_sends_none(nodes, tmp_path):
    with Storescp(tmp_path / "rej") as rej, Storescp(tmp_path / "keep") as keep, \
            Storescp(tmp_path / "late") as late:
        node = nodes([{"ae_title": "REJ", "host": "127.0.0.1", "port": rej.port, "superseded_results": "reject"},
                      {"ae_title": "KEEP", "host": "127.0.0.1", "port": keep.port},
                      {"ae_title": "LATE", "host": "127.0.0.1", "port": late.port}],
                     {"superseded_results": "keep"})
        study_uid = generate_uid()
        v1 = node.record(study_uid, 1, ["REJ", "KEEP", "LATE"])
        # LATE was down while v1 went out: its v1 deliveries wait for their next attempt when the re-run
        # supersedes them (and are cancelled then)
        with node.rig.index.Session.begin() as s:
            s.execute(update(Delivery).where(Delivery.destination == "LATE")
                      .values(next_attempt_at=utcnow() + dt.timedelta(hours=1)))
        node.run(1)
        assert len(rej.files()) == 3 and len(keep.files()) == 3 and late.files() == []

        v2 = node.record(study_uid, 2, ["REJ", "KEEP", "LATE"])
        assert node.rig.queue.rejections_due() == [], "nothing before the new version is delivered"
        node.run()
        # REJ: v2, then the note rejecting exactly v1; KEEP: v2 only; LATE: v2 only (v1 never got there)
        got = received(rej)
        assert {str(d.SOPInstanceUID) for d in got[:3]} == set(v1)
        assert {str(d.SOPInstanceUID) for d in got[3:6]} == set(v2)
        assert len(got) == 7 and got[6].SOPClassUID == KOS_CLASS
        kos_path = sorted(rej.files(), key=lambda p: p.stat().st_mtime_ns)[-1]
        assert dciodvfy_errors(kos_path) == []
        kos = hd.ko.KeyObjectSelectionDocument.from_dataset(got[6])
        assert kos_references(kos) == set(v1)
        assert kos.StudyInstanceUID == study_uid and kos.SeriesDescription.endswith("v1 superseded by v2")
        assert [d.SOPClassUID for d in received(keep)].count(KOS_CLASS) == 0 and len(keep.files()) == 6
        assert {str(d.SOPInstanceUID) for d in received(late)} == set(v2)
        assert node.deliveries("rejection") == [("REJ", "rejection", 2, "sent")]
        assert node.rig.study(1).state == "sent"
        node.run()
        assert len(rej.files()) == 7, "exactly once"

        # a third version: its note rejects v2 only (v1 was rejected by the note of v2)
        v3 = node.record(study_uid, 3, ["REJ", "KEEP", "LATE"])
        node.run()
        got = received(rej)
        assert {str(d.SOPInstanceUID) for d in got[7:10]} == set(v3) and got[10].SOPClassUID == KOS_CLASS
        assert kos_references(got[10]) == set(v2) and len(got) == 11
        assert got[10].SOPInstanceUID != got[6].SOPInstanceUID


def test_note_waits_for_in_flight_old_objects_and_survives_a_restart(nodes, tmp_path):
    with Storescp(tmp_path / "rej") as rej:
        peers = [{"ae_title": "REJ", "host": "127.0.0.1", "port": rej.port}]
        node = nodes(peers, {"superseded_results": "reject"})
        study_uid = generate_uid()
        v1 = node.record(study_uid, 1, ["REJ"])
        node.run(1)
        # the v1 SR's C-STORE was on the wire when the re-run came (its outcome unknown)
        with node.rig.index.Session.begin() as s:
            sr_id = s.scalar(select(ResultObject.id).where(ResultObject.SOPInstanceUID == v1[0]))
            s.execute(update(Delivery).where(Delivery.result_id == sr_id).values(state="sending"))
        node.record(study_uid, 2, ["REJ"])
        q = node.rig.queue
        for it in q.due()[0].items:  # v2 delivered by hand, the v1 SR still in doubt
            q.mark_sending([it.delivery_id])
            q.mark_sent(it.delivery_id)
        assert q.rejections_due() == [], "an in-flight old object is settled first"
        # settled as held (the destination has it): now the note is due, with the SR in it
        with node.rig.index.Session.begin() as s:
            s.execute(update(Delivery).where(Delivery.result_id == sr_id).values(state="sent"))
        [due] = q.rejections_due()
        assert {it.SOPInstanceUID for it in due.rejected} == set(v1) and due.result_version == 2

        # a restart (a new sender over the same index): its first pass finds the note due, makes it once
        node.rig.close()
        restarted = Rig(tmp_path / "node", peers, {**FAST, "superseded_results": "reject"})
        node.rig = restarted
        node.run()
        kos = [d for d in received(rej) if d.SOPClassUID == KOS_CLASS]
        assert len(kos) == 1 and kos_references(kos[0]) == set(v1)
        assert node.deliveries("rejection") == [("REJ", "rejection", 2, "sent")]
        # the note's file is named from a hash, like every result
        with restarted.index.Session() as s:
            path = s.scalar(select(ResultObject.file_path).where(ResultObject.kind == "rejection"))
        assert str(kos[0].SOPInstanceUID) not in path and path.startswith("results/")


def _deliver_all(node: Node) -> None:
    """Every due delivery marked sent, as the sender records a success (no network)."""
    q = node.rig.queue
    for batch in q.due():
        for it in batch.items:
            q.mark_sending([it.delivery_id])
            q.mark_sent(it.delivery_id)


def test_a_note_that_never_went_out_is_taken_over_by_the_next_version(nodes):
    node = nodes([{"ae_title": "REJ", "host": "127.0.0.1", "port": 9, "superseded_results": "reject"}])
    study_uid = generate_uid()
    q, cfg, store = node.rig.queue, node.rig.cfg, node.rig.store
    from dicom_node.rejections import queue_rejection_notes

    v1 = node.record(study_uid, 1, ["REJ"])
    _deliver_all(node)
    assert queue_rejection_notes(cfg, q, store) == 0, "nothing superseded yet"
    v2 = node.record(study_uid, 2, ["REJ"])
    _deliver_all(node)
    assert queue_rejection_notes(cfg, q, store) == 1 and queue_rejection_notes(cfg, q, store) == 0
    assert node.deliveries("rejection") == [("REJ", "rejection", 2, "pending")]
    # version 3 before the note of version 2 went out: that note is cancelled, and the note of
    # version 3 lists the objects of v1 and v2
    node.record(study_uid, 3, ["REJ"])
    assert node.deliveries("rejection") == [("REJ", "rejection", 2, "cancelled")]
    _deliver_all(node)
    [due] = q.rejections_due()
    assert {it.SOPInstanceUID for it in due.rejected} == set(v1) | set(v2)
    assert queue_rejection_notes(cfg, q, store) == 1
    [batch] = q.due()
    [item] = batch.items
    doc = pydicom.dcmread(store.abspath(item.file_path))
    assert kos_references(doc) == set(v1) | set(v2)
    assert doc.SeriesDescription == "REJECTS AI results v1-v2 superseded by v3" and doc.SeriesNumber == 9903
    assert node.rig.study(1).state == "results_ready", "the study waits for its note"
