"""Scheduler duties: a worker over its time limit is killed and its job failed; retention purges the spool."""
from __future__ import annotations

import datetime as dt

import pytest
import torch
from sqlalchemy import select

from node.db.schema import Event, Instance, Job, utcnow
from node.registry import ReceivedInstance, mark_stable_studies_ready, record_instance
from node.demo import send_study
from node.service import Node
from tests.builders import ct_slice, write
from tests.nodes import make_settings
from tests.util import wait_for

pytestmark = pytest.mark.integration


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


def test_retention_removes_old_reference_segs(tmp_path):
    import datetime as dt

    from node.db.schema import ReferenceSeg, utcnow

    settings = make_settings(tmp_path, storage={"retention_days": 1.0})
    node = Node(settings)  # not started: only the retention duty is exercised
    old_file = settings.spool_dir / "references" / "1.2" / "old.dcm"
    new_file = settings.spool_dir / "references" / "1.2" / "new.dcm"
    for f in (old_file, new_file):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"seg")
    with node.sessions.begin() as s:
        for uid, f, age in (("1.2.1", old_file, 2.0), ("1.2.2", new_file, 0.0)):
            s.add(ReferenceSeg(study_instance_uid="1.2", series_instance_uid="1.2.9", sop_instance_uid=uid,
                               source_series_uid="1.2.8", path=str(f), size=3, sha256="x", state="unmatched",
                               received_at=utcnow() - dt.timedelta(days=age)))
    node.tick_retention()
    with node.sessions() as s:
        old, new = (s.scalars(select(ReferenceSeg).where(ReferenceSeg.sop_instance_uid == u)).one()
                    for u in ("1.2.1", "1.2.2"))
    assert not old_file.exists() and old.path == "" and old.state == "expired"
    assert new_file.exists() and new.state == "unmatched"


