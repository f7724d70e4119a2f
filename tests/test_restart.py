"""Restart safety: the node killed with SIGKILL mid-study and mid-processing loses nothing and sends once;
stopped with SIGTERM mid-export it finishes the send first."""
from __future__ import annotations

import threading
import time

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.db import open_database
from node.db.schema import Export, Instance, Job, Result
from node.demo import Receiver, free_port, send_study
from tests.nodes import NodeProcess, write_config
from tests.util import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def phantom_files(tmp_path):
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=192, cols=192, slices=60, pixel_spacing=2.0, slice_spacing=5.0, seed=3)
    return write_phantom_study(phantom, tmp_path / "study")


def test_sigkill_mid_study_and_mid_processing(tmp_path, phantom_files):
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        port = free_port()  # after the receiver took its port, so the two cannot collide
        cfg = write_config(tmp_path, port, pacs.port)
        node = NodeProcess(cfg, port)
        sessions = open_database(f"sqlite:///{tmp_path / 'ctnode.db'}")
        node.start()
        try:
            half = len(phantom_files) // 2
            assert send_study(phantom_files[:half], "127.0.0.1", port, "CTNODE", progress=False) == half
            node.kill()  # mid-study: half acknowledged, the study not yet stable
            node.start()
            assert send_study(phantom_files[half:], "127.0.0.1", port, "CTNODE", progress=False) == len(phantom_files) - half

            def processing():
                with sessions() as s:
                    return s.scalars(select(Job).where(Job.state == "processing")).first()

            wait_for(processing, 60, "the job to start processing")
            node.kill()  # mid-processing
            node.start()

            def done():
                with sessions() as s:
                    job = s.scalars(select(Job)).one()
                    sent = s.scalars(select(Export).where(Export.state == "sent")).all()
                    return job.state == "done" and len(sent) == 2

            wait_for(done, 180, "the job to be done and both objects exported")
            time.sleep(2)  # give a stray worker or a duplicate export the chance to show up
        finally:
            node.stop()
        with sessions() as s:
            jobs = s.scalars(select(Job)).all()
            assert len(jobs) == 1 and jobs[0].attempts == 2  # one version; retried once after the kill
            assert len(s.scalars(select(Instance)).all()) == len(phantom_files)
            assert len(s.scalars(select(Result)).all()) == 1
        received = [dcmread(p, stop_before_pixels=True) for p in pacs.received]
        assert sorted(ds.Modality for ds in received) == ["SEG", "SR"]  # each exported exactly once
        seg = next(ds for ds in received if ds.Modality == "SEG")
        source_sops = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom_files}
        referenced = {str(item.ReferencedSOPInstanceUID)
                      for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == source_sops  # every acknowledged instance went into the one result


class SlowPacs(Receiver):
    """A destination that takes ``delay`` seconds to confirm each object; :attr:`receiving` is set when the
    first one arrives."""

    def __init__(self, folder, delay: float):
        super().__init__(folder, ae_title="PACS")
        self.delay, self.receiving = delay, threading.Event()

    def _on_store(self, event) -> int:
        self.receiving.set()
        time.sleep(self.delay)
        return super()._on_store(event)


def started_node(tmp_path, pacs_port: int):
    """A running ``ctnode serve`` (studies stable after 1 s) exporting to ``pacs_port``: (process, its DICOM
    port, its database)."""
    port = free_port()  # after the destination took its port, so the two cannot collide
    node = NodeProcess(write_config(tmp_path, port, pacs_port, stable_after=1.0), port)
    sessions = open_database(f"sqlite:///{tmp_path / 'ctnode.db'}")
    node.start()
    return node, port, sessions


def test_sigterm_mid_export_finishes_the_send_and_never_resends(tmp_path):
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=64, cols=64, slices=12, pixel_spacing=5.0, slice_spacing=12.0, seed=5)
    files = write_phantom_study(phantom, tmp_path / "study")
    with SlowPacs(tmp_path / "pacs", delay=2.0) as pacs:
        node, port, sessions = started_node(tmp_path, pacs.port)
        try:
            assert send_study(files, "127.0.0.1", port, "CTNODE", progress=False) == len(files)
            assert pacs.receiving.wait(120), "the node never started sending"
            node.stop()  # SIGTERM (systemctl stop) while the destination is still confirming the first object
            assert node.proc.returncode == 0  # a clean stop, not death by the signal
            with sessions() as s:
                assert sorted(e.state for e in s.scalars(select(Export))) == ["sent", "sent"]  # the send finished
            node.start()
            time.sleep(3)  # a resend after the restart would arrive now
        finally:
            node.stop()
    assert sorted(dcmread(p, stop_before_pixels=True).Modality for p in pacs.received) == ["SEG", "SR"]


def test_sigterm_mid_processing_releases_the_job_and_says_why(tmp_path, phantom_files):
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        node, port, sessions = started_node(tmp_path, pacs.port)
        try:
            assert send_study(phantom_files, "127.0.0.1", port, "CTNODE", progress=False) == len(phantom_files)

            def processing():
                with sessions() as s:
                    return s.scalars(select(Job).where(Job.state == "processing")).first()

            wait_for(processing, 60, "the job to start processing")
            node.stop()  # SIGTERM mid-processing
            assert node.proc.returncode == 0
            with sessions() as s:
                job = s.scalars(select(Job)).one()
                assert (job.state, job.owner, job.attempts) == ("ready", None, 1)  # not claimed again while stopping
                assert job.reason == "retry after: the node was stopped while its worker ran"
            node.start()
            wait_for(lambda: len(pacs.received) == 2, 180, "the job done and both objects exported after the restart")
        finally:
            node.stop()
        with sessions() as s:
            assert s.scalars(select(Job)).one().attempts == 2
