"""The study state machine (storage.states) and the storage API that moves studies through it,
on a real SQLite index and on a real PostgreSQL server."""

from __future__ import annotations

import ast
import datetime as dt
import re
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import states
from storage.deliveries import DeliveryQueue
from storage.errors import StorageError
from storage.index import Index, InstanceMeta
from storage.jobs import Jobs, NewResult
from storage.models import Patient, Study, StudyState, utcnow
from tests.postgres import BACKENDS, database_url

REPO = Path(__file__).resolve().parent.parent
ALL = list(StudyState)


@pytest.fixture(params=BACKENDS)
def index(tmp_path, request):
    """The index on SQLite and on PostgreSQL (a private server: tests/postgres.py)."""
    idx = Index(database_url(tmp_path, request.param))
    yield idx
    idx.close()


def _study_in(index: Index, state: StudyState, uid: str) -> int:
    """A study row in ``state`` (test set-up: written directly, as a database of any age may hold it)."""
    with index.Session.begin() as s:
        patient = Patient(PatientID=f"P{uid}")
        s.add(patient)
        s.flush()
        study = Study(StudyInstanceUID=uid, patient_id=patient.id, state=state.value, state_reason="before",
                      state_changed_at=dt.datetime(2020, 1, 1))
        s.add(study)
        s.flush()
        return study.id


def _study(index: Index, study_id: int) -> Study:
    with index.Session() as s:
        return s.get(Study, study_id)


def test_the_states_are_the_ones_the_readme_documents():
    readme = (REPO / "docs" / "operations.md").read_text()
    paragraph = re.search(r"^States: .*?(?:\n\n)", readme, re.DOTALL | re.MULTILINE).group(0)
    names = {name.strip() for span in re.findall(r"`([^`]+)`", paragraph) for name in span.split("→")}
    documented = {n for n in names if re.fullmatch(r"[a-z_]+", n)}  # not the settings it names
    assert len(documented) >= 7
    assert documented == {s.value for s in StudyState}
    assert set(states.TRANSITIONS) == set(StudyState), "every state has a row in the table"
    for targets in states.TRANSITIONS.values():
        assert set(targets) <= set(StudyState) and all(reason.strip() for reason in targets.values())
    assert states.INITIAL is StudyState.RECEIVING


def test_every_state_can_be_reached_and_left():
    reachable = {states.INITIAL} | {to for targets in states.TRANSITIONS.values() for to in targets}
    assert reachable == set(StudyState)
    for state, targets in states.TRANSITIONS.items():
        assert set(targets) - {state}, f"{state.value} is a dead end"


def test_every_allowed_transition_works_and_every_other_raises(index):
    n = 0
    for src in ALL:
        for dst in ALL:
            n += 1
            ok = dst in states.TRANSITIONS[src]
            assert states.allowed(src.value, dst.value) is ok
            # a loaded study: set_state
            sid = _study_in(index, src, f"1.2.3.{n}.1")
            now = utcnow()
            with index.db.write() as s:
                study = s.get(Study, sid)
                if ok:
                    states.set_state(study, dst, now=now, reason=f"to {dst.value}", last_error="e")
                else:
                    with pytest.raises(states.InvalidTransition) as err:
                        states.set_state(study, dst, now=now, reason="never")
                    assert isinstance(err.value, StorageError)
                    assert f"from {src.value} to {dst.value}" in str(err.value)
            row = _study(index, sid)
            if ok:
                assert (row.state, row.state_reason, row.state_changed_at, row.last_error) == \
                    (dst.value, f"to {dst.value}", now, "e")
            else:
                assert (row.state, row.state_reason, row.state_changed_at) == \
                    (src.value, "before", dt.datetime(2020, 1, 1))
            # the compare-and-set UPDATE
            sid = _study_in(index, src, f"1.2.3.{n}.2")
            if ok:
                with index.db.write() as s:
                    res = s.execute(states.guarded_update(dst, [src], Study.id == sid, now=now, claimed_by="w"))
                    assert res.rowcount == 1
                row = _study(index, sid)
                assert (row.state, row.state_reason, row.state_changed_at, row.claimed_by) == \
                    (dst.value, None, now, "w")
            else:
                with pytest.raises(states.InvalidTransition):
                    states.guarded_update(dst, [src], Study.id == sid, now=now)
                assert _study(index, sid).state == src.value
    assert n == len(ALL) ** 2


