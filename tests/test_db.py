"""Database: migrations, the job state machine, and the same on a real PostgreSQL server."""
from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from node.db import alembic_config, make_engine, open_database, upgrade
from node.db.schema import Base, Export, Job, ReferenceSeg
from node.db.states import ExportState, JobState, ReferenceState, TransitionError, allowed, transition
from node.registry import (
    ReceivedInstance, ReceivedReference, claim_next_job, instance_paths_for_job, mark_stable_studies_ready,
    record_instance, record_reference, release_job,
)

pytestmark = pytest.mark.unit


def received(study="1.2.3", series="1.2.3.1", sop="1.2.3.1.1", sha="a"):
    return ReceivedInstance(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path=f"/spool/{sop}.dcm", size=10, sha256=sha, calling_aet="A")


def exercise_state_machine(sessions) -> None:
    with sessions.begin() as s:
        assert record_instance(s, received(sop="1.2.3.1.1")) == "stored"
        assert record_instance(s, received(sop="1.2.3.1.2")) == "stored"
        assert record_instance(s, received(sop="1.2.3.1.2")) == "duplicate"
        assert record_instance(s, received(sop="1.2.3.1.2", sha="b")) == "replaced"  # new bytes, same UID
    with sessions.begin() as s:
        assert mark_stable_studies_ready(s, stable_after=3600) == []
        assert len(mark_stable_studies_ready(s, stable_after=0)) == 1
    with sessions.begin() as s:  # an instance for a study that is ready but not yet claimed: collecting again
        assert record_instance(s, received(series="1.2.3.2", sop="1.2.3.2.1")) == "stored"
        assert s.scalars(select(Job.state)).all() == ["received"]
        assert len(mark_stable_studies_ready(s, stable_after=0)) == 1
    with sessions.begin() as s:
        job = claim_next_job(s, lease_s=60, owner="test/1/a")
        assert job is not None and job.state == "processing" and job.attempts == 1
        assert claim_next_job(s, lease_s=60, owner="test/1/a") is None  # nothing else ready
        # a late instance while processing opens version 2 instead of mixing into version 1
        assert record_instance(s, received(sop="1.2.3.1.3")) == "stored"
    with sessions.begin() as s:
        jobs = s.scalars(select(Job).order_by(Job.version)).all()
        assert [(j.version, j.state) for j in jobs] == [(1, "processing"), (2, "received")]
        assert len(instance_paths_for_job(s, jobs[0])) == 3
        assert len(instance_paths_for_job(s, jobs[1])) == 4  # cumulative
        release_job(s, jobs[0], "worker died", max_attempts=2)
        assert jobs[0].state == "ready"
    with sessions.begin() as s:
        job = claim_next_job(s, lease_s=60, owner="test/1/a")
        assert job.version == 1 and job.attempts == 2
        release_job(s, job, "worker died again", max_attempts=2)
        assert job.state == "failed" and "again" in job.reason


def assert_states_checked(sessions) -> None:
    """The database itself refuses a state value outside the enums (CHECK constraints of migration 0004)."""
    with sessions.begin() as s:  # a row in each table
        job_id = s.scalars(select(Job.id)).first()
        s.add(Export(job_id=job_id, destination="pacs", sop_instance_uid="9.9", path="/results/9.9.dcm"))
        record_reference(s, ReceivedReference(study_instance_uid="9", series_instance_uid="9.1", sop_instance_uid="9.8",
                                              source_series_uid="9.2", path="/spool/9.8.dcm", size=1, sha256="c"))
    for table in ("jobs", "exports", "reference_segs"):
        with pytest.raises(IntegrityError, match=f"ck_{table}_state"), sessions.begin() as s:
            s.execute(text(f"UPDATE {table} SET state = 'bogus'"))  # raw SQL: past the ORM's own checks


