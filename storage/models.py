"""SQLAlchemy 2 models of the index: patients, studies, series, instances.

Portable across SQLite and PostgreSQL: no engine-specific types. Times are
naive UTC ``DateTime`` values. Column names that hold a DICOM attribute use
the attribute's keyword.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class StudyState(str, enum.Enum):
    """Where a study is in its life; :mod:`storage.states` owns the transitions between them."""

    RECEIVING = "receiving"
    STABLE = "stable"
    INFERRING = "inferring"
    RESULTS_READY = "results_ready"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"


def utcnow() -> dt.datetime:
    """Now, as the index stores times: naive UTC."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def iso_utc(value: dt.datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with its offset, to the second; None stays None."""
    return value.replace(tzinfo=dt.UTC).isoformat(timespec="seconds") if value else None


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("PatientID", "IssuerOfPatientID", name="uq_patient_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    PatientID: Mapped[str] = mapped_column(String(64), default="")
    IssuerOfPatientID: Mapped[str] = mapped_column(String(64), default="")
    PatientName: Mapped[str] = mapped_column(String(324), default="")
    PatientBirthDate: Mapped[str] = mapped_column(String(8), default="")
    PatientSex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    StudyInstanceUID: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    StudyDate: Mapped[str] = mapped_column(String(8), default="")
    StudyTime: Mapped[str] = mapped_column(String(16), default="")
    AccessionNumber: Mapped[str] = mapped_column(String(16), default="")
    StudyDescription: Mapped[str] = mapped_column(String(64), default="")

    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING.value, index=True)
    state_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    state_changed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: when the quiet period ends if no further instance arrives
    stable_deadline: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    stable_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    #: True when instances arrived after the study had been declared stable (the pipeline re-runs it)
    updated: Mapped[bool] = mapped_column(Boolean, default=False)
    #: incremented each time late instances reopen the study
    generation: Mapped[int] = mapped_column(Integer, default=1)

    #: the pipeline: who holds the study while inferring, and how it went
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    inference_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: the newest result version made for this study (0: none yet)
    result_version: Mapped[int] = mapped_column(Integer, default=0)

    calling_ae: Mapped[str] = mapped_column(String(16), default="")  # who sent the first instance
    last_calling_ae: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    instances: Mapped[list[Instance]] = relationship(back_populates="study", cascade="all, delete-orphan",
                                                       overlaps="series,instances")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    SeriesInstanceUID: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    Modality: Mapped[str] = mapped_column(String(16), default="")
    SeriesNumber: Mapped[str] = mapped_column(String(12), default="")
    SeriesDescription: Mapped[str] = mapped_column(String(64), default="")
    BodyPartExamined: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", overlaps="instances,study")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_study_received", "study_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    SOPInstanceUID: Mapped[str] = mapped_column(String(64), unique=True)
    SOPClassUID: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    TransferSyntaxUID: Mapped[str] = mapped_column(String(64))
    Modality: Mapped[str] = mapped_column(String(16), default="")
    BodyPartExamined: Mapped[str] = mapped_column(String(64), default="")
    ViewPosition: Mapped[str] = mapped_column(String(16), default="")
    Laterality: Mapped[str] = mapped_column(String(16), default="")  # ImageLaterality, else Laterality
    InstanceNumber: Mapped[str] = mapped_column(String(12), default="")
    PhotometricInterpretation: Mapped[str] = mapped_column(String(16), default="")
    Rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    Columns: Mapped[int | None] = mapped_column(Integer, nullable=True)

    file_path: Mapped[str] = mapped_column(String(255))  # relative to storage.path
    file_size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    receive_count: Mapped[int] = mapped_column(Integer, default=1)  # > 1: re-sent

    study: Mapped[Study] = relationship(back_populates="instances", overlaps="instances,series")
    series: Mapped[Series] = relationship(back_populates="instances", overlaps="instances,study")


class DeliveryState(str, enum.Enum):
    PENDING = "pending"  # waiting for its (next) attempt
    SENDING = "sending"  # a C-STORE may be on the wire: after a crash, ask the destination before resending
    SENT = "sent"  # the destination answered success (or holds it, as a C-FIND showed)
    DEAD = "dead"  # failed max_attempts times: parked until `dicom-node retry`
    CANCELLED = "cancelled"  # superseded by a newer result version before it was sent


class ResultObject(Base):
    """A DICOM object the node made (SR, heatmap SC, summary SC, presentation state), stored under
    storage.path/results."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    result_version: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)  # the study generation it was made from
    kind: Mapped[str] = mapped_column(String(16))  # "sr" | "heatmap" | "summary" | "gsps"
    SOPInstanceUID: Mapped[str] = mapped_column(String(64), unique=True)
    SOPClassUID: Mapped[str] = mapped_column(String(64))
    SeriesInstanceUID: Mapped[str] = mapped_column(String(64))
    TransferSyntaxUID: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(255))
    file_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)


class Delivery(Base):
    """One result object to one destination (a peer's AE title): the persistent send queue."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination", name="uq_delivery"),
                      Index("ix_deliveries_due", "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(12), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # the sender that put it in 'sending' (node identity): a node gives back only its own at restart;
    # another node's are taken over once next_attempt_at (the lease's end) has passed
    claimed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