def test_guarded_update_moves_only_studies_in_the_named_states(index):
    stable = _study_in(index, StudyState.STABLE, "1.2.4.1")
    lapsed = _study_in(index, StudyState.INFERRING, "1.2.4.2")
    held = _study_in(index, StudyState.INFERRING, "1.2.4.3")
    sent = _study_in(index, StudyState.SENT, "1.2.4.4")
    now = utcnow()
    with index.db.write() as s:
        s.get(Study, lapsed).claimed_at = now - dt.timedelta(hours=1)
        s.get(Study, held).claimed_at = now
    with pytest.raises(states.InvalidTransition):  # sent -> inferring is not in the table
        states.guarded_update(states.INFERRING, [states.STABLE, states.SENT], now=now)
    lapsed_before = now - dt.timedelta(minutes=5)
    claim = states.guarded_update(states.INFERRING,
                                  {states.STABLE: None, states.INFERRING: Study.claimed_at < lapsed_before},
                                  now=now, claimed_by="w2")
    with index.db.write() as s:
        assert s.execute(claim).rowcount == 2
    assert [_study(index, i).claimed_by for i in (stable, lapsed, held, sent)] == ["w2", "w2", None, None]
    assert _study(index, sent).state == "sent" and _study(index, held).state == "inferring"


def test_no_state_write_in_storage_bypasses_the_owner():
    """Outside storage/states.py no code assigns ``.state`` or passes ``state=`` to ``update(Study)`` or
    ``Study(...)``."""
    offenders = []
    for path in sorted((REPO / "storage").glob("*.py")):
        if path.name == "states.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr in ("state", "state_reason", "state_changed_at"):
                        offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and any(k.arg in ("state", "state_reason") for k in node.keywords):
                chain = ast.unparse(node.func)
                if "update(Study)" in chain or chain == "Study":
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def _meta(study: str, sop: str, n: int) -> InstanceMeta:
    return InstanceMeta(SOPInstanceUID=sop, SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1", StudyInstanceUID=study,
                        SeriesInstanceUID=f"{study}.1", TransferSyntaxUID="1.2.840.10008.1.2.1", PatientID="LIFE",
                        Modality="DX", InstanceNumber=str(n))


class _Policy:
    max_attempts = 2

    @staticmethod
    def delay(attempts: int) -> float:
        return 0.0


def test_a_study_walks_its_life_through_the_storage_api(index):
    jobs, queue = Jobs(index), DeliveryQueue(index)
    t = utcnow()
    out = index.record_instance(_meta("1.2.5", "1.2.5.1.1", 1), "a.dcm", 10, "PACS", 5, now=t)
    assert out.event == "new_study" and _study(index, out.study_id).state == "receiving"
    sid = out.study_id
    assert index.mark_stable_if_due(sid, now=t + dt.timedelta(seconds=1)) == (False, t + dt.timedelta(seconds=5))
    assert index.mark_stable_if_due(sid, now=t + dt.timedelta(seconds=6)) == (True, None)
    assert _study(index, sid).state == "stable"

    claim = jobs.claim("host:1:w0", 600)
    assert claim.id == sid and _study(index, sid).state == "inferring"
    assert jobs.fail(claim, "RuntimeError: once", max_attempts=2) == "stable"
    claim = jobs.claim("host:1:w0", 600)
    assert jobs.release_claims("host:1:") == 1 and _study(index, sid).state == "stable"
    claim = jobs.claim("host:1:w0", 600)
    results = [NewResult("sr", "1.2.5.9.1", "1.2.840.10008.5.1.4.1.1.88.11", "1.2.5.9", "1.2.840.10008.1.2.1",
                         "results/sr.dcm", 5, ("ARCHIVE",))]
    assert jobs.finish(claim, 1, results) and _study(index, sid).state == "results_ready"
    assert not jobs.finish(claim, 1, results), "a finished claim cannot finish again"

    [batch] = queue.due()
    queue.mark_sending(batch.ids)
    assert queue.mark_failed(batch.ids, "no association", policy=_Policy) == {batch.ids[0]: "pending"}
    queue.mark_sending(batch.ids)
    assert queue.mark_failed(batch.ids, "no association", policy=_Policy) == {batch.ids[0]: "dead"}
    st = _study(index, sid)
    assert st.state == "failed" and "ARCHIVE" in st.state_reason and queue.has_undelivered(sid)
    later = utcnow() + dt.timedelta(days=30)
    assert jobs.expired_studies(later) == [] and not jobs.delete_study(sid)
    assert jobs.retry_failed_inference() == 0, "a study with results is not re-inferred"
    assert queue.retry_dead() == 1 and _study(index, sid).state == "results_ready"
    [batch] = queue.due()
    queue.mark_sending(batch.ids)
    queue.mark_sent(batch.ids[0])
    assert _study(index, sid).state == "sent" and not queue.has_undelivered(sid)

    # a late image reopens it; a study that cannot be read is skipped; a failed inference is retried
    out = index.record_instance(_meta("1.2.5", "1.2.5.1.2", 2), "b.dcm", 10, "PACS", 0, now=utcnow())
    st = _study(index, sid)
    assert out.event == "reopened" and (st.state, st.updated, st.generation) == ("receiving", True, 2)
    index.mark_stable_if_due(sid)
    claim = jobs.claim("host:1:w0", 600)
    assert jobs.skip(claim, "no processable image") and _study(index, sid).state_reason == "no processable image"
    assert jobs.expired_studies(later) == [(sid, "1.2.5")]

    other = index.record_instance(_meta("1.2.6", "1.2.6.1.1", 1), "c.dcm", 10, "PACS", 0).study_id
    index.mark_stable_if_due(other)
    claim = jobs.claim("host:1:w0", 600)
    assert jobs.fail(claim, "ValueError: bad pixels", max_attempts=3, permanent=True) == "failed"
    assert jobs.retry_failed_inference("1.2.6") == 1 and _study(index, other).state == "stable"

    assert jobs.delete_study(sid) and _study(index, sid) is None
    with index.Session() as s:
        assert s.scalars(select(Study.state)).all() == ["stable"]


