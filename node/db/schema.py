"""Database schema: what the node received, what it did with it, and what it sent.

The database is the only state shared by the listener, the scheduler and the worker processes: every state
change is one committed write, so a restart resumes from these tables, never from memory.

States are the enums of :mod:`node.db.states`; every change goes through :func:`node.db.states.transition`,
which allows exactly the moves drawn here, and CHECK constraints keep any other value out of the columns.

Job states (one row per study *version*; a late instance for a study already taken starts a new version)::

    received -> ready -> processing -> done | skipped | failed
        ^         |  ^        |                          |
        +---------+  +--------+--------------------------+
      (more instances   (worker died or node restarted: retry, attempts + 1;
       before a worker   failed -> ready: ``ctnode jobs retry``)
       took it)

Claims: a job in ``processing`` and an export being sent carry an ``owner`` (the process, see
:mod:`node.lease`) and a ``lease_until`` that the owner renews; another process takes over only an expired
lease. Claims are single guarded UPDATEs (and ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two processes
sharing the database never hold the same row.

Export states::

    pending -> sent | dead (after ``export.max_attempts``);  dead -> pending: ``ctnode jobs retry``

Reference SEG states (a Segmentation received to audit the node against, :mod:`node.agreement`)::

    pending | unmatched | done -> done | unmatched | failed | anatomy   (compared; done again with a newer result)
    pending | unmatched -> expired     (no node result within ``storage.retention_days``: given up, file removed)
    any -> pending                     (re-sent with other bytes: compared again)

``unmatched`` is retried until a node result for its series exists; ``anatomy`` is a lobe map, used for the
zones of a result and not compared (see :mod:`node.agreement`).
"""
from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (JSON, CheckConstraint, DateTime, Dialect, Float, ForeignKey, Index, Integer, String, Text,
                        TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from node.db.states import ExportState, JobState, ReferenceState


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class StateType(TypeDecorator[enum.StrEnum]):
    """A state column: stored as its string value (VARCHAR(16)), read back as the enum member."""

    impl = String(16)
    cache_ok = True

    def __init__(self, states: type[enum.StrEnum]):
        super().__init__()
        self.states = states

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.states(value).value  # ValueError for a value not in the enum

    def process_result_value(self, value: Any, dialect: Dialect) -> enum.StrEnum | None:
        return None if value is None else self.states(value)


def state_check(name: str, states: type[enum.StrEnum]) -> CheckConstraint:
    """CHECK constraint ``ck_<table>_state``: only the values of ``states`` (migration 0004 creates the same)."""
    return CheckConstraint(state_check_sql(states), name=name)


def state_check_sql(states: type[enum.StrEnum]) -> str:
    return "state IN (" + ", ".join(f"'{s.value}'" for s in states) + ")"


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    jobs: Mapped[list["Job"]] = relationship(back_populates="study", order_by="Job.version")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")


class Instance(Base):
    """One acknowledged instance; ``path`` is the spool file holding the bytes exactly as received, relative to
    the spool folder (:mod:`node.storage`)."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)  # the study version it arrived in
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "version"), Index("ix_jobs_state", "state"),
                      state_check("ck_jobs_state", JobState))
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(StateType(JobState), default=JobState.RECEIVED)
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_instance_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The process holding the job while it is processing (node.lease.Owner) and until when; renewed by its
    # heartbeat, taken over by another process once expired.
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    study: Mapped[Study] = relationship(back_populates="jobs")
    result: Mapped["Result | None"] = relationship(back_populates="job", uselist=False)
    exports: Mapped[list["Export"]] = relationship(back_populates="job", order_by="Export.id")


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    engine_name: Mapped[str] = mapped_column(String(32))
    engine_version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str] = mapped_column(String(64), default="")
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decisions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # series selection and why; notes
    seg_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    seg_path: Mapped[str] = mapped_column(Text, default="")  # result files: relative to the results folder
    sr_path: Mapped[str] = mapped_column(Text, default="")
    # Secondary Capture key images: [{"sop_instance_uid": ..., "path": ...}, ...] (processing.key_images)
    key_images: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default="[]")
    # Pleural effusion per side (node.pipeline.effusion): ml for a volume, cm2 for a single slice (the other
    # pair NULL); NULL when the analysis did not get that far
    right_effusion_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    left_effusion_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    right_effusion_cm2: Mapped[float | None] = mapped_column(Float, nullable=True)
    left_effusion_cm2: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    job: Mapped[Job] = relationship(back_populates="result")


class Export(Base):
    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"), Index("ix_exports_state", "state"),
                      state_check("ck_exports_state", ExportState))
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # the result file, relative to the results folder
    state: Mapped[ExportState] = mapped_column(StateType(ExportState), default=ExportState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The process sending it right now (node.lease.Owner) and until when; None while nobody is.
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    job: Mapped[Job] = relationship(back_populates="exports")


class Event(Base):
    """Audit log: associations, refused instances, job and export transitions."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    peer: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    elapsed_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class ReferenceSeg(Base):
    """A Segmentation received as a reference (e.g. a radiologist's correction); it never starts a job.

    ``path`` is the spool file with the bytes exactly as received (relative to the spool folder);
    ``source_series_uid`` is the series it segments (its ReferencedSeriesSequence), which is how it is
    matched to the node's result.
    """

    __tablename__ = "reference_segs"
    __table_args__ = (Index("ix_reference_segs_state", "state"), state_check("ck_reference_segs_state", ReferenceState))
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    source_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    state: Mapped[ReferenceState] = mapped_column(StateType(ReferenceState), default=ReferenceState.PENDING)
    reason: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)  # the result compared
    computed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    agreements: Mapped[list["Agreement"]] = relationship(back_populates="reference", order_by="Agreement.id",
                                                         cascade="all, delete-orphan")


class Agreement(Base):
    """Agreement of one node segment with the matching reference segment(s): Dice and volumes."""

    __tablename__ = "agreements"
    id: Mapped[int] = mapped_column(primary_key=True)
    reference_id: Mapped[int] = mapped_column(ForeignKey("reference_segs.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    reference_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    reference_series_uid: Mapped[str] = mapped_column(String(64))
    segment_key: Mapped[str] = mapped_column(String(32))          # right_lung, left_lung, infection, ggo, ...
    node_segment_number: Mapped[int] = mapped_column(Integer)
    node_segment_label: Mapped[str] = mapped_column(String(64), default="")
    reference_segment_numbers: Mapped[str] = mapped_column(String(64), default="")  # "3" or "3,4" (union)
    reference_segment_label: Mapped[str] = mapped_column(String(64), default="")
    dice: Mapped[float | None] = mapped_column(Float, nullable=True)  # None when both masks are empty
    volume_node_ml: Mapped[float] = mapped_column(Float)
    volume_reference_ml: Mapped[float] = mapped_column(Float)
    volume_difference_ml: Mapped[float] = mapped_column(Float)    # reference - node
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    detail: Mapped[str] = mapped_column(Text, default="")
    reference: Mapped[ReferenceSeg] = relationship(back_populates="agreements")
