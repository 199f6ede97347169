"""The SQL index: what is stored, which study it belongs to, and where each study stands.

SQLite (WAL, ``synchronous=FULL``) by default, PostgreSQL by URL. A write that
returns has been committed: the listener answers a C-STORE only after
:meth:`Index.record_instance` returned.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from sqlalchemy import create_engine, event, func, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from storage.errors import StorageError
from storage.models import Base, Instance, Patient, Series, Study, StudyState, utcnow

log = logging.getLogger("storage.index")


@dataclass(frozen=True)
class InstanceMeta:
    """The attributes of a received instance that the index keeps (DICOM keywords)."""

    SOPInstanceUID: str
    SOPClassUID: str
    StudyInstanceUID: str
    SeriesInstanceUID: str
    TransferSyntaxUID: str
    PatientID: str = ""
    IssuerOfPatientID: str = ""
    PatientName: str = ""
    PatientBirthDate: str = ""
    PatientSex: str = ""
    StudyDate: str = ""
    StudyTime: str = ""
    AccessionNumber: str = ""
    StudyDescription: str = ""
    SeriesNumber: str = ""
    SeriesDescription: str = ""
    Modality: str = ""
    BodyPartExamined: str = ""
    ViewPosition: str = ""
    Laterality: str = ""
    InstanceNumber: str = ""
    PhotometricInterpretation: str = ""
    Rows: int | None = None
    Columns: int | None = None


@dataclass(frozen=True)
class RecordOutcome:
    study_id: int
    StudyInstanceUID: str
    event: str  # "new_study" | "instance" | "reopened"
    deadline: dt.datetime
    resent: bool
    obsolete_file: str | None  # an earlier file of the same instance under another name, to delete


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only a crash
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


def _clip(value: str, n: int) -> str:
    return value[:n] if value else ""


class Index:
    """Thread-safe access to the index."""

    def __init__(self, url: str, *, create: bool = True):
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        if create:
            Base.metadata.create_all(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        # One writer at a time in this process: SQLite serialises writers anyway, and this
        # keeps the get-or-create of patients/studies/series free of races between associations.
        self._write_lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    # -- receiving -----------------------------------------------------------
    def record_instance(self, meta: InstanceMeta, file_path: str, file_size: int, calling_ae: str,
                        quiet_seconds: float, now: dt.datetime | None = None) -> RecordOutcome:
        """Insert or replace one instance and move its study's quiet-period deadline, in one transaction."""
        for attempt in range(3):
            try:
                with self._write_lock:
                    return self._record(meta, file_path, file_size, calling_ae, quiet_seconds, now or utcnow())
            except IntegrityError:
                # another process (PostgreSQL, several listeners) created the same row first: try again
                if attempt == 2:
                    raise StorageError("index conflict while recording an instance") from None
            except OperationalError as exc:
                raise StorageError(f"index unavailable: {exc.orig}") from None
            except SQLAlchemyError as exc:
                raise StorageError(f"index error: {exc}") from None
        raise AssertionError("unreachable")

    def _record(self, m: InstanceMeta, file_path: str, file_size: int, calling_ae: str, quiet_seconds: float,
                now: dt.datetime) -> RecordOutcome:
        deadline = now + dt.timedelta(seconds=quiet_seconds)
        with self.Session.begin() as s:
            patient = s.scalar(select(Patient).where(Patient.PatientID == _clip(m.PatientID, 64),
                                                     Patient.IssuerOfPatientID == _clip(m.IssuerOfPatientID, 64)))
            if patient is None:
                patient = Patient(PatientID=_clip(m.PatientID, 64), IssuerOfPatientID=_clip(m.IssuerOfPatientID, 64),
                                  PatientName=_clip(m.PatientName, 324), PatientBirthDate=_clip(m.PatientBirthDate, 8),
                                  PatientSex=_clip(m.PatientSex, 16))
                s.add(patient)
                s.flush()

            study = s.scalar(select(Study).where(Study.StudyInstanceUID == m.StudyInstanceUID))
            if study is None:
                event_name = "new_study"
                study = Study(StudyInstanceUID=m.StudyInstanceUID, patient_id=patient.id,
                              StudyDate=_clip(m.StudyDate, 8), StudyTime=_clip(m.StudyTime, 16),
                              AccessionNumber=_clip(m.AccessionNumber, 16),
                              StudyDescription=_clip(m.StudyDescription, 64),
                              state=StudyState.RECEIVING.value, state_changed_at=now, stable_deadline=deadline,
                              calling_ae=calling_ae, last_calling_ae=calling_ae, created_at=now,
                              last_received_at=now, updated=False, generation=1)
                s.add(study)
                s.flush()
            else:
                if study.state == StudyState.RECEIVING.value:
                    event_name = "instance"
                else:
                    event_name = "reopened"
                    study.state = StudyState.RECEIVING.value
                    study.state_reason = None
                    study.state_changed_at = now
                    study.updated = True
                    study.generation = (study.generation or 1) + 1
                study.stable_deadline = deadline
                study.last_received_at = now
                study.last_calling_ae = calling_ae

            series = s.scalar(select(Series).where(Series.SeriesInstanceUID == m.SeriesInstanceUID))
            if series is None:
                series = Series(SeriesInstanceUID=m.SeriesInstanceUID, study_id=study.id,
                                Modality=_clip(m.Modality, 16), SeriesNumber=_clip(m.SeriesNumber, 12),
                                SeriesDescription=_clip(m.SeriesDescription, 64),
                                BodyPartExamined=_clip(m.BodyPartExamined, 64))
                s.add(series)
                s.flush()

            values = dict(SOPClassUID=m.SOPClassUID, study_id=study.id, series_id=series.id,
                          TransferSyntaxUID=m.TransferSyntaxUID, Modality=_clip(m.Modality, 16),
                          BodyPartExamined=_clip(m.BodyPartExamined, 64), ViewPosition=_clip(m.ViewPosition, 16),
                          Laterality=_clip(m.Laterality, 16), InstanceNumber=_clip(m.InstanceNumber, 12),
                          PhotometricInterpretation=_clip(m.PhotometricInterpretation, 16), Rows=m.Rows,
                          Columns=m.Columns, file_path=file_path, file_size=file_size, received_at=now,
                          calling_ae=calling_ae)
            inst = s.scalar(select(Instance).where(Instance.SOPInstanceUID == m.SOPInstanceUID))
            obsolete = None
            if inst is None:
                s.add(Instance(SOPInstanceUID=m.SOPInstanceUID, receive_count=1, **values))
                resent = False
            else:
                resent = True
                if inst.file_path != file_path:
                    obsolete = inst.file_path
                for k, v in values.items():
                    setattr(inst, k, v)
                inst.receive_count = (inst.receive_count or 1) + 1
            return RecordOutcome(study.id, study.StudyInstanceUID, event_name, deadline, resent, obsolete)

    # -- study tracking ------------------------------------------------------
    def receiving_deadlines(self) -> list[tuple[int, str, dt.datetime]]:
        """(study id, StudyInstanceUID, deadline) of every study still receiving."""
        with self.Session() as s:
            rows = s.execute(select(Study.id, Study.StudyInstanceUID, Study.stable_deadline)
                             .where(Study.state == StudyState.RECEIVING.value)).all()
        return [(r[0], r[1], r[2] or utcnow()) for r in rows]

    def mark_stable_if_due(self, study_id: int, now: dt.datetime | None = None) -> tuple[bool, dt.datetime | None]:
        """Make the study stable if its deadline has passed.

        Returns ``(True, None)`` when it turned stable, ``(False, deadline)`` when
        it is still receiving with a later deadline, ``(False, None)`` when it
        is not receiving (any more).
        """
        now = now or utcnow()
        with self._write_lock, self.Session.begin() as s:
            res = s.execute(update(Study)
                            .where(Study.id == study_id, Study.state == StudyState.RECEIVING.value,
                                   Study.stable_deadline <= now)
                            .values(state=StudyState.STABLE.value, stable_at=now, state_changed_at=now,
                                    stable_deadline=None))
            if res.rowcount:
                return True, None
            deadline = s.scalar(select(Study.stable_deadline)
                                .where(Study.id == study_id, Study.state == StudyState.RECEIVING.value))
            return False, deadline

    # -- queries -------------------------------------------------------------
    def status(self) -> dict:
        with self.Session() as s:
            n_inst = s.scalar(select(func.count(Instance.id))) or 0
            rows = s.execute(select(Study.state, func.count(Study.id)).group_by(Study.state)).all()
        by_state = {state.value: 0 for state in StudyState}
        for state, n in rows:
            by_state[state] = n
        return {"instances": n_inst, "studies": sum(by_state.values()), "studies_by_state": by_state}

    def list_studies(self, limit: int = 1000, state: str | None = None) -> list[dict]:
        counts = (select(Instance.study_id, func.count(Instance.id).label("n"))
                  .group_by(Instance.study_id).subquery())
        q = (select(Study, func.coalesce(counts.c.n, 0))
             .outerjoin(counts, counts.c.study_id == Study.id)
             .order_by(Study.last_received_at.desc()).limit(limit))
        if state:
            q = q.where(Study.state == state)
        with self.Session() as s:
            out = []
            for study, n in s.execute(q).all():
                out.append({
                    "StudyInstanceUID": study.StudyInstanceUID,
                    "state": study.state,
                    "state_reason": study.state_reason,
                    "instances": int(n),
                    "calling_ae": study.calling_ae,
                    "updated": bool(study.updated),
                    "generation": study.generation,
                    "created_at": _iso(study.created_at),
                    "last_received": _iso(study.last_received_at),
                    "stable_at": _iso(study.stable_at),
                })
        return out

    def study_instances(self, study_uid: str) -> list[dict]:
        with self.Session() as s:
            rows = s.scalars(select(Instance).join(Study).where(Study.StudyInstanceUID == study_uid)
                             .order_by(Instance.id)).all()
            cols = [c.key for c in Instance.__table__.columns]
            return [{c: getattr(r, c) for c in cols} for r in rows]

    def instance(self, sop_uid: str) -> dict | None:
        with self.Session() as s:
            r = s.scalar(select(Instance).where(Instance.SOPInstanceUID == sop_uid))
            if r is None:
                return None
            return {c.key: getattr(r, c.key) for c in Instance.__table__.columns}


def _iso(value: dt.datetime | None) -> str | None:
    return value.replace(tzinfo=dt.timezone.utc).isoformat(timespec="seconds") if value else None


INSTANCE_META_FIELDS = tuple(f.name for f in fields(InstanceMeta))
