"""The persistent send queue and the C-STORE sender, against real peers (Orthanc, dcmtk storescp, a counting SCP).

The rows the pipeline makes in production (result objects in the store and the
index, one pending delivery per destination) are made here through the ORM;
the objects are real DICOM: CR radiographs of pydicom-data (JPEG 2000) copied
with new UIDs, and a Basic Text SR (explicit VR little endian) in the same study.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, update

from dicom_node.config import parse_config
from dicom_node.sender import Sender
from storage.deliveries import DeliveryQueue
from storage.files import InstanceStore
from storage.index import Index
from storage.models import Delivery, Patient, ResultObject, Study, utcnow
from tests.counting_scp import CountingSCP, CountingSCPProcess
from tests.dicomgen import code_item
from tests.peers import Orthanc, Storescp, free_port, wait_until
from tests.postgres import database_url

REPO = Path(__file__).resolve().parent.parent
FAST = {"base_delay_seconds": 0.2, "multiplier": 2.0, "max_delay_seconds": 1.0, "max_attempts": 10,
        "timeout_seconds": 5.0, "poll_seconds": 0.1}


# -- fixtures and helpers ------------------------------------------------------
class Rig:
    """Config, store, index, queue and sender of one node, on a temporary directory."""

    def __init__(self, workdir: Path, peers: list[dict], sending: dict | None = None):
        self.workdir = workdir
        self.raw = {"node": {"ae_title": "MSKNODE", "bind": "127.0.0.1", "port": free_port()},
                    "peers": peers,
                    "storage": {"path": str(workdir / "var"),
                                "database_url": database_url(workdir), "min_free_mb": 0},
                    "sending": {**FAST, **(sending or {})}}
        self.config_path = workdir / "config.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.raw))
        self.cfg = parse_config(self.raw, base=workdir, environ={})
        self.store = InstanceStore(self.cfg.storage.path, min_free_mb=0)
        self.index = Index(self.cfg.storage.database_url)
        self.queue = DeliveryQueue(self.index)
        self.sender = Sender(self.cfg, self.store, self.queue)
        self.n = 0

    def close(self) -> None:
        self.index.close()

    # the pipeline's part, done by hand
    def add_study(self, destinations: list[str], *, version: int = 1, state: str = "results_ready",
                  study_uid: str | None = None) -> tuple[int, str, list[str]]:
        """A study with three result objects (SR listed first), each to every destination.
        Returns (study id, StudyInstanceUID, SOP Instance UIDs in insertion order)."""
        self.n += 1
        study_uid = study_uid or generate_uid()
        out = self.workdir / f"objects{self.n}"
        objects = make_objects(out, study_uid, f"SEND{self.n:03d}")
        with self.index.Session.begin() as s:
            study = s.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
            if study is None:
                patient = Patient(PatientID=f"SEND{self.n:03d}")
                s.add(patient)
                s.flush()
                study = Study(StudyInstanceUID=study_uid, patient_id=patient.id, state=state,
                              result_version=version)
                s.add(study)
                s.flush()
            else:
                study.result_version = version
                study.state = state
            uids = self._insert(s, study, objects, destinations, version)
            return study.id, study_uid, uids

    def _insert(self, s, study, objects, destinations, version) -> list[str]:
        uids = []
        for kind, path in objects:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            rel = self.store.result_relpath(study.StudyInstanceUID, f"{ds.SOPInstanceUID}")
            stored = self.store.write(rel, path.read_bytes())
            ro = ResultObject(study_id=study.id, result_version=version, generation=1, kind=kind,
                              SOPInstanceUID=ds.SOPInstanceUID, SOPClassUID=ds.SOPClassUID,
                              SeriesInstanceUID=ds.SeriesInstanceUID,
                              TransferSyntaxUID=str(ds.file_meta.TransferSyntaxUID), file_path=rel,
                              file_size=stored.size)
            s.add(ro)
            s.flush()
            for dest in destinations:
                s.add(Delivery(result_id=ro.id, study_id=study.id, destination=dest, state="pending",
                               next_attempt_at=utcnow()))
            uids.append(str(ds.SOPInstanceUID))
        return uids

    # reading back
    def deliveries(self, study_id: int | None = None) -> list[Delivery]:
        with self.index.Session() as s:
            q = select(Delivery).order_by(Delivery.id)
            if study_id is not None:
                q = q.where(Delivery.study_id == study_id)
            return list(s.scalars(q).all())

    def study(self, study_id: int) -> Study:
        with self.index.Session() as s:
            return s.get(Study, study_id)

    def set_state(self, delivery_ids: list[int], state: str) -> None:
        with self.index.Session.begin() as s:
            s.execute(update(Delivery).where(Delivery.id.in_(delivery_ids)).values(state=state))


def make_objects(out: Path, study_uid: str, patient_id: str) -> list[tuple[str, Path]]:
    """Result-like objects of one study: an SR (explicit VR LE) and two CR images (JPEG 2000)."""
    from pydicom.data import get_testdata_file

    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    objects = [("sr", write_basic_sr(out / "sr.dcm", study_uid, patient_id))]
    for kind, name in (("heatmap", "RG3_J2KI.dcm"), ("summary", "RG1_J2KI.dcm")):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = patient_id
        path = out / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        objects.append((kind, path))
    return objects


def write_basic_sr(path: Path, study_uid: str, patient_id: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "TEST^SENDER"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "SR"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "msk-dicom-node tests"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code_item("18748-4", "LN", "Diagnostic imaging report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [code_item("121071", "DCM", "Finding")]
    item.TextValue = "send queue test object"
    ds.ContentSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def rigs(tmp_path):
    made: list[Rig] = []

    def _make(peers, sending=None, name="node"):
        r = Rig(tmp_path / name, peers, sending)
        made.append(r)
        return r

    yield _make
    for r in made:
        r.close()


def orthanc_lookup(pacs: Orthanc, uid: str) -> list[str]:
    hits = pacs.post("/tools/lookup", uid.encode())
    return [h["ID"] for h in hits if h["Type"] == "Instance"]


# -- the queue alone -----------------------------------------------------------
def test_queue_batches_states_and_summary(rigs):
    rig = rigs([{"ae_title": "A", "host": "127.0.0.1", "port": 1}, {"ae_title": "B", "host": "127.0.0.1", "port": 2}])
    q = rig.queue
    sid, study_uid, uids = rig.add_study(["A", "B"])
    other_sid, _, _ = rig.add_study(["A"], state="inferring")  # not results_ready: never moved by the queue

    batches = q.due()
    by_key = {(b.study_id, b.destination): b for b in batches}
    assert set(by_key) == {(sid, "A"), (sid, "B"), (other_sid, "A")}
    b = by_key[(sid, "A")]
    assert b.StudyInstanceUID == study_uid and len(b) == 3
    assert [i.kind for i in b.items][-1] == "sr", "the SR goes last, after the secondary captures it references"
    assert {i.SOPInstanceUID for i in b.items} == set(uids)
    assert all(i.file_path.startswith("results/") and i.TransferSyntaxUID for i in b.items)
    assert q.due(now=utcnow() - dt.timedelta(seconds=60)) == [], "nothing is due before its time"

    # A: all sent; B: one fails for good -> the study is failed, and the reason names B
    for i in b.items:
        assert q.mark_sending([i.delivery_id]) == [i.delivery_id]
        assert q.mark_sending([i.delivery_id]) == [], "a delivery is taken once"
        q.mark_sent(i.delivery_id, 0x0000)
    assert rig.study(sid).state == "results_ready"
    bb = by_key[(sid, "B")]
    for i in bb.items[:2]:
        q.mark_sending([i.delivery_id])
        q.mark_sent(i.delivery_id, 0xB000, note="stored with warning 0xB000")
    q.mark_failed([bb.items[2].delivery_id], "B answered C-STORE with status 0xA700", 0xA700, rig.cfg.sending,
                  permanent=True)
    st = rig.study(sid)
    assert st.state == "failed" and "B" in st.state_reason and "0xA700" in st.state_reason

    summary = {d["destination"]: d for d in q.study_deliveries(sid)}
    assert q.summaries_for_uids([study_uid])[study_uid] == q.study_deliveries(sid)
    assert summary["A"]["states"]["sent"] == 3 and summary["A"]["last_error"] is None
    assert summary["B"]["states"]["sent"] == 2 and summary["B"]["states"]["dead"] == 1
    assert summary["B"]["attempts"] == 1 and "0xA700" in summary["B"]["last_error"]
    assert q.has_undelivered(sid)

    assert q.retry_dead(study_uid="1.2.3.4.5.6.7.8.9") == 0
    assert q.retry_dead(study_uid) == 1
    assert rig.study(sid).state == "results_ready" and rig.study(sid).state_reason is None
    [again] = [x for x in q.due() if x.study_id == sid]
    assert again.destination == "B" and [i.attempts for i in again.items] == [0]
    q.mark_sending(again.ids)
    q.mark_sent(again.ids[0], 0x0000)
    assert rig.study(sid).state == "sent" and not q.has_undelivered(sid)

    # the other study is inferring (late images): its deliveries go, its state is not the queue's to change
    [ob] = [x for x in q.due() if x.study_id == other_sid]
    for i in ob.items:
        q.mark_sending([i.delivery_id])
        q.mark_sent(i.delivery_id, 0x0000)
    assert rig.study(other_sid).state == "inferring"


def test_queue_backoff_dead_letter_and_superseded_results(rigs):
    rig = rigs([{"ae_title": "A", "host": "127.0.0.1", "port": 1}],
               {"base_delay_seconds": 10, "multiplier": 3, "max_delay_seconds": 60, "max_attempts": 3})
    q, policy = rig.queue, rig.cfg.sending
    sid, study_uid, _ = rig.add_study(["A"])
    ids = q.due()[0].ids
    t0 = utcnow()
    for attempt, delay in ((1, 10), (2, 30)):
        states = q.mark_failed(ids, "no association with A", None, policy, now=t0)
        assert set(states.values()) == {"pending"}
        for d in rig.deliveries(sid):
            assert d.attempts == attempt and d.next_attempt_at == t0 + dt.timedelta(seconds=delay)
        assert q.due(now=t0 + dt.timedelta(seconds=delay - 1)) == []
        assert len(q.due(now=t0 + dt.timedelta(seconds=delay))[0]) == 3
    assert set(q.mark_failed(ids, "no association with A", None, policy, now=t0).values()) == {"dead"}
    assert rig.study(sid).state == "failed" and "A" in rig.study(sid).state_reason
    assert q.due(now=t0 + dt.timedelta(days=1)) == []

    # a newer result version supersedes this one (the pipeline's job): old dead ones cancelled, not retried
    with rig.index.Session.begin() as s:
        s.execute(update(ResultObject).where(ResultObject.study_id == sid).values(superseded=True))
        s.execute(update(Delivery).where(Delivery.study_id == sid, Delivery.state.in_(("pending", "dead")))
                  .values(state="cancelled"))
        s.execute(update(Study).where(Study.id == sid).values(state="inferring"))
    _, _, new_uids = rig.add_study(["A"], version=2, study_uid=study_uid)
    assert q.retry_dead(study_uid) == 0
    [b] = q.due()
    assert {i.SOPInstanceUID for i in b.items} == set(new_uids) and {i.result_version for i in b.items} == {2}
    for i in b.items:
        q.mark_sending([i.delivery_id])
        q.mark_sent(i.delivery_id)
    assert rig.study(sid).state == "sent", "cancelled deliveries of the old version do not hold the study back"
    summary = q.study_deliveries(sid)
    assert summary[0]["result_version"] == 2 and summary[0]["states"]["sent"] == 3
    assert q.study_deliveries(sid, result_version=1)[0]["states"]["cancelled"] == 3


# -- real peers ----------------------------------------------------------------
def test_delivers_to_orthanc_and_counter_one_association_per_study(rigs, tmp_path):
    counter_port = free_port()
    with Orthanc(tmp_path / "orthanc", aet="PACS") as pacs, \
            CountingSCP(counter_port, "COUNTER", tmp_path / "counter.json"):
        rig = rigs([{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port},
                    {"ae_title": "COUNTER", "host": "127.0.0.1", "port": counter_port}])
        studies = [rig.add_study(["PACS", "COUNTER"]) for _ in range(2)]
        assert rig.sender.run_once() == 12
        assert rig.sender.run_once() == 0, "nothing left to send"

        counter = CountingSCPProcess(tmp_path / "counter.json", port=counter_port)
        received = counter.received()
        order = counter.state()["order"]
        for sid, study_uid, uids in studies:
            assert rig.study(sid).state == "sent"
            assert all(d.state == "sent" and d.attempts == 0 and d.last_status == 0 for d in rig.deliveries(sid))
            # Orthanc holds every object, once, in the transfer syntax it was stored in
            for uid in uids:
                ids = orthanc_lookup(pacs, uid)
                assert len(ids) == 1, f"{uid} is not (or not once) in Orthanc"
                ts = pacs.get_bytes(f"/instances/{ids[0]}/metadata/TransferSyntax").decode()
                assert ts == str(pydicom.dcmread(rig.store.abspath(_path_of(rig, uid)),
                                                 stop_before_pixels=True).file_meta.TransferSyntaxUID)
            # the counter: each once, all of a study in one association, the SR after the images
            assert [received[u]["count"] for u in uids] == [1, 1, 1]
            assocs = {a for u in uids for a in received[u]["associations"]}
            assert len(assocs) == 1, f"study {study_uid} came in {len(assocs)} associations"
            assert received[uids[1]]["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.91"  # JPEG 2000, as stored
            assert received[uids[0]]["TransferSyntaxUID"] == ExplicitVRLittleEndian
            assert received[uids[0]]["calling_ae"] == "MSKNODE"
            positions = [order.index(u) for u in uids]
            assert positions[0] == max(positions), "the SR arrives last"
        assert counter.state()["associations"] == 2
        assert len(pacs.instances()) == 6


def _path_of(rig: Rig, uid: str) -> str:
    with rig.index.Session() as s:
        return s.scalar(select(ResultObject.file_path).where(ResultObject.SOPInstanceUID == uid))


def test_outage_backoff_then_delivered_once(rigs, tmp_path):
    pacs = Orthanc(tmp_path / "orthanc", aet="PACS")  # configured, not running yet
    rig = rigs([{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
               {"base_delay_seconds": 0.5, "multiplier": 2.0, "max_delay_seconds": 1.5, "max_attempts": 100})
    sid, _, uids = rig.add_study(["PACS"])

    t0 = utcnow()
    assert rig.sender.run_once() == 0
    ds = rig.deliveries(sid)
    assert {d.state for d in ds} == {"pending"} and {d.attempts for d in ds} == {1}
    assert "no association with PACS" in ds[0].last_error
    assert all(dt.timedelta(seconds=0.5) <= d.next_attempt_at - t0 <= dt.timedelta(seconds=5) for d in ds)
    assert rig.sender.run_once() == 0
    assert {d.attempts for d in rig.deliveries(sid)} == {1}, "no new attempt before the backoff delay"
    time.sleep(0.6)
    t1 = utcnow()
    rig.sender.run_once()
    ds = rig.deliveries(sid)
    assert {d.attempts for d in ds} == {2}
    assert all(d.next_attempt_at - t1 >= dt.timedelta(seconds=1.0) for d in ds), "the delay doubles"
    assert rig.study(sid).state == "results_ready"

    # the sender in the background, as in the node; the PACS comes back a while later
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.start()
    rig.sender.start(scheduler)
    try:
        wait_until(lambda: min(d.attempts for d in rig.deliveries(sid)) >= 3, timeout=20, what="a third attempt")
        with pacs:
            wait_until(lambda: rig.study(sid).state == "sent", timeout=30, what="delivery after the outage")
            assert all(len(orthanc_lookup(pacs, u)) == 1 for u in uids)
            assert len(pacs.instances()) == 3
            stats = pacs.get("/statistics")
            assert stats["CountInstances"] == 3
            time.sleep(0.5)  # more polls: nothing more goes out
            assert {d.state for d in rig.deliveries(sid)} == {"sent"}
    finally:
        rig.sender.stop()
        scheduler.shutdown(wait=False)
    assert rig.queue.study_deliveries(sid)[0]["states"]["sent"] == 3


def test_dead_letter_then_retry(rigs, tmp_path):
    port = free_port()
    rig = rigs([{"ae_title": "COUNTER", "host": "127.0.0.1", "port": port}],
               {"base_delay_seconds": 0.05, "max_delay_seconds": 0.1, "max_attempts": 3})
    sid, study_uid, uids = rig.add_study(["COUNTER"])
    for _ in range(5):
        rig.sender.run_once()
        time.sleep(0.15)
    ds = rig.deliveries(sid)
    assert {d.state for d in ds} == {"dead"} and {d.attempts for d in ds} == {3}, "parked after max_attempts"
    st = rig.study(sid)
    assert st.state == "failed" and "COUNTER" in st.state_reason and "no association" in st.state_reason
    [summary] = rig.queue.study_deliveries(sid)
    assert summary["states"]["dead"] == 3 and summary["attempts"] == 3 and "COUNTER" in summary["last_error"]

    with CountingSCP(port, "COUNTER", tmp_path / "counter.json") as counter:
        assert rig.sender.run_once() == 0, "dead letters wait for `dicom-node retry`"
        assert counter.counts() == {}
        assert rig.queue.retry_dead(study_uid) == 3
        assert rig.study(sid).state == "results_ready"
        assert rig.sender.run_once() == 3
        assert counter.counts() == {u: 1 for u in uids}
    assert rig.study(sid).state == "sent"
    assert rig.queue.retry_dead() == 0


def test_unknown_destination_rejection_and_failure_status(rigs, tmp_path):
    good, bad = free_port(), free_port()
    rig = rigs([{"ae_title": "COUNTER", "host": "127.0.0.1", "port": good},
                {"ae_title": "WRONGAE", "host": "127.0.0.1", "port": good},  # answers as COUNTER only: rejects
                {"ae_title": "FULL", "host": "127.0.0.1", "port": bad},  # answers every C-STORE with 0xA700
                {"ae_title": "NOADDR"}])
    s_unknown, _, _ = rig.add_study(["NOWHERE"])
    s_noaddr, _, _ = rig.add_study(["NOADDR"])
    s_rejected, _, _ = rig.add_study(["WRONGAE"])
    s_full, _, _ = rig.add_study(["FULL"])
    with CountingSCP(good, "COUNTER", tmp_path / "good.json") as counter, \
            CountingSCP(bad, "FULL", tmp_path / "full.json", status=0xA700):
        assert rig.sender.run_once() == 0
        assert counter.counts() == {}
    for sid, word in ((s_unknown, "not a configured peer"), (s_noaddr, "no host and port")):
        ds = rig.deliveries(sid)
        assert {d.state for d in ds} == {"dead"} and word in ds[0].last_error, "no retry can help: dead at once"
        assert rig.study(sid).state == "failed" and word in rig.study(sid).state_reason
    ds = rig.deliveries(s_rejected)
    assert {d.state for d in ds} == {"pending"} and {d.attempts for d in ds} == {1}
    assert "association rejected by WRONGAE" in ds[0].last_error and "Called AE title" in ds[0].last_error
    ds = rig.deliveries(s_full)
    assert {d.state for d in ds} == {"pending"} and {d.last_status for d in ds} == {0xA700}
    assert "status 0xA700" in ds[0].last_error


SENDER_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from dicom_node.config import load_config
from dicom_node.sender import Sender
from storage.deliveries import DeliveryQueue
from storage.files import InstanceStore
from storage.index import Index
cfg = load_config(sys.argv[1])
Sender(cfg, InstanceStore(cfg.storage.path), DeliveryQueue(Index(cfg.storage.database_url))).run_once()
"""


