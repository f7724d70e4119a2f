"""Claims with leases: several node processes share one database and never hold the same job or export;
a dead process's claims are taken over after its lease; a restart releases only its own earlier claims."""
from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import select, update

from node.db import open_database
from node.db.schema import Event, Export, Job, utcnow
from node.lease import Owner
from node.reports import jobs_table
from node.registry import (ReceivedInstance, claim_due_exports, claim_next_job, mark_stable_studies_ready,
                           record_instance, release_lost_exports, release_lost_jobs, renew_leases)

A1 = Owner("node-a:11112", 100, "aaaa")        # node a
A2 = Owner("node-a:11112", 200, "bbbb")        # node a after a restart
B = Owner("node-b:11112", 300, "cccc")         # another node
C = Owner("node-c:11112", 400, "dddd")         # a third one


def ready_jobs(sessions, n: int) -> None:
    with sessions.begin() as s:
        for i in range(n):
            record_instance(s, ReceivedInstance(f"1.2.{i}", f"1.2.{i}.1", f"1.2.{i}.1.1", "1.2.840.10008.5.1.4.1.1.2",
                                                "1.2.840.10008.1.2.1", f"/spool/{i}.dcm", 1, "0" * 64))
    with sessions.begin() as s:
        assert len(mark_stable_studies_ready(s, 0)) == n


def held(sessions) -> dict[int, tuple[str, str | None]]:
    with sessions() as s:
        return {j.id: (j.state, j.owner) for j in s.scalars(select(Job))}


def expire(sessions, owner: Owner) -> None:
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.owner == str(owner)).values(lease_until=utcnow() - dt.timedelta(seconds=1)))


def exercise_job_leases(sessions) -> None:
    ready_jobs(sessions, 4)
    with sessions.begin() as s:
        a = claim_next_job(s, 60, owner=str(A1))
        b = claim_next_job(s, 60, owner=str(B))
    assert a.id != b.id and a.owner == str(A1) and b.owner == str(B)
    assert a.lease_until > utcnow() + dt.timedelta(seconds=50)

    # node a restarts: its own earlier claim is released at once, node b's live claim is left alone
    with sessions.begin() as s:
        assert release_lost_jobs(s, A2, max_attempts=3) == []  # a release of its own, not a takeover
    states = held(sessions)
    assert states[a.id] == ("ready", None) and states[b.id] == ("processing", str(B))

    # node b stops renewing: once its lease expired, node a takes the job over (ready again, attempts kept)
    with sessions.begin() as s:
        renew_leases(s, str(A2), 60, [a.id, b.id])  # a's heartbeat does not touch b's claim
        assert release_lost_jobs(s, A2, max_attempts=3) == []
    expire(sessions, B)
    with sessions.begin() as s:
        assert release_lost_jobs(s, A2, max_attempts=3) == [b.id]
        assert release_lost_jobs(s, A2, max_attempts=3) == []  # once
    with sessions() as s:
        job = s.get(Job, b.id)
        assert (job.state, job.owner, job.attempts) == ("ready", None, 1)
        assert [e.detail for e in s.scalars(select(Event).where(Event.kind == "lease_takeover"))] == [
            f"job {b.id} from {B} by {A2}: the lease of {B} expired (no heartbeat)"]

    # a heartbeat keeps the lease of a job with a worker alive past its first expiry; a job claimed without
    # a worker (it did not start) is not renewed, so it does not stay claimed for ever
    with sessions.begin() as s:
        c = claim_next_job(s, 60, owner=str(B))
        d = claim_next_job(s, 60, owner=str(B))
    expire(sessions, B)
    with sessions.begin() as s:
        renew_leases(s, str(B), 60, [c.id])
        assert release_lost_jobs(s, A2, max_attempts=3) == [d.id]
    assert held(sessions)[c.id] == ("processing", str(B)) and held(sessions)[d.id] == ("ready", None)
    with sessions() as s:  # `ctnode jobs list` names the holder
        line = next(row for row in jobs_table(s).splitlines() if row.startswith(f"{c.id} "))
    assert " processing " in line and f" {B.node} " in line and str(B) not in line


def exercise_export_leases(sessions) -> None:
    with sessions.begin() as s:
        job_id = s.scalars(select(Job.id)).first()
        s.add_all([Export(job_id=job_id, destination="pacs", sop_instance_uid=f"9.{i}", path=f"/r/{i}.dcm")
                   for i in range(3)])
    with sessions.begin() as s:
        mine = claim_due_exports(s, str(A1), 60, limit=2)[0]
    with sessions.begin() as s:  # a send interrupted before its outcomes: the rows are due again for their holder
        assert sorted(e.id for e in claim_due_exports(s, str(A1), 60, limit=2)[0]) == sorted(e.id for e in mine)
    with sessions.begin() as s:
        theirs = claim_due_exports(s, str(B), 60)[0]
    assert len(mine) == 2 and len(theirs) == 1 and {e.id for e in mine}.isdisjoint({e.id for e in theirs})
    with sessions.begin() as s:
        assert claim_due_exports(s, str(C), 60) == ([], 0)  # all held by others
        assert release_lost_exports(s, A2) == 2       # node a restarted: its claims are free again
    with sessions.begin() as s:
        assert sorted(e.id for e in claim_due_exports(s, str(C), 60)[0]) == sorted(e.id for e in mine)
    with sessions.begin() as s:
        s.execute(update(Export).values(lease_until=utcnow() - dt.timedelta(seconds=1)))
    with sessions.begin() as s:
        rows, taken = claim_due_exports(s, str(A2), 60)
        assert len(rows) == taken == 3  # expired leases are taken over, each with an event
    with sessions() as s:
        events = s.scalars(select(Event.detail).where(Event.kind == "lease_takeover",
                                                      Event.detail.startswith("export "))).all()
    holders = {**{e.id: C for e in mine}, **{e.id: B for e in theirs}}
    assert sorted(events) == sorted(f"export {i} from {h} by {A2}: the lease expired (no heartbeat)"
                                    for i, h in holders.items())


