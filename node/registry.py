"""Recording what arrived and moving jobs through their states; every function is one transaction's worth.

These are the few queries the listener, the scheduler, the worker and the CLI share.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from node.db.schema import Event, Export, Instance, Job, ReferenceSeg, Series, Study, utcnow
from node.db.states import JOB_FINISHED, ExportState, JobState, ReferenceState, check_transition, transition
from node.lease import SEPARATOR, Owner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_aet: str = ""
    modality: str = ""
    series_description: str = ""
    patient_id: str = ""
    accession_number: str = ""


def add_event(session: Session, kind: str, detail: str = "", *, study_uid: str = "", job_id: int | None = None,
              calling_aet: str = "", peer: str = "", elapsed_s: float | None = None) -> None:
    session.add(Event(kind=kind, detail=detail[:4000], study_instance_uid=study_uid, job_id=job_id,
                      calling_aet=calling_aet[:16], peer=peer[:64], elapsed_s=elapsed_s))


def _open_job(session: Session, study: Study, now: dt.datetime) -> Job:
    """The job that collects new instances of ``study``: the latest one while it is still waiting
    (received/ready), otherwise a new version, so a late instance never mixes into a result already taken."""
    latest = session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.version.desc()).limit(1)).first()
    if latest is not None and latest.state in (JobState.RECEIVED, JobState.READY):
        if latest.state == JobState.READY:
            transition(latest, JobState.RECEIVED)  # more data arrived: wait for the study to be stable again
        latest.last_instance_at = now
        latest.updated_at = now
        return latest
    job = Job(study_id=study.id, version=1 if latest is None else latest.version + 1, state=JobState.RECEIVED,
              created_at=now, last_instance_at=now, updated_at=now)
    session.add(job)
    session.flush()
    add_event(session, "job_created", f"version {job.version}" + (" (late instances after a result)" if latest else ""),
              study_uid=study.study_instance_uid, job_id=job.id)
    return job


# Statements of record_instance's common path, built once: it runs for every received instance while the
# sender waits, and building and cache-keying a statement per call costs more than SQLite executing it.
_I, _S, _SE, _J = Instance.__table__, Study.__table__, Series.__table__, Job.__table__
_FIND_INSTANCE = select(_I.c.id, _I.c.sha256, _I.c.purged_at).where(_I.c.sop_instance_uid == bindparam("p_sop"))
_TOUCH_STUDY = (update(_S).where(_S.c.study_instance_uid == bindparam("p_uid"))
                .values(last_received_at=bindparam("p_now")).returning(_S.c.id))
_FIND_SERIES = select(_SE.c.id).where(_SE.c.series_instance_uid == bindparam("p_uid"))
_LATEST_JOB = (select(_J.c.id).where(_J.c.study_id == bindparam("p_study"))
               .order_by(_J.c.version.desc()).limit(1).scalar_subquery())
# The study's latest job, if it is still collecting instances (received): touched, else no row.
_TOUCH_COLLECTING_JOB = (update(_J).where(_J.c.id == _LATEST_JOB, _J.c.state == JobState.RECEIVED)
                         .values(last_instance_at=bindparam("p_now"), updated_at=bindparam("p_now")).returning(_J.c.id))
_INSERT_INSTANCE = insert(_I)


def record_instance(session: Session, inst: ReceivedInstance) -> str:
    """Record an instance already written to the spool. Returns "stored", "duplicate" or "replaced".

    The caller commits; only after that commit may the C-STORE be acknowledged. The common case (a known
    study and series whose job is still collecting) costs four prebuilt statements; a new study, series
    or job version takes the ORM path.
    """
    now = utcnow()
    conn = session.connection()
    existing = conn.execute(_FIND_INSTANCE, {"p_sop": inst.sop_instance_uid}).first()
    if existing is not None and existing.sha256 == inst.sha256 and existing.purged_at is None:
        return "duplicate"  # the same bytes again (a resend): nothing changes
    study_id = conn.execute(_TOUCH_STUDY, {"p_uid": inst.study_instance_uid, "p_now": now}).scalar()
    if study_id is None:
        study = Study(study_instance_uid=inst.study_instance_uid, patient_id=inst.patient_id[:64],
                      accession_number=inst.accession_number[:16], first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
        study_id = study.id
    series_id = conn.execute(_FIND_SERIES, {"p_uid": inst.series_instance_uid}).scalar()
    if series_id is None:
        series = Series(study_id=study_id, series_instance_uid=inst.series_instance_uid,
                        modality=inst.modality[:16], description=inst.series_description[:64])
        session.add(series)
        session.flush()
        series_id = series.id
    job_id = conn.execute(_TOUCH_COLLECTING_JOB, {"p_study": study_id, "p_now": now}).scalar()
    if job_id is None:
        job_id = _open_job(session, session.get(Study, study_id), now).id
    values = dict(study_id=study_id, series_id=series_id, job_id=job_id, sop_class_uid=inst.sop_class_uid,
                  transfer_syntax_uid=inst.transfer_syntax_uid, path=inst.path, size=inst.size,
                  sha256=inst.sha256, calling_aet=inst.calling_aet[:16], received_at=now, purged_at=None)
    if existing is not None:
        session.execute(update(Instance).where(Instance.id == existing.id).values(**values))
        add_event(session, "instance_replaced", f"SOP Instance {inst.sop_instance_uid} re-sent with different content",
                  study_uid=inst.study_instance_uid, job_id=job_id, calling_aet=inst.calling_aet)
        return "replaced"
    conn.execute(_INSERT_INSTANCE, {"sop_instance_uid": inst.sop_instance_uid, **values})
    return "stored"


@dataclass(frozen=True)
class ReceivedReference:
    """A Segmentation received as a reference (already in the spool); ``source_series_uid`` is the series
    it segments, from its ReferencedSeriesSequence."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    source_series_uid: str
    path: str
    size: int
    sha256: str
    calling_aet: str = ""