def test_crash_while_sending_recovered_with_cfind_exactly_once(rigs, tmp_path):
    """SIGKILL while a C-STORE is on the wire (the counter holds the instance, the node has no answer yet):
    after restart the C-FIND finds it there, so it is marked sent and not sent again."""
    port = free_port()
    record = tmp_path / "counter.json"
    rig = rigs([{"ae_title": "COUNTER", "host": "127.0.0.1", "port": port}], {"timeout_seconds": 30})
    sid, study_uid, uids = rig.add_study(["COUNTER"])
    with CountingSCPProcess(record, port=port, delay=30) as slow:  # stores, then answers 30 s later
        proc = subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT, str(rig.config_path)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            wait_until(lambda: slow.counts(), timeout=60, what="the first C-STORE at the counter")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    [first] = slow.counts()
    by_uid = {_uid_of(rig, d.result_id): d for d in rig.deliveries(sid)}
    assert by_uid[first].state == "sending", "the crash left the first delivery in flight"
    # another one as if the crash had come right after its 'sending' commit, before its C-STORE went out
    [never] = [u for u in uids if by_uid[u].state == "pending"][:1]
    rig.set_state([by_uid[never].id], "sending")
    assert len(rig.queue.in_flight()) == 2

    with CountingSCPProcess(record, port=port) as counter:  # the same destination, restarted, answering at once
        assert rig.sender.run_once() == 3
        assert counter.counts() == {u: 1 for u in uids}, "each result instance exactly once"
        assert counter.state()["finds"] == 2
    by_uid = {_uid_of(rig, d.result_id): d for d in rig.deliveries(sid)}
    assert by_uid[first].state == "sent" and "C-FIND" in by_uid[first].last_error
    assert by_uid[never].state == "sent"
    assert rig.study(sid).state == "sent"
    assert rig.queue.in_flight() == []


