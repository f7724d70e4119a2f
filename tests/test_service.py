"""Scheduler duties: a worker over its time limit is killed and its job failed; retention purges the spool."""
from __future__ import annotations


from sqlalchemy import select

from node.db.schema import Instance, Job
from node.demo import send_study
from node.service import Node
from tests.conftest import make_settings
from tests.util import wait_for
from tests.factory import ct_slice, write


def job_state(node):
    with node.sessions() as s:
        job = s.scalars(select(Job).order_by(Job.id.desc())).first()
        return job.state if job else None, job.reason if job else ""


def test_overdue_worker_is_killed_and_the_listener_keeps_serving(tmp_path):
    settings = make_settings(tmp_path, processing={"job_timeout": 0.05, "stable_after": 0.1})
    node = Node(settings)
    node.start()
    try:
        files = [write(ct_slice(study_uid="1.2.3", series_uid="1.2.3.4", z=z), tmp_path / "in") for z in range(3)]
        assert send_study(files, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == 3
        wait_for(lambda: job_state(node)[0] == "failed", 60, "the overdue job to fail")
        assert "longer than" in job_state(node)[1]
        # the listener is unaffected: another study is acknowledged
        other = [write(ct_slice(study_uid="1.2.5", z=0), tmp_path / "in2")]
        assert send_study(other, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == 1
    finally:
        node.stop()


def test_retention_removes_spool_files_of_finished_studies(tmp_path):
    settings = make_settings(tmp_path, storage={"retention_days": 0.0}, processing={"stable_after": 0.1})
    node = Node(settings)
    node.start()
    try:
        files = [write(ct_slice(study_uid="1.2.3", z=z), tmp_path / "in") for z in range(2)]
        send_study(files, "127.0.0.1", node.listener.port, "CTNODE", progress=False)
        wait_for(lambda: job_state(node)[0] in ("done", "skipped", "failed"), 120, "the job to finish")
        node.tick_retention()
    finally:
        node.stop()
    with node.sessions() as s:
        instances = s.scalars(select(Instance)).all()
    assert instances and all(i.purged_at is not None for i in instances)
    assert not list(settings.spool_dir.rglob("*.dcm"))