def record_reference(session: Session, ref: ReceivedReference) -> str:
    """Record a reference SEG already written to the spool: "stored", "duplicate" or "replaced".

    It touches no study, series, instance or job row (a reference never starts or joins a processing job);
    :mod:`node.agreement` compares it with the node's result later. A resend with different bytes is
    compared again (its earlier agreements are dropped). The caller commits.
    """
    now = utcnow()
    existing = session.scalars(select(ReferenceSeg).where(ReferenceSeg.sop_instance_uid == ref.sop_instance_uid)).first()
    if existing is not None and existing.sha256 == ref.sha256:
        return "duplicate"
    if existing is None:
        existing = ReferenceSeg(sop_instance_uid=ref.sop_instance_uid, state=ReferenceState.PENDING)
        session.add(existing)
        outcome = "stored"
    else:
        existing.agreements.clear()
        transition(existing, ReferenceState.PENDING)  # other bytes: compared again
        outcome = "replaced"
    existing.study_instance_uid, existing.series_instance_uid = ref.study_instance_uid, ref.series_instance_uid
    existing.source_series_uid, existing.path, existing.size = ref.source_series_uid, ref.path, ref.size
    existing.sha256, existing.calling_aet, existing.received_at = ref.sha256, ref.calling_aet[:16], now
    existing.reason, existing.job_id, existing.computed_at = "", None, None
    add_event(session, "reference_received" if outcome == "stored" else "reference_replaced",
              f"reference SEG {ref.sop_instance_uid} for series {ref.source_series_uid}",
              study_uid=ref.study_instance_uid, calling_aet=ref.calling_aet)
    return outcome


def instance_paths_for_job(session: Session, job: Job) -> list[str]:
    """All instances of the job's study received up to and including its version (cumulative): their
    stored spool names (:mod:`node.storage`)."""
    rows = session.scalars(
        select(Instance.path).join(Job, Instance.job_id == Job.id)
        .where(Instance.study_id == job.study_id, Job.version <= job.version, Instance.purged_at.is_(None))
        .order_by(Instance.id)
    )
    return list(rows)


def reopen_study(session: Session, study_id: int, why: str) -> Job:
    """New data for a study that is not an instance (e.g. its lobe map): the study is processed again, as a
    new job version when the latest one has already been taken (the same rule as a late instance)."""
    study = session.get(Study, study_id)
    job = _open_job(session, study, utcnow())
    add_event(session, "study_reopened", f"{why}: job {job.id} version {job.version}",
              study_uid=study.study_instance_uid, job_id=job.id)
    return job


