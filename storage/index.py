"""The SQL index: what is stored, which study it belongs to, and where each study stands.

SQLite (WAL, ``synchronous=FULL``) by default, PostgreSQL by URL
(:mod:`storage.database`). A write that returns has been committed: the
listener answers a C-STORE only after :meth:`Index.record_instance` returned.
Opening an index brings its schema to the newest migration
(:mod:`storage.migrate`). Study states change only through :mod:`storage.states`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import cast

from sqlalchemy import CursorResult, func, select
from sqlalchemy.orm import Session

from storage import migrate, states
from storage.database import Database
from storage.errors import PatientConflict
from storage.models import Instance, Patient, ResultObject, Series, Study, StudyState, iso_utc, utcnow

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


def _clip(value: str, n: int) -> str:
    return value[:n] if value else ""


class Index:
    """Thread-safe access to the index.

    ``create``: bring the database to the newest schema revision first (create it, or upgrade a
    database of an earlier release); the node and the CLI open it so.
    """

    def __init__(self, url: str, *, create: bool = True):
        self.url = url
        self.db = Database(url)
        self.engine = self.db.engine
        self.is_sqlite = self.db.is_sqlite
        self.Session = self.db.Session
        if create:
            migrate.upgrade(self.db)

    def close(self) -> None:
        self.db.close()

    # -- receiving -----------------------------------------------------------
    def record_instance(self, meta: InstanceMeta, file_path: str, file_size: int, calling_ae: str,
                        quiet_seconds: float, now: dt.datetime | None = None) -> RecordOutcome:
        """Insert or replace one instance and move its study's quiet-period deadline, in one transaction."""
        now = now or utcnow()
        return self.db.write_retrying(
            lambda s: self._record(s, meta, file_path, file_size, calling_ae, quiet_seconds, now),
            "recording an instance")

    def patient_conflict(self, meta: InstanceMeta) -> bool:
        """Whether ``meta``'s study is already in the index under another patient than ``meta`` names."""
        with self.db.read() as s:
            row = s.execute(select(Patient.PatientID, Patient.IssuerOfPatientID)
                            .join(Study, Study.patient_id == Patient.id)
                            .where(Study.StudyInstanceUID == meta.StudyInstanceUID)).one_or_none()
        return row is not None and (row[0], row[1]) != (_clip(meta.PatientID, 64), _clip(meta.IssuerOfPatientID, 64))

    def stored_paths(self) -> set[str]:
        """Every file path the index holds (instances and result objects), relative to the store."""
        with self.db.read() as s:
            paths = set(s.scalars(select(Instance.file_path)))
            paths.update(s.scalars(select(ResultObject.file_path)))
        return paths

    def has_instance_file(self, file_path: str) -> bool:
        """Whether an indexed instance is stored at ``file_path``."""
        with self.db.read() as s:
            n = s.scalar(select(func.count()).select_from(Instance).where(Instance.file_path == file_path))
        return (n or 0) > 0

    @staticmethod
    def _record(s: Session, m: InstanceMeta, file_path: str, file_size: int, calling_ae: str, quiet_seconds: float,
                now: dt.datetime) -> RecordOutcome:
        deadline = now + dt.timedelta(seconds=quiet_seconds)
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
                          **states.initial_values(now), stable_deadline=deadline,
                          calling_ae=calling_ae, last_calling_ae=calling_ae, created_at=now,
                          last_received_at=now, updated=False, generation=1)
            s.add(study)
            s.flush()
        else:
            if study.patient_id != patient.id:
                # rolls back this transaction (the patient row made for it included)
                raise PatientConflict(f"study {m.StudyInstanceUID} belongs to another patient than this instance names")
            if study.state == StudyState.RECEIVING.value:
                event_name = "instance"
            else:
                event_name = "reopened"
                states.set_state(study, states.RECEIVING, now=now, updated=True,
                                 generation=(study.generation or 1) + 1)
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
        with self.db.read() as s:
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
        with self.db.write() as s:
            res = cast(CursorResult, s.execute(states.guarded_update(states.STABLE, [states.RECEIVING],
                                                                     Study.id == study_id, Study.stable_deadline <= now,
                                                                     now=now, stable_at=now, stable_deadline=None)))
            if res.rowcount:
                return True, None
            deadline = s.scalar(select(Study.stable_deadline)
                                .where(Study.id == study_id, Study.state == StudyState.RECEIVING.value))
            return False, deadline

    # -- queries -------------------------------------------------------------
    def status(self) -> dict:
        with self.db.read() as s:
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
        with self.db.read() as s:
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
                    "created_at": iso_utc(study.created_at),
                    "last_received": iso_utc(study.last_received_at),
                    "stable_at": iso_utc(study.stable_at),
                })
        return out

    def study_instances(self, study_uid: str) -> list[dict]:
        with self.db.read() as s:
            rows = s.scalars(select(Instance).join(Study).where(Study.StudyInstanceUID == study_uid)
                             .order_by(Instance.id)).all()
            cols = [c.key for c in Instance.__table__.columns]
            return [{c: getattr(r, c) for c in cols} for r in rows]
