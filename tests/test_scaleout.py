"""Two full nodes on one PostgreSQL database and one storage folder, studies sent to both listeners by DCMTK
storescu: a restart of one node leaves the other's running job alone; the loss of a node (its process group
killed) while it holds a job is taken over by the other after the lease, and every result reaches the
destination exactly once. Both nodes' /metrics show the counts."""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from sqlalchemy import select

from node.db import open_database
from node.db.schema import Event, Export, Job, Study
from node.demo import Receiver
from node.phantom import make_phantom, write_phantom_study
from tests.nodes import NodeProcess, write_config
from tests.peers import free_port, storescu
from tests.util import wait_for

pytestmark = [pytest.mark.peer, pytest.mark.slow]

LEASE_S = 4.0
CHECK_S = 0.25
STUDIES_PER_NODE = 2


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[Path]:
    """Small phantom studies (one folder each): seconds of threshold-engine processing."""
    root = tmp_path_factory.mktemp("studies")
    folders = []
    for i in range(2 * STUDIES_PER_NODE):
        phantom = make_phantom(rows=96, cols=96, slices=16, pixel_spacing=3.5, slice_spacing=10.0, seed=20 + i)
        write_phantom_study(phantom, root / f"s{i}")
        folders.append(root / f"s{i}")
    return folders


class Member:
    """One node of the pair: its configuration, process and HTTP port."""

    def __init__(self, tmp_path: Path, name: str, db_url: str, shared: Path, pacs_port: int):
        self.name, self.port, self.http_port = name, free_port(), free_port()
        cfg = write_config(tmp_path / name, self.port, pacs_port, stable_after=1.0, storage=shared,
                           database_url=db_url, node={"name": name},
                           processing={"check_interval": CHECK_S, "lease_s": LEASE_S, "max_attempts": 3},
                           http={"port": self.http_port})
        self.process = NodeProcess(cfg, self.port)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            body = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}


def send_all(studies: list[Path], a: Member, b: Member) -> None:
    """Half the studies to each listener, both at once, one storescu per study."""
    results: list[int] = []

    def send(folder: Path, port: int) -> None:
        results.append(storescu("127.0.0.1", port, folder, calling_aet="MODALITY").returncode)

    threads = [threading.Thread(target=send, args=(folder, (a, b)[i % 2].port)) for i, folder in enumerate(studies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [0] * len(studies)


def test_two_nodes_restart_and_failover(tmp_path, studies, postgres_url):
    sessions = open_database(postgres_url)  # the schema first, as `ctnode db upgrade` would
    shared = tmp_path / "shared"  # the storage root both nodes mount
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        a, b = (Member(tmp_path, name, postgres_url, shared, pacs.port) for name in ("a", "b"))
        a.process.start()
        b.process.start()
        try:
            send_all(studies, a, b)

            def held_by(name: str) -> Job | None:
                with sessions() as s:
                    return s.scalars(select(Job).where(Job.state == "processing", Job.worker_pid.is_not(None),
                                                       Job.owner.startswith(f"{name}/"))).first()

            # b's worker is paused mid-job (b itself keeps renewing the lease), and a restarts meanwhile
            job = wait_for(lambda: held_by("b"), 60, "a job processing on b")
            os.kill(job.worker_pid, signal.SIGSTOP)
            try:
                a.process.kill_all()
                a.process.start()
                time.sleep(LEASE_S + 4 * CHECK_S)  # past the lease's first expiry: renewed, so not taken over
                with sessions() as s:
                    now = s.get(Job, job.id)
                    assert (now.state, now.owner, now.attempts) == ("processing", job.owner, job.attempts)
                    assert now.lease_until > job.lease_until  # b's heartbeat renewed it
                # b is lost with its paused worker while it holds the job: a takes it over after the lease
                b.process.kill_all()
                lost_at = time.monotonic()
            finally:
                if b.process.proc.poll() is None:
                    os.kill(job.worker_pid, signal.SIGCONT)

            def takeover() -> Event | None:
                with sessions() as s:
                    return s.scalars(select(Event).where(Event.kind == "lease_takeover",
                                                         Event.job_id == job.id)).first()

            event = wait_for(takeover, LEASE_S + 30, "a to take over b's job")
            took = time.monotonic() - lost_at
            assert event.detail.startswith(f"job {job.id} from {job.owner} by a/")
            assert took <= LEASE_S + 2 * CHECK_S + 3.0, f"takeover after {took:.1f} s"

            def all_sent() -> bool:
                with sessions() as s:
                    jobs = s.scalars(select(Job)).all()
                    sent = s.scalars(select(Export).where(Export.state == "sent")).all()
                    return len(jobs) == len(studies) and all(j.state == "done" for j in jobs) and \
                        len(sent) == 2 * len(studies)

            wait_for(all_sent, 180, "every study processed and exported")
            time.sleep(2)  # a duplicate send would show up now
            metrics = a.metrics()
        finally:
            a.process.stop()
            b.process.stop()

    received = [dcmread(p, stop_before_pixels=True) for p in pacs.received]
    sops = [str(ds.SOPInstanceUID) for ds in received]
    assert len(sops) == len(set(sops)) == 2 * len(studies)  # every result exactly once
    with sessions() as s:
        uids = set(s.scalars(select(Study.study_instance_uid)))
        assert sorted((str(ds.StudyInstanceUID), ds.Modality) for ds in received) == sorted(
            (uid, modality) for uid in uids for modality in ("SEG", "SR"))
        taken = s.get(Job, job.id)
        assert taken.attempts == job.attempts + 1 and taken.state == "done"
        claimers = {e.detail.rsplit(", ", 1)[1].split("/")[0]
                    for e in s.scalars(select(Event).where(Event.kind == "job_processing"))}
        assert claimers == {"a", "b"}  # both nodes processed
    print(f"\nlease takeover {took:.1f} s after the node was lost (lease {LEASE_S:g} s, poll {CHECK_S:g} s)")
    assert metrics[("ctnode_studies_received_total", ())] == len(studies)
    assert metrics[("ctnode_jobs", (("state", "done"),))] == len(studies)
    assert metrics[("ctnode_exports", (("state", "sent"),))] == 2 * len(studies)
    assert metrics[("ctnode_lease_takeovers_total", ())] == 1