def test_study_too_big_for_worker_memory_fails_alone(tmp_path):
    """A real allocation failure: the worker's data memory is capped (processing.worker_memory_gb), a large
    study fails with "out of memory" (not retried), a small one after it is processed, the listener serves."""
    from node.phantom import make_phantom, write_phantom_study

    # 160 slices: the threshold pipeline peaks at 1.15 GB for 120 (bench/worker_memory.py), under the 1.25 GB cap
    big = write_phantom_study(make_phantom(rows=512, cols=512, slices=160, seed=3), tmp_path / "big")
    small = write_phantom_study(make_phantom(rows=96, cols=96, slices=20, pixel_spacing=3.5, slice_spacing=12.0,
                                             seed=4), tmp_path / "small")
    settings = make_settings(tmp_path, processing={"worker_memory_gb": 1.25, "stable_after": 0.5})
    node = Node(settings)
    node.start()
    try:
        assert send_study(big, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == len(big)
        wait_for(lambda: job_state(node)[0] == "failed", 240, "the large study to fail")
        state, reason = job_state(node)
        assert reason == "out of memory: the study needs more than processing.worker_memory_gb = 1.25 GB"
        assert send_study(small, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == len(small)
        wait_for(lambda: job_state(node)[0] == "done", 240, "the small study to be processed")
        with node.sessions() as s:
            jobs = s.scalars(select(Job).order_by(Job.id)).all()
    finally:
        node.stop()
    assert [(j.state, j.attempts) for j in jobs] == [("failed", 1), ("done", 1)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_result_records_where_the_network_ran(tmp_path, device):
    """An auditor can tell a result computed on the CPU (fp32) from one computed on a GPU (fp16); a worker
    that was configured for CUDA but could not use it says so in the audit log."""
    from node.phantom import make_phantom, write_phantom_study
    from node.reports import result_text

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_gpu.py covers the worker on the GPU")
    study = write_phantom_study(make_phantom(rows=128, cols=128, slices=24, pixel_spacing=2.8, slice_spacing=10.0,
                                             seed=6), tmp_path / "study")
    settings = make_settings(tmp_path, processing={"engine": "infnet", "device": device, "stable_after": 0.5})
    node = Node(settings)
    node.start()
    try:
        assert send_study(study, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == len(study)
        wait_for(lambda: job_state(node)[0] == "done", 240, "the study to be processed")
        with node.sessions() as s:
            job = s.scalars(select(Job)).one()
            assert job.result.decisions["engine_device"] == "cpu float32"
            assert "engine infnet" in result_text(s, job.id) and ", on cpu float32" in result_text(s, job.id)
            warnings = s.scalars(select(Event.detail).where(Event.kind == "engine_on_cpu")).all()
    finally:
        node.stop()
    if device == "cuda":
        assert warnings == ['processing.device is "cuda" but the engine ran on cpu float32: CUDA could not be used '
                            'in the worker process (its log says why)']
    else:
        assert warnings == []


def test_a_study_still_arriving_at_a_restart_waits_stable_after_again(tmp_path):
    """The node stopped while a study arrived (its last instance long ago by the clock): after the restart
    the study waits stable_after for the sender to resume, instead of being processed at once."""
    settings = make_settings(tmp_path, processing={"stable_after": 30.0})
    node = Node(settings)
    with node.sessions.begin() as s:
        record_instance(s, ReceivedInstance("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2",
                                            "1.2.840.10008.1.2.1", str(tmp_path / "x.dcm"), 1, "0" * 64))
        s.scalars(select(Job)).one().last_instance_at = utcnow() - dt.timedelta(hours=1)
    node.recover()
    with node.sessions.begin() as s:
        assert mark_stable_studies_ready(s, 30.0) == []
        job = s.scalars(select(Job)).one()
        assert job.state == "received" and utcnow() - job.last_instance_at < dt.timedelta(seconds=30)


def test_a_tick_still_running_is_skipped_without_a_warning_each_time(tmp_path, caplog):
    """A tick whose previous run still runs (an export waiting on a slow PACS) is skipped by design; the
    scheduler's warning about it, which would come at every tick, is not logged; other warnings are."""
    import logging
    import time

    node = Node(make_settings(tmp_path))
    runs: list[float] = []
    node.scheduler.add_job(lambda: (runs.append(time.monotonic()), time.sleep(1.0)), "interval", seconds=0.1,
                           id="slow")
    with caplog.at_level(logging.WARNING, logger="apscheduler"):
        node.scheduler.start()
        try:
            time.sleep(1.6)
        finally:
            node.scheduler.shutdown(wait=True)
        logging.getLogger("apscheduler.scheduler").warning("another warning")
    assert 1 <= len(runs) <= 2  # ticks were skipped while the first run slept
    messages = [r.getMessage() for r in caplog.records]
    assert "another warning" in messages
    assert not any("maximum number of running instances" in m for m in messages)


def test_a_stop_that_hangs_writes_where_each_thread_waits(tmp_path, monkeypatch, capfd):
    """An export stalled at a peer keeps a stop waiting (by design: the send in progress finishes); after
    STOP_REPORT_AFTER_S the node writes every thread's stack to stderr, so an administrator sees what it waits
    for; a stop that ends in time writes nothing."""
    import threading
    import time

    import node.service as service

    monkeypatch.setattr(service, "STOP_REPORT_AFTER_S", 0.3)
    node = Node(make_settings(tmp_path))
    node.scheduler.start()
    node.stop()
    assert "Thread" not in capfd.readouterr().err

    node = Node(make_settings(tmp_path))
    stalled = threading.Event()

    def export_stalled_at_the_peer() -> None:
        stalled.set()
        time.sleep(1.0)

    node.scheduler.add_job(export_stalled_at_the_peer, id="stalled")  # runs once, at once
    node.scheduler.start()
    assert stalled.wait(5)
    node.stop()
    err = capfd.readouterr().err
    assert "export_stalled_at_the_peer" in err and "stop" in err


def test_a_node_stops_where_stderr_has_no_file_descriptor(tmp_path, capsys):
    """An embedding host or a test's capture may replace sys.stderr with a stream without a file descriptor:
    the stop report then goes to the original standard error, and the stop itself never fails for it."""
    import sys

    with pytest.raises(Exception):
        sys.stderr.fileno()  # capsys: a stream in memory
    node = Node(make_settings(tmp_path))
    node.scheduler.start()
    node.stop()
    assert not node.scheduler.running