def reference_paths_for_study(session: Session, study_id: int) -> list[str]:
    """Stored spool names of the Segmentations received for any series of the study (lobe maps among them)."""
    series = select(Series.series_instance_uid).where(Series.study_id == study_id)
    return list(session.scalars(select(ReferenceSeg.path).where(ReferenceSeg.source_series_uid.in_(series))
                                .order_by(ReferenceSeg.id)))


def set_job_state(session: Session, job: Job, state: JobState, reason: str = "") -> None:
    """Move ``job`` to ``state`` (raises :class:`node.db.states.TransitionError` for a forbidden move), with
    its timestamps and a ``job_<state>`` event."""
    now = utcnow()
    old = transition(job, state)
    job.reason, job.updated_at = reason, now
    if state == JobState.PROCESSING:
        job.started_at = now
    if state in JOB_FINISHED:
        job.finished_at, job.lease_until, job.owner = now, None, None
    add_event(session, f"job_{state}", f"{old} -> {state}" + (f": {reason}" if reason else ""),
              study_uid=job.study.study_instance_uid, job_id=job.id)


def mark_stable_studies_ready(session: Session, stable_after: float) -> list[int]:
    """received -> ready for every job whose last instance is older than ``stable_after`` seconds."""
    cutoff = utcnow() - dt.timedelta(seconds=stable_after)
    jobs = session.scalars(select(Job).where(Job.state == JobState.RECEIVED, Job.last_instance_at <= cutoff)
                           .with_for_update(skip_locked=True)).all()  # decided once when several nodes check
    for job in jobs:
        set_job_state(session, job, JobState.READY, f"no new instance for {stable_after:g} s")
    return [j.id for j in jobs]


def claim_next_job(session: Session, lease_s: float, *, owner: str) -> Job | None:
    """ready -> processing for the oldest ready job, held by ``owner`` for ``lease_s`` seconds.

    The candidate is read ``FOR UPDATE SKIP LOCKED`` (PostgreSQL: processes claiming at once pass over each
    other's rows; SQLite has no row locks and ignores it) and claimed by one UPDATE guarded by its state, so of
    two processes racing for one job exactly one moves it."""
    job_id = session.scalars(
        select(Job.id).where(Job.state == JobState.READY).order_by(Job.last_instance_at).limit(1)
        .with_for_update(skip_locked=True)).first()
    if job_id is None:
        return None
    now = utcnow()
    check_transition(JobState.READY, JobState.PROCESSING)  # one statement that only moves a job still ready
    claimed = session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.READY)
        .values(state=JobState.PROCESSING, attempts=Job.attempts + 1, started_at=now, updated_at=now,
                owner=owner, lease_until=now + dt.timedelta(seconds=lease_s), worker_pid=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    add_event(session, "job_processing", f"ready -> processing (attempt {job.attempts}, {owner})",
              study_uid=job.study.study_instance_uid, job_id=job.id)
    return job


def release_job(session: Session, job: Job, reason: str, max_attempts: int) -> None:
    """A job whose worker died or whose lease expired: retry it, or fail it after ``max_attempts``."""
    if job.attempts < max_attempts:
        set_job_state(session, job, JobState.READY, f"retry after: {reason}")
        job.lease_until = None
        job.worker_pid = None
    else:
        set_job_state(session, job, JobState.FAILED, reason)
    job.owner = None


def renew_leases(session: Session, owner: str, lease_s: float, job_ids: Collection[int]) -> None:
    """The heartbeat: the jobs ``job_ids`` (those with a live worker) and every export ``owner`` holds are held
    ``lease_s`` seconds from now. A job claimed but without a worker is not renewed: its lease expires and it
    is released, by this process or another."""
    until = utcnow() + dt.timedelta(seconds=lease_s)
    if job_ids:
        session.execute(update(Job).where(Job.owner == owner, Job.state == JobState.PROCESSING, Job.id.in_(job_ids))
                        .values(lease_until=until).execution_options(synchronize_session=False))
    session.execute(update(Export).where(Export.owner == owner, Export.state == ExportState.PENDING)
                    .values(lease_until=until).execution_options(synchronize_session=False))


def release_lost_jobs(session: Session, owner: Owner, max_attempts: int) -> list[int]:
    """Release the processing jobs whose holder is gone: an expired lease (any process), or a claim of an
    earlier run of this node (it restarted: its workers died with it). A job another live process holds is
    left alone. Each release is guarded by the claim it saw, so two processes never release one job twice.
    Returns the ids of the jobs taken over from an expired lease."""
    now = utcnow()
    earlier_run = Job.owner.startswith(owner.node + SEPARATOR, autoescape=True)
    lost = Job.lease_until.is_(None) | (Job.lease_until < now) | earlier_run
    rows = session.execute(
        select(Job.id, Job.owner, Job.lease_until).where(Job.state == JobState.PROCESSING, lost)
        .with_for_update(skip_locked=True)).all()
    taken_over = []
    for job_id, held_by, lease_until in rows:
        expired = lease_until is None or lease_until < now
        mine_before = owner.is_earlier_run_of_this_node(held_by)
        if not (expired or mine_before):
            continue
        # claim the row for the release: only if nobody renewed or released it since it was read
        guard = Job.owner.is_(None) if held_by is None else Job.owner == held_by
        if session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.PROCESSING, guard)
                           .values(owner=str(owner)).execution_options(synchronize_session=False)).rowcount != 1:
            continue
        job = session.get(Job, job_id, populate_existing=True)
        why = ("this node restarted while the job was processing" if mine_before else
               f"the lease of {held_by or 'an unknown holder'} expired (no heartbeat)")
        release_job(session, job, why, max_attempts)
        if not mine_before:
            add_event(session, "lease_takeover", f"job {job_id} from {held_by} by {owner}: {why}",
                      study_uid=job.study.study_instance_uid, job_id=job_id)
            taken_over.append(job_id)
    return taken_over


