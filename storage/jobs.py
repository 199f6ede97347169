"""The pipeline's job queue: stable studies are claimed atomically, processed, and their results recorded.

A claim is a compare-and-set on the study row (``state='stable'`` → ``inferring``,
with the worker's id and a lease time), correct with several workers on SQLite
and on PostgreSQL. Finishing is a compare-and-set too: results are recorded
only if the study is still ``inferring`` under the same claim and generation,
so images that arrive during inference are never lost: the study goes back to
``receiving`` and is processed again when it is stable. Every state change is
checked by :mod:`storage.states`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import CursorResult, delete, or_, select, update

from storage import states
from storage.deliveries import undelivered
from storage.index import Index
from storage.models import Delivery, DeliveryState, Instance, ResultObject, Series, Study, StudyState, utcnow

log = logging.getLogger("storage.jobs")


@dataclass(frozen=True)
class ClaimedStudy:
    id: int
    StudyInstanceUID: str
    generation: int
    result_version: int  # the newest version made so far (0: none)
    updated: bool  # late images arrived after an earlier stable period
    calling_ae: str
    worker: str
    instances: list[dict] = field(default_factory=list)  # Instance rows as dicts
    previous_sr: dict | None = None  # the ResultObject row of the SR of ``result_version``


@dataclass(frozen=True)
class NewResult:
    """A result object written to the store, and where it must go."""

    kind: str  # "sr" | "heatmap" | "summary" | "gsps"
    SOPInstanceUID: str
    SOPClassUID: str
    SeriesInstanceUID: str
    TransferSyntaxUID: str
    file_path: str
    file_size: int
    destinations: tuple[str, ...]


#: the states in which retention may delete a study (when none of its deliveries is undelivered)
_RETAINABLE = (StudyState.SENT.value, StudyState.SKIPPED.value)


def _row(obj) -> dict:
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


class Jobs:
    """The pipeline's view of the index: claims, outcomes, listings and retention (thread-safe)."""

    def __init__(self, index: Index):
        self.index = index
        self.db = index.db

    # -- claiming ------------------------------------------------------------
    def claim(self, worker: str, lease_seconds: float, now: dt.datetime | None = None) -> ClaimedStudy | None:
        """Take the oldest stable study (or one whose claim lapsed); None when there is none.

        On PostgreSQL the candidate row is locked with ``SELECT ... FOR UPDATE SKIP LOCKED``: workers of
        several nodes each take a different study without waiting for one another. The state change is
        the compare-and-set of :mod:`storage.states` on both databases (SQLite has one writer at a time).
        """
        now = now or utcnow()
        lapsed = now - dt.timedelta(seconds=lease_seconds)
        claimable = or_(Study.state == StudyState.STABLE.value,
                        (Study.state == StudyState.INFERRING.value) & (Study.claimed_at < lapsed))
        for _attempt in range(5):
            with self.db.write() as s:
                pick = select(Study.id).where(claimable).order_by(Study.stable_at, Study.id).limit(1)
                if not self.db.is_sqlite:
                    pick = pick.with_for_update(skip_locked=True)
                study_id = s.scalar(pick)
                if study_id is None:
                    return None
                res = cast(CursorResult, s.execute(states.guarded_update(
                    states.INFERRING, {states.STABLE: None, states.INFERRING: Study.claimed_at < lapsed},
                    Study.id == study_id, now=now, claimed_by=worker, claimed_at=now,
                    inference_attempts=Study.inference_attempts + 1)))
                if res.rowcount != 1:
                    continue  # another worker was faster (SQLite: between the read and the write)
                study = s.get(Study, study_id)
                assert study is not None  # just claimed in this transaction
                instances = [_row(i) for i in s.scalars(select(Instance).where(Instance.study_id == study_id)
                                                         .order_by(Instance.InstanceNumber, Instance.id))]
                prev = None
                if study.result_version:
                    r = s.scalar(select(ResultObject).where(ResultObject.study_id == study_id,
                                                            ResultObject.kind == "sr",
                                                            ResultObject.result_version == study.result_version))
                    prev = _row(r) if r is not None else None
                return ClaimedStudy(study.id, study.StudyInstanceUID, study.generation, study.result_version,
                                    bool(study.updated), study.calling_ae, worker, instances, prev)
        return None

    def heartbeat(self, claim: ClaimedStudy) -> bool:
        """Renew the lease; False when the claim was lost (taken back, or the study changed)."""
        with self.db.write() as s:
            res = cast(CursorResult, s.execute(update(Study).where(Study.id == claim.id,
                                                                   Study.claimed_by == claim.worker,
                                                                   Study.state == StudyState.INFERRING.value)
                                               .values(claimed_at=utcnow())))
            return res.rowcount == 1

    def release_claims(self, worker_prefix: str | None = None) -> int:
        """Give back studies left ``inferring`` (after a crash of this node's workers)."""
        mine = () if worker_prefix is None else (Study.claimed_by.like(f"{worker_prefix}%"),)
        with self.db.write() as s:
            res = cast(CursorResult, s.execute(states.guarded_update(states.STABLE, [states.INFERRING], *mine,
                                                                     now=utcnow(), claimed_by=None, claimed_at=None)))
            return res.rowcount

    @staticmethod
    def _still_mine(claim: ClaimedStudy) -> tuple:
        """The claim is unchanged: same worker, same generation (with ``state = 'inferring'``, the guard)."""
        return (Study.id == claim.id, Study.claimed_by == claim.worker, Study.generation == claim.generation)

    # -- outcomes ------------------------------------------------------------
    def finish(self, claim: ClaimedStudy, result_version: int, results: list[NewResult]) -> bool:
        """Record a new result version and queue its deliveries, superseding older versions.

        Returns False (and records nothing) when the study changed while it was inferring.
        """
        now = utcnow()
        with self.db.write() as s:
            state = states.RESULTS_READY if any(r.destinations for r in results) else states.SENT
            res = cast(CursorResult, s.execute(states.guarded_update(
                state, [states.INFERRING], *self._still_mine(claim), now=now, result_version=result_version,
                updated=False, claimed_by=None, claimed_at=None, last_error=None, inference_attempts=0)))
            if res.rowcount != 1:
                return False
            # older versions: superseded; what was not yet sent of them is not sent any more
            old_ids = s.scalars(select(ResultObject.id).where(ResultObject.study_id == claim.id,
                                                              ResultObject.superseded.is_(False))).all()
            if old_ids:
                s.execute(update(ResultObject).where(ResultObject.id.in_(old_ids)).values(superseded=True))
                s.execute(update(Delivery).where(Delivery.result_id.in_(old_ids),
                                                 Delivery.state.in_([DeliveryState.PENDING.value,
                                                                     DeliveryState.DEAD.value]))
                          .values(state=DeliveryState.CANCELLED.value))
            for r in results:
                existing = s.scalar(select(ResultObject).where(ResultObject.SOPInstanceUID == r.SOPInstanceUID))
                if existing is not None:  # the same object made again (deterministic UID): a replacement
                    s.execute(delete(Delivery).where(Delivery.result_id == existing.id))
                    s.delete(existing)
                    s.flush()
                obj = ResultObject(study_id=claim.id, result_version=result_version, generation=claim.generation,
                                   kind=r.kind, SOPInstanceUID=r.SOPInstanceUID, SOPClassUID=r.SOPClassUID,
                                   SeriesInstanceUID=r.SeriesInstanceUID, TransferSyntaxUID=r.TransferSyntaxUID,
                                   file_path=r.file_path, file_size=r.file_size, created_at=now, superseded=False)
                s.add(obj)
                s.flush()
                for dest in dict.fromkeys(r.destinations):
                    s.add(Delivery(result_id=obj.id, study_id=claim.id, destination=dest,
                                   state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=now, created_at=now))
            return True

    def skip(self, claim: ClaimedStudy, reason: str) -> bool:
        """Nothing to infer on (``reason`` says why): ``inferring`` -> ``skipped``; False when the claim was lost."""
        with self.db.write() as s:
            res = cast(CursorResult, s.execute(states.guarded_update(
                states.SKIPPED, [states.INFERRING], *self._still_mine(claim), now=utcnow(), reason=reason,
                updated=False, claimed_by=None, claimed_at=None, inference_attempts=0)))
            return res.rowcount == 1

    def fail(self, claim: ClaimedStudy, error: str, max_attempts: int, permanent: bool = False) -> str:
        """Inference failed: back to ``stable`` for another try, or ``failed`` after ``max_attempts``
        (at once when ``permanent``: the same input would fail the same way)."""
        with self.db.write() as s:
            study = s.get(Study, claim.id)
            if study is None or study.state != StudyState.INFERRING.value or study.claimed_by != claim.worker:
                return study.state if study else "gone"
            final = permanent or study.inference_attempts >= max_attempts
            states.set_state(study, states.FAILED if final else states.STABLE, now=utcnow(),
                             reason=f"inference failed {study.inference_attempts} time(s): {error}" if final else None,
                             last_error=error, claimed_by=None, claimed_at=None)
            return study.state

    def retry_failed_inference(self, study_uid: str | None = None) -> int:
        """Studies whose inference failed for good go back to ``stable``."""
        now = utcnow()
        which = (Study.StudyInstanceUID == study_uid,) if study_uid else ()
        with self.db.write() as s:
            return cast(CursorResult, s.execute(states.guarded_update(
                states.STABLE, [states.FAILED], Study.last_error.is_not(None), Study.result_version < 1, *which,
                now=now, inference_attempts=0, stable_at=now))).rowcount

    # -- listing and retention ----------------------------------------------------
    def result_objects(self, study_uid: str, include_superseded: bool = False) -> list[dict]:
        with self.db.read() as s:
            q = select(ResultObject).join(Study, Study.id == ResultObject.study_id) \
                .where(Study.StudyInstanceUID == study_uid)
            if not include_superseded:
                q = q.where(ResultObject.superseded.is_(False))
            return [_row(r) for r in s.scalars(q.order_by(ResultObject.id))]

    def jobs(self, limit: int = 1000) -> list[dict]:
        with self.db.read() as s:
            rows = s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)).all()
            return [{"StudyInstanceUID": r.StudyInstanceUID, "state": r.state, "state_reason": r.state_reason,
                     "attempts": r.inference_attempts, "last_error": r.last_error,
                     "result_version": r.result_version, "generation": r.generation, "calling_ae": r.calling_ae,
                     "id": r.id} for r in rows]

    def expired_studies(self, older_than: dt.datetime) -> list[tuple[int, str]]:
        """Studies last touched before ``older_than`` whose results are all delivered (or that need none)."""
        with self.db.read() as s:
            rows = s.execute(select(Study.id, Study.StudyInstanceUID)
                             .where(Study.last_received_at < older_than, Study.state.in_(_RETAINABLE),
                                    Study.id.not_in(undelivered()))).all()
        return [(r[0], r[1]) for r in rows]

    def delete_study(self, study_id: int) -> bool:
        """Delete a study's rows (instances, results, deliveries), re-checking it is still deletable."""
        with self.db.write() as s:
            study = s.get(Study, study_id)
            if study is None or study.state not in _RETAINABLE:
                return False
            if s.scalar(undelivered(study_id).limit(1)) is not None:
                return False
            s.execute(delete(Delivery).where(Delivery.study_id == study_id))
            s.execute(delete(ResultObject).where(ResultObject.study_id == study_id))
            s.execute(delete(Instance).where(Instance.study_id == study_id))
            s.execute(delete(Series).where(Series.study_id == study_id))
            s.delete(study)
            return True