def race_for_jobs(sessions, claimers: int = 4, jobs: int = 6) -> None:
    """Claimers in threads with their own connections: every job is claimed by exactly one of them."""
    ready_jobs(sessions, jobs)
    got: list[tuple[str, int]] = []
    lock, start = threading.Lock(), threading.Barrier(claimers)

    def claim(name: str) -> None:
        start.wait()
        while True:
            with sessions.begin() as s:
                job = claim_next_job(s, 60, owner=name)
            if job is None:
                with sessions() as s:
                    if s.scalars(select(Job).where(Job.state == "ready")).first() is None:
                        return
                continue
            with lock:
                got.append((name, job.id))

    threads = [threading.Thread(target=claim, args=(f"n{i}/1/x",)) for i in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(j for _, j in got) == sorted(held(sessions))  # each job exactly once
    assert all(held(sessions)[j] == ("processing", name) for name, j in got)


@pytest.mark.unit
def test_sqlite_leases(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    exercise_job_leases(sessions)
    exercise_export_leases(sessions)


@pytest.mark.unit
def test_sqlite_claims_race(tmp_path):
    race_for_jobs(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))


@pytest.mark.peer
def test_postgresql_leases(postgres_url):
    sessions = open_database(postgres_url)
    exercise_job_leases(sessions)
    exercise_export_leases(sessions)


@pytest.mark.peer
def test_postgresql_claims_race(postgres_url):
    race_for_jobs(open_database(postgres_url))


@pytest.mark.unit
def test_default_node_names_differ_by_roles():
    import socket

    from node.config import load_settings
    from node.lease import node_name, this_process

    host = socket.gethostname()
    assert node_name(load_settings(env={})) == f"{host}:11112"
    assert node_name(load_settings(env={"CTNODE_NODE_ROLES": "worker"})) == f"{host}:11112-worker"
    assert node_name(load_settings(env={"CTNODE_NODE_ROLES": "exporter,listener"})) == f"{host}:11112-exporter+listener"
    assert node_name(load_settings(env={"CTNODE_NODE_NAME": "gpu1"})) == "gpu1"
    me = this_process(load_settings(env={"CTNODE_NODE_NAME": "a/b"}))
    assert me.node == "a_b" and Owner.parse(str(me)) == me
    assert me.is_earlier_run_of_this_node(str(Owner("a_b", 1, "x")))
    assert not me.is_earlier_run_of_this_node(str(me)) and not me.is_earlier_run_of_this_node("a_bc/1/x")


@pytest.mark.unit
def test_a_worker_that_cannot_read_the_study_releases_it_with_the_reason(tmp_path):
    """Instance files missing on this host (shared storage not mounted): the attempt ends at once with a
    reason naming the file; the job is ready for another node, and failed after processing.max_attempts."""
    from node.worker import process_job
    from tests.nodes import make_settings

    settings = make_settings(tmp_path, processing={"max_attempts": 2})
    sessions = open_database(settings.storage.database_url)
    ready_jobs(sessions, 1)  # its instance row points to /spool/0.dcm, which does not exist
    for attempt, final in ((1, "ready"), (2, "failed")):
        with sessions.begin() as s:
            job = claim_next_job(s, 60, owner=str(A1))
        assert job.attempts == attempt
        assert process_job(settings, job.id, attempt) == final
        with sessions() as s:
            job = s.get(Job, job.id)
            assert job.state == final and job.owner is None and job.result is None
            assert "1 of 1 instance file(s) cannot be read on " in job.reason
            assert "(first: /spool/0.dcm: No such file or directory); is the storage root mounted here?" in job.reason


@pytest.mark.unit
def test_migration_0006_adds_the_claim_columns_and_keeps_the_rows(tmp_path):
    from alembic import command
    from sqlalchemy import inspect, text

    from node.db import alembic_config, make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    command.upgrade(alembic_config(url), "0004")
    engine = make_engine(url)
    with engine.begin() as conn:  # a job processing and its export, as an older node left them
        conn.execute(text("INSERT INTO studies (id, study_instance_uid, patient_id, accession_number, "
                          "first_received_at, last_received_at) VALUES (1, '1.2', '', '', '2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO jobs (id, study_id, version, state, reason, attempts, created_at, "
                          "last_instance_at, updated_at, lease_until) VALUES (1, 1, 1, 'processing', '', 1, "
                          "'2026-01-01', '2026-01-01', '2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO exports (id, job_id, destination, sop_instance_uid, path, state, attempts, "
                          "next_attempt_at, last_error) VALUES (1, 1, 'pacs', '1.2.3', '/r.dcm', 'pending', 0, "
                          "'2026-01-01', '')"))
    upgrade(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state, owner FROM jobs")).all() == [("processing", None)]
        assert conn.execute(text("SELECT state, owner, lease_until FROM exports")).all() == [("pending", None, None)]
    sessions = open_database(url)
    with sessions.begin() as s:  # the old claim has no owner and an expired lease: any node releases it
        assert release_lost_jobs(s, A1, max_attempts=3) == [1]
    command.downgrade(alembic_config(url), "0004")
    columns = {c["name"] for c in inspect(engine).get_columns("exports")}
    assert "owner" not in columns and "lease_until" not in columns
    assert "owner" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    engine.dispose()