def claim_due_exports(session: Session, owner: str, lease_s: float, limit: int = 50) -> tuple[list[Export], int]:
    """Claim up to ``limit`` due exports for ``owner`` (one guarded UPDATE each: pending, not held by a live
    lease); returns the rows claimed and how many of them were taken over from another process whose lease
    expired (each with a ``lease_takeover`` event). The caller sends them and clears ``owner`` with each
    outcome; a row ``owner`` still holds (a send interrupted by an error) is due again too."""
    now = utcnow()
    free = Export.owner.is_(None) | (Export.lease_until < now) | (Export.owner == owner)
    due = session.execute(
        select(Export.id, Export.owner, Export.job_id).where(Export.state == ExportState.PENDING,
                                                              Export.next_attempt_at <= now, free)
        .order_by(Export.next_attempt_at).limit(limit).with_for_update(skip_locked=True)).all()
    until = now + dt.timedelta(seconds=lease_s)
    claimed, taken_over = [], 0
    for export_id, held_by, job_id in due:
        guard = Export.owner.is_(None) if held_by is None else Export.owner == held_by
        # still free (a renewal since the select keeps it with its holder) and still held by whom it was seen
        if session.execute(update(Export).where(Export.id == export_id, Export.state == ExportState.PENDING, free,
                                                guard)
                           .values(owner=owner, lease_until=until)
                           .execution_options(synchronize_session=False)).rowcount != 1:
            continue
        claimed.append(export_id)
        if held_by is not None and held_by != owner:
            add_event(session, "lease_takeover",
                      f"export {export_id} from {held_by} by {owner}: the lease expired (no heartbeat)", job_id=job_id)
            taken_over += 1
    rows = list(session.scalars(select(Export).where(Export.id.in_(claimed)).order_by(Export.next_attempt_at)
                                .execution_options(populate_existing=True))) if claimed else []
    return rows, taken_over


def release_lost_exports(session: Session, owner: Owner) -> int:
    """Exports claimed by an earlier run of this node (it restarted mid-send): free for anyone again."""
    rows = session.execute(select(Export.id, Export.owner).where(Export.state == ExportState.PENDING,
                                                                  Export.owner.is_not(None))).all()
    lost = [i for i, held_by in rows if owner.is_earlier_run_of_this_node(held_by)]
    if lost:
        session.execute(update(Export).where(Export.id.in_(lost)).values(owner=None, lease_until=None)
                        .execution_options(synchronize_session=False))
    return len(lost)
