"""Prometheus metrics of a node process (``prometheus-client``), served on ``/metrics`` by :mod:`node.health`.

Counts of what the database holds (studies, instances, jobs and exports by state, the oldest ready job)
are read at each scrape, so every process sharing the database reports the same cluster-wide figures; what
only this process sees (job durations of the workers it ran, leases it took over) are its own counters.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.schema import Export, Instance, Job, Study, utcnow
from node.db.states import ExportState, JobState

#: Job duration buckets (seconds): a small study on the CPU takes seconds, a 512x512x300 one minutes.
DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, float("inf"))
#: Stage buckets (seconds): from a fraction of a second (SR) to the lung segmentation of a large study.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, float("inf"))


class DatabaseCollector(Collector):
    """Cluster-wide figures, read from the database at scrape time."""

    def __init__(self, sessions: sessionmaker[Session], storage: Path):
        self.sessions, self.storage = sessions, storage

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self.sessions() as s:
            studies = s.scalar(select(func.count()).select_from(Study))
            instances = s.scalar(select(func.count()).select_from(Instance))
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            exports = dict(s.execute(select(Export.state, func.count()).group_by(Export.state)).all())
            oldest_ready = s.scalar(select(func.min(Job.updated_at)).where(Job.state == JobState.READY))
        yield CounterMetricFamily("ctnode_studies_received", "Studies received (all processes)", value=studies)
        yield CounterMetricFamily("ctnode_instances_received", "Instances received and recorded (all processes)",
                                  value=instances)
        by_state = GaugeMetricFamily("ctnode_jobs", "Jobs (study versions) by state", labels=["state"])
        for state in JobState:
            by_state.add_metric([state.value], jobs.get(state, 0))
        yield by_state
        by_state = GaugeMetricFamily("ctnode_exports", "Exports (object x destination) by state", labels=["state"])
        for state in ExportState:
            by_state.add_metric([state.value], exports.get(state, 0))
        yield by_state
        age = (utcnow() - oldest_ready).total_seconds() if oldest_ready is not None else 0.0
        yield GaugeMetricFamily("ctnode_oldest_ready_job_age_seconds",
                                "Seconds the oldest ready job has waited for a worker (0: none waiting)", value=age)
        yield GaugeMetricFamily("ctnode_storage_free_bytes", "Free bytes on the storage (spool) filesystem",
                                value=shutil.disk_usage(self.storage).free)


class NodeMetrics:
    """The metrics of one node process, in a registry of its own (several nodes may share a test process)."""

    def __init__(self, sessions: sessionmaker[Session], storage: Path):
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(sessions, storage))
        self.job_seconds = Histogram("ctnode_job_duration_seconds",
                                     "Seconds from claim to outcome of the jobs this process's workers ran",
                                     ["outcome"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.lease_takeovers = Counter("ctnode_lease_takeovers", "Claims this process took over after another "
                                       "process's lease expired: jobs it released, exports it claimed",
                                       ["claim"], registry=self.registry)
        for claim in ("job", "export"):
            self.lease_takeovers.labels(claim)  # both series from the start, at 0
        self.stage_seconds = Histogram("ctnode_stage_seconds", "Seconds per processing stage of the done jobs "
                                       "this process's workers ran (their results' timings)", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.export_attempts = Counter("ctnode_export_attempts", "Export attempts by this process, by outcome",
                                       ["outcome"], registry=self.registry)
        self.listener_events = Counter("ctnode_listener_events", "Audit events of this process's listener "
                                       "(associations accepted, rejected, aborted; instances refused; ...)",
                                       ["kind"], registry=self.registry)
        self.instances_refused = Counter("ctnode_instances_refused", "Instances this process's listener refused, "
                                         "by DICOM status", ["status"], registry=self.registry)

    def listener_event(self, kind: str, detail: str) -> None:
        """Count one audit event of the listener (``node.listener.Listener.on_event``)."""
        self.listener_events.labels(kind).inc()
        if kind == "instance_refused":
            self.instances_refused.labels(detail.split(" ", 1)[0]).inc()  # the detail starts with "0xA700"

    def stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if isinstance(seconds, (int, float)):
                self.stage_seconds.labels(stage).observe(seconds)