def _uid_of(rig: Rig, result_id: int) -> str:
    with rig.index.Session() as s:
        return s.scalar(select(ResultObject.SOPInstanceUID).where(ResultObject.id == result_id))


def test_lost_response_is_asked_about_not_resent(rigs, tmp_path):
    """The C-STORE reaches the destination but its response does not come within the timeout: the delivery
    stays in doubt ('sending'), and the next attempt asks with C-FIND instead of sending a second copy."""
    port = free_port()
    rig = rigs([{"ae_title": "COUNTER", "host": "127.0.0.1", "port": port}],
               {"timeout_seconds": 1.5, "base_delay_seconds": 0.2})
    sid, _, uids = rig.add_study(["COUNTER"])
    with CountingSCP(port, "COUNTER", tmp_path / "counter.json", delay=5) as counter:
        assert rig.sender.run_once() == 0
        ds = rig.deliveries(sid)
        states = sorted(d.state for d in ds)
        assert states == ["pending", "pending", "sending"], states
        assert all(d.attempts == 1 for d in ds)
        assert len(counter.counts()) == 1
        counter.delay = 0
        time.sleep(0.3)  # the backoff
        assert rig.sender.run_once() == 3
        assert counter.counts() == {u: 1 for u in uids}
        assert counter.state["finds"] == 1
    assert rig.study(sid).state == "sent"


