"""Database: migrations, the job state machine, and the same on a real PostgreSQL server."""
from __future__ import annotations

import os

import pytest
from sqlalchemy import inspect, select, text

from node.db import make_engine, open_database
from node.db.schema import Base, Job
from node.registry import (
    ReceivedInstance, claim_next_job, instance_paths_for_job, mark_stable_studies_ready, record_instance,
    release_job,
)
from tests.support import skip_or_fail

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
        job = claim_next_job(s, lease_s=60)
        assert job is not None and job.state == "processing" and job.attempts == 1
        assert claim_next_job(s, lease_s=60) is None  # nothing else ready
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
        job = claim_next_job(s, lease_s=60)
        assert job.version == 1 and job.attempts == 2
        release_job(s, job, "worker died again", max_attempts=2)
        assert job.state == "failed" and "again" in job.reason


def test_sqlite_migrations_and_state_machine(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    sessions = open_database(url)
    open_database(url)  # upgrading twice is harmless
    with sessions() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    exercise_state_machine(sessions)


def test_migrations_match_the_models(tmp_path):
    """The Alembic history creates exactly the tables and columns the models declare."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    open_database(url)
    insp = inspect(make_engine(url))
    for table in Base.metadata.sorted_tables:
        assert {c["name"] for c in insp.get_columns(table.name)} == {c.name for c in table.columns}, table.name


@pytest.mark.peer
def test_postgresql():
    url = os.environ.get("CTNODE_TEST_POSTGRES_URL")
    if not url:
        skip_or_fail("CTNODE_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    engine = make_engine(url)
    with engine.begin() as conn:  # start from an empty schema
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(text(f'DROP TABLE IF EXISTS "{table.name}" CASCADE'))
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    sessions = open_database(url)
    exercise_state_machine(sessions)