def test_sqlite_migrations_and_state_machine(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    sessions = open_database(url)
    open_database(url)  # upgrading twice is harmless
    with sessions() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    exercise_state_machine(sessions)
    assert_states_checked(sessions)


def test_forbidden_transitions_raise_and_change_nothing():
    job = Job(state=JobState.DONE)
    with pytest.raises(TransitionError, match="done -> processing is not allowed"):
        transition(job, JobState.PROCESSING)  # a finished job is never taken again (late data: a new version)
    assert job.state == JobState.DONE
    failed = Job(state=JobState.FAILED)
    assert transition(failed, JobState.READY) == JobState.FAILED and failed.state == JobState.READY  # jobs retry
    with pytest.raises(TransitionError):
        transition(Job(state=JobState.RECEIVED), JobState.PROCESSING)  # only a ready job is claimed
    with pytest.raises(TransitionError, match="unknown state 'bogus'"):
        transition(Job(state="bogus"), JobState.READY)
    with pytest.raises(TransitionError):
        transition(Export(state=ExportState.SENT), ExportState.PENDING)  # a confirmed send is never repeated
    assert allowed(ExportState.DEAD, ExportState.PENDING)
    with pytest.raises(TransitionError):
        transition(ReferenceSeg(state=ReferenceState.ANATOMY), ReferenceState.DONE)  # a lobe map is not compared
    assert allowed(ReferenceState.UNMATCHED, ReferenceState.EXPIRED)
    assert not allowed(ReferenceState.DONE, ReferenceState.EXPIRED)  # only a reference never compared expires
    assert allowed(ReferenceState.EXPIRED, ReferenceState.PENDING)  # re-sent: compared again


def test_the_orm_refuses_a_state_outside_the_enum(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as s:
        record_instance(s, received())
    with pytest.raises(Exception, match="'bogus' is not a valid JobState"), sessions.begin() as s:
        s.scalars(select(Job)).one().state = "bogus"
    with sessions() as s:
        assert s.scalars(select(Job.state)).all() == [JobState.RECEIVED]


def test_migration_0004_keeps_the_rows_of_an_older_database(tmp_path):
    """Upgrading a database with data: SQLite copies jobs, exports and reference_segs to add the checks, and
    every row, index and foreign key survives (the rows referencing jobs included)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    command.upgrade(alembic_config(url), "0003")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO studies (id, study_instance_uid, patient_id, accession_number, "
                          "first_received_at, last_received_at) VALUES (1, '1.2', '', '', '2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO jobs (id, study_id, version, state, reason, attempts, created_at, "
                          "last_instance_at, updated_at) VALUES (1, 1, 1, 'done', '', 1, '2026-01-01', "
                          "'2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO exports (id, job_id, destination, sop_instance_uid, path, state, attempts, "
                          "next_attempt_at, last_error) VALUES (1, 1, 'pacs', '1.3', '/r/1.dcm', 'dead', 3, "
                          "'2026-01-01', 'refused')"))
        conn.execute(text("INSERT INTO reference_segs (id, study_instance_uid, series_instance_uid, "
                          "sop_instance_uid, source_series_uid, path, size, sha256, calling_aet, received_at, state, "
                          "reason, job_id) VALUES (1, '1.2', '1.4', '1.5', '1.6', '', 1, 'x', '', '2026-01-01', "
                          "'expired', '', 1)"))
    engine.dispose()
    upgrade(url)
    sessions = open_database(url, migrate=False)
    with sessions() as s:
        assert s.scalars(select(Job.state)).all() == [JobState.DONE]
        assert s.scalars(select(Export.state)).all() == [ExportState.DEAD]
        assert s.scalars(select(ReferenceSeg.state)).all() == [ReferenceState.EXPIRED]
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1  # the node's connections enforce them again
    insp = inspect(make_engine(url))
    assert {c["name"] for c in insp.get_check_constraints("jobs")} == {"ck_jobs_state"}
    assert "ix_jobs_state" in {i["name"] for i in insp.get_indexes("jobs")}
    assert [fk["referred_table"] for fk in insp.get_foreign_keys("exports")] == ["jobs"]
    assert_states_checked(sessions)
    command.downgrade(alembic_config(url), "0003")
    assert inspect(make_engine(url)).get_check_constraints("jobs") == []
    upgrade(url)


def test_migrations_match_the_models(tmp_path):
    """The Alembic history creates exactly the tables and columns the models declare."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    open_database(url)
    insp = inspect(make_engine(url))
    for table in Base.metadata.sorted_tables:
        assert {c["name"] for c in insp.get_columns(table.name)} == {c.name for c in table.columns}, table.name


@pytest.mark.peer
def test_postgresql(postgres_url):
    sessions = open_database(postgres_url)
    exercise_state_machine(sessions)
    assert_states_checked(sessions)
