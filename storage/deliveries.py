"""The persistent send queue: one row per (result object, destination), no networking.

The pipeline inserts :class:`~storage.models.Delivery` rows in state ``pending``
together with their result objects; the sender (``dicom_node.sender``) takes
them from here in batches of one study to one destination and records each
instance's outcome. States::

    pending --mark_sending--> sending --mark_sent--> sent
       ^                         |
       |<-------mark_failed------+  (attempts + 1, next_attempt_at = now + backoff)
       |                         |
       |                         +--mark_failed(in_doubt=True)--> sending (ask the destination first)
       |<----requeue-------------+  (recovery: the destination does not hold it)
       +--retry_dead-- dead <----+  (attempts >= max_attempts, or an unknown destination)

``sending`` is committed *before* a C-STORE goes out and means "the
destination may hold this instance": after a crash, a timeout or a lost
response the sender asks the destination (C-FIND) before sending again.

The study's state follows its deliveries (only between ``results_ready``,
``sent`` and ``failed``; a study that is receiving or inferring again is left
alone): every non-cancelled delivery of its current result version ``sent``
-> ``sent``; some ``dead`` and none ``pending``/``sending`` -> ``failed``
(``state_reason`` names the destination and the error); otherwise
``results_ready``. The move itself is :mod:`storage.states`'s.

Rejection notes (``kind`` :data:`REJECTION`): where a destination should have the objects of a
superseded result version removed, :meth:`DeliveryQueue.rejections_due` names, per study and
destination, the older objects delivered there once the current version is delivered there too,
and :meth:`DeliveryQueue.queue_rejection` records the note (made by the application) as a result
object of the current version with one pending delivery: the same queue sends it.

A delivery is *undelivered* while ``pending``, ``sending`` or ``dead``
(:func:`undelivered`, the one definition: retention keeps such a study).

Several nodes on one database (PostgreSQL): every move is a compare-and-set on the row's
state, so a delivery is taken by one sender only. ``mark_sending`` records the sender
(``claimed_by``) and a lease (``next_attempt_at`` = the end of the time one C-STORE may
take): until it ends no other node treats the delivery as left in doubt; after it (that
node died mid-C-STORE), :meth:`DeliveryQueue.claim_in_flight` lets exactly one node take
it over, asking the destination first. A restarting node settles its own at once
(:meth:`DeliveryQueue.release_in_flight`).

Every write is one short transaction under the database's write lock
(:meth:`storage.database.Database.write`); the SQL is portable (SQLite and
PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from sqlalchemy import CursorResult, Select, func, select, update

from storage import states
from storage.index import Index
from storage.models import Delivery, DeliveryState, ResultObject, Study, StudyState, iso_utc, utcnow

PENDING = DeliveryState.PENDING.value
SENDING = DeliveryState.SENDING.value
SENT = DeliveryState.SENT.value
DEAD = DeliveryState.DEAD.value
CANCELLED = DeliveryState.CANCELLED.value
DELIVERY_STATES = tuple(s.value for s in DeliveryState)
#: not (yet) delivered: waiting, possibly on the wire, or parked as a dead letter
UNDELIVERED = (PENDING, SENDING, DEAD)

#: ``ResultObject.kind`` of a rejection note: it names older objects that a destination should remove
REJECTION = "rejection"

#: the study states this module moves between; any other state (receiving, stable, inferring, ...) is left alone
_DELIVERY_STUDY_STATES = (StudyState.RESULTS_READY.value, StudyState.SENT.value, StudyState.FAILED.value)
_MAX_ERROR = 2000


@dataclass(frozen=True)
class Item:
    """One delivery: a result object (file under the storage root) to one destination."""

    delivery_id: int
    result_id: int
    study_id: int
    StudyInstanceUID: str
    destination: str
    kind: str  # "sr" | "heatmap" | "summary" | "gsps" | "rejection"
    result_version: int
    SOPClassUID: str
    SOPInstanceUID: str
    SeriesInstanceUID: str
    TransferSyntaxUID: str
    file_path: str  # relative to storage.path
    attempts: int
    state: str
    superseded: bool = False


@dataclass(frozen=True)
class Batch:
    """The due deliveries of one study to one destination, in sending order (the SR last)."""

    study_id: int
    StudyInstanceUID: str
    destination: str
    items: tuple[Item, ...]

    @property
    def ids(self) -> list[int]:
        return [i.delivery_id for i in self.items]

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class RejectionDue:
    """A rejection note to make: ``destination`` holds ``rejected`` (delivered objects of result
    versions older than ``result_version``, not yet rejected there) and every object of
    ``result_version`` routed to it is delivered. ``superseding_sr_uid`` is the SOP Instance UID of
    the SR of ``result_version`` (the note's UIDs derive from it)."""

    study_id: int
    StudyInstanceUID: str
    destination: str
    result_version: int
    generation: int
    superseding_sr_uid: str
    rejected: tuple[Item, ...]


def _sort_key(item: Item) -> tuple:
    # secondary captures first (the SR references them), the SR last; older versions first
    return (item.result_version, item.kind == "sr", item.result_id)


def _clip_error(error: str | None) -> str | None:
    if error is None:
        return None
    error = str(error)
    return error if len(error) <= _MAX_ERROR else error[:_MAX_ERROR - 3] + "..."


def undelivered(study_id: int | None = None) -> Select:
    """``SELECT study_id FROM deliveries`` of the deliveries not (yet) delivered (of study ``study_id``).

    Superseded results count too: one of their deliveries may still be on the wire (``sending``)
    until the sender's recovery settles it.
    """
    q = select(Delivery.study_id).where(Delivery.state.in_(UNDELIVERED))
    return q if study_id is None else q.where(Delivery.study_id == study_id)


_ITEM_COLUMNS = (Delivery.id, ResultObject.id, Delivery.study_id, Study.StudyInstanceUID, Delivery.destination,
                 ResultObject.kind, ResultObject.result_version, ResultObject.SOPClassUID,
                 ResultObject.SOPInstanceUID, ResultObject.SeriesInstanceUID, ResultObject.TransferSyntaxUID,
                 ResultObject.file_path, Delivery.attempts, Delivery.state, ResultObject.superseded)


def _item(row) -> Item:
    return Item(delivery_id=row[0], result_id=row[1], study_id=row[2], StudyInstanceUID=row[3],
                destination=row[4], kind=row[5], result_version=row[6], SOPClassUID=row[7], SOPInstanceUID=row[8],
                SeriesInstanceUID=row[9], TransferSyntaxUID=row[10], file_path=row[11], attempts=row[12] or 0,
                state=row[13], superseded=bool(row[14]))


def _items_query():
    return (select(*_ITEM_COLUMNS)
            .join(ResultObject, ResultObject.id == Delivery.result_id)
            .join(Study, Study.id == Delivery.study_id))


class DeliveryQueue:
    """The send queue over an :class:`~storage.index.Index` (thread-safe)."""

    def __init__(self, index: Index):
        self.index = index
        self.db = index.db

    # -- what to send ----------------------------------------------------------
    def due(self, now: dt.datetime | None = None, limit: int = 1000) -> list[Batch]:
        """Pending deliveries whose time has come (results not superseded), as batches per (study, destination).

        Batches come oldest first; within a batch the secondary captures come before the SR.
        """
        now = now or utcnow()
        q = (_items_query()
             .where(Delivery.state == PENDING, Delivery.next_attempt_at <= now, ResultObject.superseded.is_(False))
             .order_by(Delivery.next_attempt_at, Delivery.id)
             .limit(limit))
        with self.db.read() as s:
            rows = s.execute(q).all()
        return self._batches(_item(r) for r in rows)

    @staticmethod
    def _batches(items: Iterable[Item]) -> list[Batch]:
        groups: dict[tuple[int, str], list[Item]] = {}
        for it in items:
            groups.setdefault((it.study_id, it.destination), []).append(it)
        return [Batch(study_id=k[0], StudyInstanceUID=v[0].StudyInstanceUID, destination=k[1],
                      items=tuple(sorted(v, key=_sort_key))) for k, v in groups.items()]

    def in_flight(self, now: dt.datetime | None = None) -> list[Item]:
        """Deliveries in state ``sending``: a crash or a lost response left them with an unknown outcome,
        or a sender has one on the wire.

        With ``now``, only those whose next attempt is due (an unreachable destination is asked again
        after the backoff delay; a delivery on the wire is due when its sender's lease has ended).
        """
        q = _items_query().where(Delivery.state == SENDING)
        if now is not None:
            q = q.where(Delivery.next_attempt_at <= now)
        with self.db.read() as s:
            rows = s.execute(q.order_by(Delivery.study_id, Delivery.destination, Delivery.id)).all()
        return sorted((_item(r) for r in rows), key=lambda i: (i.study_id, i.destination, _sort_key(i)))

    def claim_in_flight(self, owner: str, lease_seconds: float, now: dt.datetime | None = None) -> list[Item]:
        """The due ``sending`` deliveries (:meth:`in_flight` with ``now``) that this sender takes to settle:
        each is taken with a compare-and-set that extends its lease, so that of several nodes on one
        database exactly one asks the destination about it; the others skip it."""
        now = now or utcnow()
        until = now + dt.timedelta(seconds=lease_seconds)
        taken = []
        for it in self.in_flight(now=now):
            with self.db.write() as s:
                res = cast(CursorResult, s.execute(
                    update(Delivery).where(Delivery.id == it.delivery_id, Delivery.state == SENDING,
                                           Delivery.next_attempt_at <= now)
                    .values(claimed_by=owner, next_attempt_at=until)))
            if res.rowcount:
                taken.append(it)
        return taken

    def release_in_flight(self, owner: str, now: dt.datetime | None = None) -> int:
        """At a sender's start: its own ``sending`` deliveries (left by its previous run, which is over)
        are due now, to be settled at once instead of when their lease ends. Returns how many."""
        now = now or utcnow()
        with self.db.write() as s:
            res = cast(CursorResult, s.execute(
                update(Delivery).where(Delivery.state == SENDING, Delivery.claimed_by == owner,
                                       Delivery.next_attempt_at > now)
                .values(next_attempt_at=now)))
            return res.rowcount

    # -- recording outcomes ----------------------------------------------------
    def mark_sending(self, ids: Iterable[int], owner: str | None = None, lease_seconds: float = 0.0,
                     now: dt.datetime | None = None) -> list[int]:
        """pending -> sending, committed before the C-STORE goes out. Returns the ids that moved
        (a delivery cancelled or taken meanwhile, by this sender or another node's, is not sent).

        ``owner`` and ``lease_seconds``: the sender taking it, and how long it is that sender's (longer
        than one C-STORE may take): until then no other node settles it as left in doubt."""
        ids = list(ids)
        now = now or utcnow()
        values: dict = {"state": SENDING}
        if owner is not None:
            values["claimed_by"] = owner
        if lease_seconds > 0:
            values["next_attempt_at"] = now + dt.timedelta(seconds=lease_seconds)
        moved = []
        with self.db.write() as s:
            for i in ids:
                res = cast(CursorResult, s.execute(update(Delivery).where(Delivery.id == i, Delivery.state == PENDING)
                                                   .values(**values)))
                if res.rowcount:
                    moved.append(i)
        return moved

    def mark_sent(self, delivery_id: int, status: int | None = 0x0000, note: str | None = None,
                  now: dt.datetime | None = None) -> None:
        """The destination answered success or warning ``status`` (or, ``status`` None, holds the instance).

        ``note`` keeps a warning's text (or how it was confirmed) in ``last_error``.
        """
        now = now or utcnow()
        with self.db.write() as s:
            study_id = s.scalar(select(Delivery.study_id).where(Delivery.id == delivery_id))
            if study_id is None:
                return  # deleted meanwhile (retention)
            s.execute(update(Delivery).where(Delivery.id == delivery_id)
                      .values(state=SENT, last_status=status, sent_at=now, last_error=_clip_error(note)))
            self._refresh_studies(s, [study_id], now)

    def mark_failed(self, ids: Iterable[int], error: str, status: int | None = None,
                    policy=None, *, in_doubt: bool = False, permanent: bool = False,
                    now: dt.datetime | None = None) -> dict[int, str]:
        """An attempt failed: attempts + 1, then ``pending`` again after ``policy.delay(attempts)``, or
        ``dead`` once ``attempts >= policy.max_attempts`` (``policy``: a ``SendingSection``).

        ``in_doubt``: the request may have reached the destination (no response, association lost
        during the C-STORE): the delivery stays ``sending`` so that the next attempt first asks the
        destination whether it holds the instance. ``permanent``: no retry (``dead`` at once, e.g. the
        destination is not a configured peer). Deliveries of superseded results are cancelled instead
        of retried. Only ``pending``/``sending`` deliveries change. Returns {delivery id: new state}.
        """
        if policy is None and not permanent:
            raise ValueError("mark_failed needs the retry policy (SendingSection) unless permanent")
        now = now or utcnow()
        clipped = _clip_error(error)
        out: dict[int, str] = {}
        with self.db.write() as s:
            rows = s.execute(select(Delivery.id, Delivery.attempts, Delivery.study_id, ResultObject.superseded)
                             .join(ResultObject, ResultObject.id == Delivery.result_id)
                             .where(Delivery.id.in_(list(ids)), Delivery.state.in_((PENDING, SENDING)))).all()
            for did, attempts, _study, superseded in rows:
                attempts = (attempts or 0) + 1
                values: dict = dict(attempts=attempts, last_error=clipped, last_status=status)
                if superseded:
                    values["state"] = CANCELLED
                elif permanent or attempts >= policy.max_attempts:
                    values["state"] = DEAD
                else:
                    values["state"] = SENDING if in_doubt else PENDING
                    values["next_attempt_at"] = now + dt.timedelta(seconds=policy.delay(attempts))
                s.execute(update(Delivery).where(Delivery.id == did, Delivery.state.in_((PENDING, SENDING)))
                          .values(**values))
                out[did] = values["state"]
            self._refresh_studies(s, {r[2] for r in rows}, now)
        return out

    def requeue(self, ids: Iterable[int], note: str | None = None, now: dt.datetime | None = None) -> int:
        """sending -> pending, due now, attempts unchanged (recovery: the destination does not hold the
        instance, or cannot be asked). Deliveries of superseded results are cancelled. Returns how many."""
        now = now or utcnow()
        n = 0
        with self.db.write() as s:
            rows = s.execute(select(Delivery.id, Delivery.study_id, ResultObject.superseded)
                             .join(ResultObject, ResultObject.id == Delivery.result_id)
                             .where(Delivery.id.in_(list(ids)), Delivery.state == SENDING)).all()
            for did, _study, superseded in rows:
                values: dict = dict(state=CANCELLED if superseded else PENDING, next_attempt_at=now)
                if note:
                    values["last_error"] = _clip_error(note)
                n += cast(CursorResult, s.execute(update(Delivery).where(Delivery.id == did, Delivery.state == SENDING)
                                                  .values(**values))).rowcount
            self._refresh_studies(s, {r[1] for r in rows}, now)
        return n

    def retry_dead(self, study_uid: str | None = None, now: dt.datetime | None = None) -> int:
        """Dead letters (of results not superseded) back to ``pending``, due now, attempts reset;
        only those of study ``study_uid`` when given. A ``failed`` study returns to ``results_ready``.
        Returns how many deliveries were re-queued."""
        now = now or utcnow()
        q = (select(Delivery.id, Delivery.study_id)
             .join(ResultObject, ResultObject.id == Delivery.result_id)
             .where(Delivery.state == DEAD, ResultObject.superseded.is_(False)))
        if study_uid is not None:
            q = q.join(Study, Study.id == Delivery.study_id).where(Study.StudyInstanceUID == study_uid)
        n = 0
        with self.db.write() as s:
            rows = s.execute(q).all()
            for did, _study in rows:
                n += cast(CursorResult, s.execute(update(Delivery).where(Delivery.id == did, Delivery.state == DEAD)
                                                  .values(state=PENDING, attempts=0, next_attempt_at=now))).rowcount
            self._refresh_studies(s, {r[1] for r in rows}, now)
        return n

    # -- rejection notes --------------------------------------------------------
    def rejections_due(self, study_ids: Iterable[int] | None = None) -> list[RejectionDue]:
        """The rejection notes to make now (of studies ``study_ids``, or all).

        One per study and destination where: objects of superseded versions were delivered
        (``sent``) there and no rejection note delivered there covers them (a note of version M
        rejects the objects of the versions before M); every non-cancelled object of the study's
        current version routed there is ``sent`` (the new version first: a note never goes out
        before it, and none goes where the new version does not); no delivery of a superseded
        object is still ``sending`` there (its outcome is settled first); and no note of the
        current version was made for it yet. Undelivered objects of older versions were cancelled
        when they were superseded: they are never in a note.
        """
        which = () if study_ids is None else (Delivery.study_id.in_(list(study_ids)),)
        out: list[RejectionDue] = []
        with self.db.read() as s:
            pairs = s.execute(select(Delivery.study_id, Delivery.destination).distinct()
                              .join(ResultObject, ResultObject.id == Delivery.result_id)
                              .where(Delivery.state == SENT, ResultObject.superseded.is_(True),
                                     ResultObject.kind != REJECTION, *which)
                              .order_by(Delivery.study_id, Delivery.destination)).all()
            for sid, dest in pairs:
                study = s.execute(select(Study.StudyInstanceUID, Study.result_version, Study.generation)
                                  .where(Study.id == sid)).one_or_none()
                if study is None or not study[1]:
                    continue
                uid, version, generation = study
                rows = s.execute(select(Delivery.state, ResultObject.kind, ResultObject.superseded,
                                        ResultObject.result_version)
                                 .join(ResultObject, ResultObject.id == Delivery.result_id)
                                 .where(Delivery.study_id == sid, Delivery.destination == dest)).all()
                current = [st for st, kind, sup, rv in rows
                           if rv == version and not sup and kind != REJECTION and st != CANCELLED]
                if not current or any(st != SENT for st in current):
                    continue  # the new version is not (yet) delivered there, or does not go there
                if any(sup and st == SENDING for st, _kind, sup, _rv in rows):
                    continue  # an older object may still be on its way: settled first
                if any(kind == REJECTION and rv == version for _st, kind, _sup, rv in rows):
                    continue  # made already
                covered = max((rv for st, kind, _sup, rv in rows if kind == REJECTION and st == SENT), default=0)
                sr_uid = s.scalar(select(ResultObject.SOPInstanceUID)
                                  .where(ResultObject.study_id == sid, ResultObject.result_version == version,
                                         ResultObject.kind == "sr"))
                if sr_uid is None:
                    continue
                items = s.execute(_items_query().where(
                    Delivery.study_id == sid, Delivery.destination == dest, Delivery.state == SENT,
                    ResultObject.superseded.is_(True), ResultObject.kind != REJECTION,
                    ResultObject.result_version >= covered, ResultObject.result_version < version)
                    .order_by(ResultObject.result_version, ResultObject.id)).all()
                if items:
                    out.append(RejectionDue(sid, uid, dest, version, generation, sr_uid,
                                            tuple(_item(r) for r in items)))
        return out

    def queue_rejection(self, due: RejectionDue, *, SOPInstanceUID: str, SOPClassUID: str,
                        SeriesInstanceUID: str, TransferSyntaxUID: str, file_path: str, file_size: int,
                        now: dt.datetime | None = None) -> bool:
        """Record a rejection note (its file already in the store) as a result object of
        ``due.result_version`` with one pending delivery to ``due.destination``, due now.

        Records nothing and returns False when the study has another result version by now, or
        the note is recorded already (its SOP Instance UID is known).
        """
        now = now or utcnow()
        with self.db.write() as s:
            version = s.scalar(select(Study.result_version).where(Study.id == due.study_id))
            if version != due.result_version:
                return False
            if s.scalar(select(ResultObject.id).where(ResultObject.SOPInstanceUID == SOPInstanceUID)) is not None:
                return False
            obj = ResultObject(study_id=due.study_id, result_version=due.result_version, generation=due.generation,
                               kind=REJECTION, SOPInstanceUID=SOPInstanceUID, SOPClassUID=SOPClassUID,
                               SeriesInstanceUID=SeriesInstanceUID, TransferSyntaxUID=TransferSyntaxUID,
                               file_path=file_path, file_size=file_size, created_at=now, superseded=False)
            s.add(obj)
            s.flush()
            s.add(Delivery(result_id=obj.id, study_id=due.study_id, destination=due.destination, state=PENDING,
                           attempts=0, next_attempt_at=now, created_at=now))
            s.flush()
            self._refresh_studies(s, [due.study_id], now)
        return True

    # -- study state -----------------------------------------------------------
    @staticmethod
    def _refresh_studies(s, study_ids: Iterable[int], now: dt.datetime) -> None:
        for sid in sorted(set(study_ids)):  # in id order: two transactions lock studies in the same order
            # the study row locked first (PostgreSQL; SQLite has one writer): two senders that each mark
            # the last deliveries of one study sent must not both read the other's as still in flight
            # (each its own snapshot) and both leave the study results_ready; the second waits for the
            # first's commit and reads it
            row = s.execute(select(Study.state, Study.result_version).where(Study.id == sid)
                            .with_for_update()).one_or_none()
            if row is None or row[0] not in _DELIVERY_STUDY_STATES:
                continue
            state, version = row
            rows = s.execute(select(Delivery.state, Delivery.destination, Delivery.attempts, Delivery.last_error)
                             .join(ResultObject, ResultObject.id == Delivery.result_id)
                             .where(Delivery.study_id == sid, ResultObject.result_version == version,
                                    Delivery.state != CANCELLED)
                             .order_by(Delivery.id)).all()
            if not rows:
                continue
            present = {r[0] for r in rows}
            reason = None
            if PENDING in present or SENDING in present:
                target = StudyState.RESULTS_READY.value
            elif DEAD in present:
                target = StudyState.FAILED.value
                dead: dict[str, list] = {}
                for st, dest, attempts, err in rows:
                    if st == DEAD:
                        dead.setdefault(dest, []).append((attempts, err))
                parts = []
                for dest, lst in dead.items():
                    attempts, err = lst[-1]
                    parts.append(f"delivery of {len(lst)} object(s) to {dest} failed after {attempts} attempt(s): "
                                 f"{err or 'unknown error'}")
                reason = _clip_error("; ".join(parts))
            else:
                target = StudyState.SENT.value
            if target == state and (target != StudyState.FAILED.value or reason is None):
                continue
            s.execute(states.guarded_update(target, [state], Study.id == sid, Study.result_version == version,
                                            now=now, reason=reason))

    # -- reporting -------------------------------------------------------------
    def study_deliveries(self, study_id: int, result_version: int | None = None) -> list[dict]:
        """Per destination, the deliveries of the study's current result version (or ``result_version``)."""
        return self.summaries([study_id], result_version=result_version).get(study_id, [])

    def summaries(self, study_ids: Iterable[int], result_version: int | None = None) -> dict[int, list[dict]]:
        """:meth:`study_deliveries` for many studies in one query: {study id: [per destination]}."""
        study_ids = list(study_ids)
        if not study_ids:
            return {}
        version = Study.result_version if result_version is None else result_version
        q = (select(Delivery.study_id, Delivery.destination, Delivery.state, Delivery.attempts, Delivery.last_error,
                    Delivery.last_status, Delivery.next_attempt_at, Delivery.sent_at, ResultObject.result_version)
             .join(ResultObject, ResultObject.id == Delivery.result_id)
             .join(Study, Study.id == Delivery.study_id)
             .where(Delivery.study_id.in_(study_ids), ResultObject.result_version == version)
             .order_by(Delivery.study_id, Delivery.destination, Delivery.id))
        with self.db.read() as s:
            rows = s.execute(q).all()
        acc: dict[tuple[int, str], dict] = {}
        for sid, dest, state, attempts, err, status, next_at, sent_at, rv in rows:
            d = acc.get((sid, dest))
            if d is None:
                d = acc[(sid, dest)] = {"destination": dest, "result_version": rv, "objects": 0,
                                        "states": {st: 0 for st in DELIVERY_STATES}, "attempts": 0,
                                        "last_error": None, "last_status": None, "next_attempt_at": None,
                                        "last_sent_at": None, "_sent": None, "_next": None}
            d["objects"] += 1
            d["states"][state] = d["states"].get(state, 0) + 1
            d["attempts"] = max(d["attempts"], attempts or 0)
            if err and state != SENT:
                d["last_error"] = err
            if status is not None:
                d["last_status"] = status
            if state in (PENDING, SENDING) and next_at is not None and (d["_next"] is None or next_at < d["_next"]):
                d["_next"] = next_at
            if sent_at is not None and (d["_sent"] is None or sent_at > d["_sent"]):
                d["_sent"] = sent_at
        out: dict[int, list[dict]] = defaultdict(list)
        for (sid, _dest), d in acc.items():
            d["next_attempt_at"] = iso_utc(d.pop("_next"))
            d["last_sent_at"] = iso_utc(d.pop("_sent"))
            if d["last_status"] is not None:
                d["last_status"] = f"0x{d['last_status']:04X}"
            out[sid].append(d)
        return dict(out)

    def summaries_for_uids(self, study_uids: Iterable[str]) -> dict[str, list[dict]]:
        """:meth:`summaries` keyed by StudyInstanceUID (for listings that carry UIDs, not row ids)."""
        study_uids = list(study_uids)
        if not study_uids:
            return {}
        with self.db.read() as s:
            ids = dict(s.execute(select(Study.id, Study.StudyInstanceUID)
                                 .where(Study.StudyInstanceUID.in_(study_uids))).all())
        return {ids[sid]: v for sid, v in self.summaries(list(ids)).items()}

    def has_undelivered(self, study_id: int) -> bool:
        """True while a delivery of the study is undelivered (:func:`undelivered`: retention keeps it)."""
        with self.db.read() as s:
            return s.scalar(undelivered(study_id).limit(1)) is not None

    def outcome(self, ids: Iterable[int]) -> tuple[dict[int, tuple[str, int, str | None]], str | None,
                                                   dt.datetime | None]:
        """After a batch: {delivery id: (state, attempts, last error)}, and the state of their study
        and when it turned stable (the ids are one study's)."""
        ids = list(ids)
        if not ids:
            return {}, None, None
        with self.db.read() as s:
            rows = s.execute(select(Delivery.id, Delivery.state, Delivery.attempts, Delivery.last_error,
                                    Study.state, Study.stable_at)
                             .join(Study, Study.id == Delivery.study_id).where(Delivery.id.in_(ids))).all()
        out = {r[0]: (r[1], r[2] or 0, r[3]) for r in rows}
        return out, (rows[0][4] if rows else None), (rows[0][5] if rows else None)

    def counts(self) -> dict[str, int]:
        """Deliveries per state (all studies)."""
        with self.db.read() as s:
            rows = s.execute(select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)).all()
        out = {st: 0 for st in DELIVERY_STATES}
        out.update({st: int(n) for st, n in rows})
        return out
