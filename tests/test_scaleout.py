"""Two full nodes and a worker-only process on one PostgreSQL database and one storage folder, studies sent to
both listeners by DCMTK storescu: a restart of one node leaves another process's running job alone; the loss
of a process (its process group killed) while it holds a job is taken over by another after the lease, and
every result reaches the destination exactly once. /metrics shows the counts."""
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
    """One process of the cluster: its configuration, process and ports (a worker-only one is up when its
    HTTP port answers)."""

    def __init__(self, tmp_path: Path, name: str, db_url: str, shared: Path, pacs_port: int,
                 roles: tuple[str, ...] = ("listener", "worker", "exporter")):
        self.name, self.port, self.http_port = name, free_port(), free_port()
        cfg = write_config(tmp_path / name, self.port, pacs_port, stable_after=1.0, storage=shared,
                           database_url=db_url, node={"name": name, "roles": list(roles)},
                           processing={"check_interval": CHECK_S, "lease_s": LEASE_S, "max_attempts": 3},
                           http={"port": self.http_port})
        self.process = NodeProcess(cfg, self.port if "listener" in roles else self.http_port)

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


def test_two_nodes_and_a_worker_restart_and_failover(tmp_path, studies, postgres_url):
    sessions = open_database(postgres_url)  # the schema first, as `ctnode db upgrade` would
    shared = tmp_path / "shared"  # the storage root every process mounts
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        a, b = (Member(tmp_path, name, postgres_url, shared, pacs.port) for name in ("a", "b"))
        w = Member(tmp_path, "w", postgres_url, shared, pacs.port, roles=("worker",))
        members = {m.name: m for m in (a, b, w)}
        for m in members.values():
            m.process.start()
        try:
            send_all(studies, a, b)

            def held_elsewhere() -> Job | None:
                with sessions() as s:
                    return s.scalars(select(Job).where(Job.state == "processing", Job.worker_pid.is_not(None),
                                                       ~Job.owner.startswith("a/"))).first()

            # a job's worker on b or w is paused mid-job (its process keeps renewing the lease); a restarts
            job = wait_for(held_elsewhere, 60, "a job processing on b or w")
            holder = members[job.owner.split("/")[0]]
            os.kill(job.worker_pid, signal.SIGSTOP)
            try:
                a.process.kill_all()
                a.process.start()
                time.sleep(LEASE_S + 4 * CHECK_S)  # past the lease's first expiry: renewed, so not taken over
                with sessions() as s:
                    now = s.get(Job, job.id)
                    assert (now.state, now.owner, now.attempts) == ("processing", job.owner, job.attempts)
                    assert now.lease_until > job.lease_until  # the holder's heartbeat renewed it
                # the holder is lost with its paused worker while it holds the job: another takes it over
                holder.process.kill_all()
                lost_at = time.monotonic()
            finally:
                if holder.process.proc.poll() is None:
                    os.kill(job.worker_pid, signal.SIGCONT)

            def takeover() -> Event | None:
                with sessions() as s:
                    return s.scalars(select(Event).where(Event.kind == "lease_takeover",
                                                         Event.job_id == job.id)).first()

            event = wait_for(takeover, LEASE_S + 30, "another process to take the job over")
            took = time.monotonic() - lost_at
            assert event.detail.startswith(f"job {job.id} from {job.owner} by ")
            assert event.detail.split(" by ")[1].split("/")[0] in set(members) - {holder.name}
            assert took <= LEASE_S + 2 * CHECK_S + 3.0, f"takeover after {took:.1f} s"

            def all_sent() -> bool:
                with sessions() as s:
                    jobs = s.scalars(select(Job)).all()
                    sent = s.scalars(select(Export).where(Export.state == "sent")).all()
                    return len(jobs) == len(studies) and all(j.state == "done" for j in jobs) and \
                        len(sent) == 2 * len(studies)

            wait_for(all_sent, 180, "every study processed and exported")
            time.sleep(2)  # a duplicate send would show up now
            alive = [m for m in members.values() if m is not holder]
            scraped = {m.name: m.metrics() for m in alive}
        finally:
            for m in members.values():
                m.process.stop()

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
        assert holder.name in claimers and claimers <= set(members)
    print(f"\nlease takeover {took:.1f} s after {holder.name} was lost (lease {LEASE_S:g} s, poll {CHECK_S:g} s); "
          f"jobs claimed by {sorted(claimers)}")
    for metrics in scraped.values():  # the same cluster-wide figures from every process, the worker-only one too
        assert metrics[("ctnode_studies_received_total", ())] == len(studies)
        assert metrics[("ctnode_jobs", (("state", "done"),))] == len(studies)
        assert metrics[("ctnode_exports", (("state", "sent"),))] == 2 * len(studies)
    assert sum(m[("ctnode_lease_takeovers_total", ())] for m in scraped.values()) == 1