def _study_with_results(index: Index, uid: str, destinations=("ARCHIVE",)) -> int:
    """A study whose results (one SR) wait for delivery, through the storage API."""
    t = utcnow()
    out = index.record_instance(_meta(uid, f"{uid}.1.1", 1), f"{uid}.dcm", 10, "PACS", 0, now=t)
    index.mark_stable_if_due(out.study_id, now=t + dt.timedelta(seconds=1))
    jobs = Jobs(index)
    claim = jobs.claim("hostA/11112:1:w0", 600)
    assert jobs.finish(claim, 1, [NewResult("sr", f"{uid}.9.1", "1.2.840.10008.5.1.4.1.1.88.11", f"{uid}.9",
                                            "1.2.840.10008.1.2.1", f"results/{uid}.dcm", 5, destinations)])
    return out.study_id


def test_two_nodes_share_the_send_queue_each_delivery_taken_once(index):
    """Issue 18: two senders on one database (two nodes). A delivery on the wire is its sender's
    until the lease ends; then exactly one other node takes it over; a restarting node settles its
    own at once. Study claims of one node are never given back by another node's restart."""
    other = Index(index.url)  # the second node: its own connections to the same database
    a, b = DeliveryQueue(index), DeliveryQueue(other)
    _study_with_results(index, "1.2.18")
    t = utcnow()
    [batch] = a.due(now=t + dt.timedelta(seconds=1))
    assert a.mark_sending(batch.ids, "hostA/11112:sender", 90, now=t) == batch.ids
    assert b.mark_sending(batch.ids, "hostB/11112:sender", 90, now=t) == [], "taken once"
    # node A is on the wire: node B leaves it alone for the lease
    assert b.claim_in_flight("hostB/11112:sender", 90, now=t + dt.timedelta(seconds=60)) == []
    # node A died: after the lease, exactly one node takes it over (the other finds it taken)
    after = t + dt.timedelta(seconds=91)
    taken_b = b.claim_in_flight("hostB/11112:sender", 90, now=after)
    taken_c = a.claim_in_flight("hostC/11112:sender", 90, now=after)
    assert [i.delivery_id for i in taken_b] == batch.ids and taken_c == []
    # node B's own lease now runs; had node B restarted, it would settle it at once
    assert b.claim_in_flight("hostC/11112:sender", 90, now=after + dt.timedelta(seconds=30)) == []
    assert a.release_in_flight("hostA/11112:sender", now=after) == 0, "not A's any more"
    assert b.release_in_flight("hostB/11112:sender", now=after) == 1
    assert [i.delivery_id for i in b.claim_in_flight("hostB/11112:sender", 90, now=after)] == batch.ids
    b.mark_sent(batch.ids[0])
    assert _study(index, batch.study_id).state == "sent"
    other.close()


def test_a_node_gives_back_only_its_own_study_claims(index):
    jobs = Jobs(index)
    t = utcnow()
    for uid in ("1.2.19", "1.2.20"):
        out = index.record_instance(_meta(uid, f"{uid}.1.1", 1), f"{uid}.dcm", 10, "PACS", 0, now=t)
        index.mark_stable_if_due(out.study_id, now=t + dt.timedelta(seconds=1))
    assert jobs.claim("host/11112:100:0", 600) is not None
    assert jobs.claim("host/11113:200:0", 600) is not None
    # the node on port 11113 restarts on the same host: the other node's claim stays
    assert jobs.release_claims("host/11113:") == 1
    states_now = sorted(_study(index, s.id).state for s in _all_studies(index))
    assert states_now == ["inferring", "stable"]


def _all_studies(index: Index) -> list[Study]:
    with index.Session() as s:
        return list(s.scalars(select(Study)))