def test_destination_without_cfind_gets_a_replacement(rigs, tmp_path, caplog):
    """dcmtk's storescp cannot be asked (no C-FIND): an in-flight delivery is sent again, and the log says a
    repeat is possible (same SOP Instance UID: a replacement, not a new object)."""
    with Storescp(tmp_path / "scp", aet="STORESCP") as scp:
        rig = rigs([{"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}])
        sid, _, uids = rig.add_study(["STORESCP"])
        rig.set_state([rig.deliveries(sid)[0].id], "sending")
        with caplog.at_level(logging.WARNING, logger="dicom_node.sender"):
            assert rig.sender.run_once() == 3
        assert "does not support Study Root C-FIND" in caplog.text and "repeat" in caplog.text
        got = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in scp.files())
        assert got == sorted(uids)
    assert rig.study(sid).state == "sent"


def test_compressed_objects_to_a_destination_that_takes_only_explicit_vr(rigs, tmp_path):
    """The JPEG 2000 context is refused, explicit VR little endian accepted: the objects go decompressed,
    with their own SOP Instance UIDs (the same objects, not new ones)."""
    port = free_port()
    rig = rigs([{"ae_title": "PLAIN", "host": "127.0.0.1", "port": port}])
    sid, _, uids = rig.add_study(["PLAIN"])
    with CountingSCP(port, "PLAIN", tmp_path / "plain.json", syntaxes=[ExplicitVRLittleEndian]) as plain:
        assert rig.sender.run_once() == 3
        got = plain.received()
    assert {u: got[u]["count"] for u in uids} == {u: 1 for u in uids}
    assert {got[u]["TransferSyntaxUID"] for u in uids} == {ExplicitVRLittleEndian}
    assert rig.study(sid).state == "sent"


class OverwritingOrthanc(Orthanc):
    """Orthanc that replaces an instance it receives again (so that a repeat would show)."""

    def write_config(self) -> Path:
        import json

        path = super().write_config()
        cfg = json.loads(path.read_text())
        cfg["OverwriteInstances"] = True
        path.write_text(json.dumps(cfg, indent=2))
        return path


def test_recovery_asks_orthanc_with_cfind(rigs, tmp_path):
    """In-flight deliveries to Orthanc after a crash: the one Orthanc already holds is marked sent without a
    second C-STORE (its Origin stays the REST upload), the one it lacks is sent."""
    node_port = free_port()
    with OverwritingOrthanc(tmp_path / "orthanc", aet="PACS",
                            modalities={"msknode": ("MSKNODE", "127.0.0.1", node_port)}) as pacs:
        rig = rigs([{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}])
        rig.raw["node"]["port"] = node_port
        sid, _, uids = rig.add_study(["PACS"])
        by_uid = {_uid_of(rig, d.result_id): d for d in rig.deliveries(sid)}
        held, lacking = uids[1], uids[2]
        pacs.upload(rig.store.abspath(_path_of(rig, held)))  # reached Orthanc before the crash
        rig.set_state([by_uid[held].id, by_uid[lacking].id], "sending")

        assert rig.sender.run_once() == 3
        [oid] = orthanc_lookup(pacs, held)
        assert pacs.get_bytes(f"/instances/{oid}/metadata/Origin").decode() == "RestApi", "it was sent again"
        [oid2] = orthanc_lookup(pacs, lacking)
        assert pacs.get_bytes(f"/instances/{oid2}/metadata/Origin").decode() == "DicomProtocol"
        assert len(pacs.instances()) == 3
    states = {_uid_of(rig, d.result_id): d for d in rig.deliveries(sid)}
    assert {d.state for d in states.values()} == {"sent"}
    assert "C-FIND" in states[held].last_error
    assert rig.study(sid).state == "sent"
