"""The running node: listener + in-process scheduler (APScheduler) + worker processes.

``node.roles`` says which parts one process runs (all three by default, one node): ``listener`` (the DICOM
listener, readiness, agreements, retention, spool recovery), ``worker`` (dispatch) and ``exporter``
(exports); several processes on several hosts may share one PostgreSQL database and one storage root
(docs/scaling.md), coordinated only by the database's claims (:mod:`node.lease`).

Scheduler jobs, each small and idempotent (the database holds all state):
- ``readiness``: received -> ready once a study has been stable for ``processing.stable_after`` seconds;
- ``heartbeat``: renew the leases of the jobs and exports this process holds (:mod:`node.lease`);
- ``dispatch``: reap finished/dead/overdue workers, release jobs whose lease expired (their process died),
  then claim ready jobs and start a worker process for each (up to ``processing.workers``);
- ``exports``: send due exports (retry with backoff, dead-letter);
- ``agreements``: compare reference SEGs received with the node's results (:mod:`node.agreement`);
- ``retention``: remove spool files of finished studies after ``storage.retention_days``.
"""
from __future__ import annotations

import datetime as dt
import faulthandler
import io
import logging
import multiprocessing as mp
import signal
import sys
import threading
import time
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from node.config import ConfigError, Settings
from node.agreement import compute_pending
from node.db import open_database
from node.db.schema import Instance, Job, ReferenceSeg, utcnow
from node.db.states import JOB_FINISHED, JOB_UNFINISHED, JobState, ReferenceState, transition
from node.export import run_exports
from node.health import HealthServer, node_checks
from node.listener import Listener
from node.metrics import NodeMetrics
from node.recovery import recover_orphans
from node.lease import this_process
from node.registry import (claim_next_job, mark_stable_studies_ready, release_job, release_lost_exports,
                           release_lost_jobs, renew_leases, set_job_state)
from node.security import restrict_sqlite_files
from node.spool import make_private_dirs
from node.worker import worker_main

log = logging.getLogger(__name__)

STOP_REPORT_AFTER_S = 15.0  # a stop still under way then writes every thread's stack to stderr (what it waits for)


@dataclass
class _Running:
    process: mp.Process
    attempt: int
    started: float


class BusyTickFilter(logging.Filter):
    """Drops APScheduler's warning that a tick was skipped because the previous run of that job still runs
    (an export waiting on a slow PACS, say): with ``max_instances = 1`` that is by design, and the warning
    would come every ``check_interval`` for as long as the run lasts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


SCHEDULER_LOG = logging.getLogger("apscheduler.scheduler")


class Node:
    def __init__(self, settings: Settings):
        self.settings = settings
        if not any(isinstance(f, BusyTickFilter) for f in SCHEDULER_LOG.filters):
            SCHEDULER_LOG.addFilter(BusyTickFilter())
        for d in (settings.spool_dir, settings.results_dir):
            make_private_dirs(d)  # 0700: patient data (the disk guard watches the spool's filesystem)
        self.sessions = open_database(settings.storage.database_url)
        restrict_sqlite_files(settings.storage.database_url)  # 0600 database, WAL and SHM files
        self.roles = frozenset(settings.node.roles)
        self.metrics = NodeMetrics(self.sessions, settings.spool_dir)
        self.listener = (Listener(settings, self.sessions, on_event=self.metrics.listener_event)
                         if "listener" in self.roles else None)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        self.running: dict[int, _Running] = {}
        self.stopping = threading.Event()  # set by stop(): no more claims; workers that end were stopped
        self.owner = this_process(settings)  # written on every job and export this process claims
        self.http: HealthServer | None = None  # /healthz, /readyz, /metrics once started ([http])
        self._mp = mp.get_context("spawn")  # a clean interpreter: no listener threads or sockets inherited

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.start_http()
        self.recover()
        every = self.settings.processing.check_interval
        if self.listener is not None:
            self.listener.start()
            self.scheduler.add_job(self.tick_readiness, "interval", seconds=every, id="readiness")
            self.scheduler.add_job(self.tick_agreements, "interval", seconds=max(every, 1.0), id="agreements")
            self.scheduler.add_job(self.tick_retention, "interval", hours=1, id="retention",
                                   next_run_time=dt.datetime.now() + dt.timedelta(seconds=5))
        if self.roles & {"worker", "exporter"}:
            self.scheduler.add_job(self.tick_heartbeat, "interval", seconds=every, id="heartbeat")
        if "worker" in self.roles:
            self.scheduler.add_job(self.tick_dispatch, "interval", seconds=every, id="dispatch")
        if "exporter" in self.roles:
            self.scheduler.add_job(self.tick_exports, "interval", seconds=every, id="exports")
        self.scheduler.start()
        log.info("node %s started: %s", self.owner, ", ".join(r for r in self.settings.node.roles))

    def start_http(self) -> None:
        h = self.settings.http
        if not h.enabled:
            return
        try:
            checks = node_checks(self.settings, self.sessions, self.roles)
            self.http = HealthServer(h.host, h.port, self.metrics, checks)
        except OSError as exc:
            raise ConfigError(f"http.port: cannot listen on {h.host}:{h.port}: {exc} "
                              "(choose another http.port, or set http.enabled = false)") from None
        self.http.start()
        log.info("health and metrics on http://%s:%d/ (/healthz, /readyz, /metrics)", h.host, self.http.port)

    def stop(self) -> None:
        """Stop accepting associations and claiming work, let the tick under way end (an export in progress
        finishes), end the workers and record what they leave behind. A stop that takes longer than
        ``STOP_REPORT_AFTER_S`` (a stalled peer, a database lock) writes every thread's stack to stderr."""
        self.stopping.set()  # first: a worker ending from the same SIGTERM is not retried here
        began = time.monotonic()
        _report_stacks_after(STOP_REPORT_AFTER_S)
        try:
            if self.http is not None:
                self.http.stop()
            if self.listener is not None:
                self.listener.stop()
            if self.scheduler.running:
                self.scheduler.shutdown(wait=True)
            for job_id, run in list(self.running.items()):
                run.process.terminate()
                run.process.join(10)
            self.tick_reap()  # record what the stopped workers leave behind
        finally:
            faulthandler.cancel_dump_traceback_later()
        log.info("stopped in %.1f s", time.monotonic() - began)

    def recover(self) -> None:
        """After a restart: spool files without a row are registered (:mod:`node.recovery`), jobs still
        collecting instances wait ``stable_after`` from now (their senders were cut off by the restart and
        may resume: a partly received study is not processed at once), and the jobs and exports an earlier run
        of this node held are released (its workers died with it); claims of other live processes sharing
        the database are left alone, and expired ones are taken over (:func:`node.registry.release_lost_jobs`)."""
        with self.sessions.begin() as session:
            if self.listener is not None:
                recovered = recover_orphans(session, self.settings.files)
                if recovered:
                    log.warning("registered %d spool file(s) that had no database row", recovered)
                now = utcnow()
                for job in session.scalars(select(Job).where(Job.state == JobState.RECEIVED)):
                    job.last_instance_at = now  # a study still arriving: its sender may resume after the restart
            if "worker" in self.roles:
                taken = release_lost_jobs(session, self.owner, self.settings.processing.max_attempts)
                self.metrics.lease_takeovers.labels("job").inc(len(taken))
            if "exporter" in self.roles:
                release_lost_exports(session, self.owner)

    # -- ticks ------------------------------------------------------------------------------------------
    def tick_heartbeat(self) -> None:
        """Renew the leases of the jobs this process's workers run and of the exports it is sending."""
        with self.sessions.begin() as session:
            renew_leases(session, str(self.owner), self.settings.processing.lease_s,
                         list(self.running.copy()))  # a copy: the dispatch thread changes it

    def tick_readiness(self) -> None:
        with self.sessions.begin() as session:
            mark_stable_studies_ready(session, self.settings.processing.stable_after)

    def tick_reap(self) -> None:
        """Record the end of every worker that has ended (or is overdue: killed, its job failed); a job whose
        worker ended without committing an outcome is ready again (after :meth:`stop`: the node stopped it)."""
        p = self.settings.processing
        stopping = self.stopping.is_set()
        for job_id, run in list(self.running.items()):
            overdue = time.monotonic() - run.started > p.job_timeout
            if run.process.is_alive() and not overdue:
                continue
            if overdue and run.process.is_alive():
                run.process.kill()
            run.process.join(5)
            del self.running[job_id]
            seconds = time.monotonic() - run.started
            with self.sessions.begin() as session:
                job = session.get(Job, job_id)
                if job is not None and job.state in JOB_FINISHED and job.attempts == run.attempt:
                    self.metrics.job_seconds.labels(job.state.value).observe(seconds)
                    if job.result is not None:
                        self.metrics.stages(job.result.timings)
                if job is None or job.state != JobState.PROCESSING or job.attempts != run.attempt:
                    continue  # the worker committed its outcome
                if overdue:
                    set_job_state(session, job, JobState.FAILED, f"processing took longer than {p.job_timeout:g} s")
                    self.metrics.job_seconds.labels(JobState.FAILED.value).observe(seconds)
                else:
                    code = run.process.exitcode
                    why = ("the node was stopped while its worker ran" if stopping else
                           f"worker died (exit code {code}" + (", killed: out of memory?" if code == -9 else "") + ")")
                    release_job(session, job, why, p.max_attempts)

    def tick_dispatch(self) -> None:
        self.tick_reap()
        p = self.settings.processing
        with self.sessions.begin() as session:
            taken = release_lost_jobs(session, self.owner, p.max_attempts)  # leases of dead processes
        self.metrics.lease_takeovers.labels("job").inc(len(taken))
        while len(self.running) < p.workers and not self.stopping.is_set():
            with self.sessions.begin() as session:
                job = claim_next_job(session, p.lease_s, owner=str(self.owner))
                if job is None:
                    return
                job_id, attempt = job.id, job.attempts
            proc = self._mp.Process(target=worker_main, args=(self.settings, job_id, attempt,
                                                              logging.getLogger().getEffectiveLevel()),
                                    name=f"ctnode-worker-{job_id}", daemon=True)
            proc.start()
            self.running[job_id] = _Running(proc, attempt, time.monotonic())
            with self.sessions.begin() as session:
                session.get(Job, job_id).worker_pid = proc.pid

    def tick_exports(self) -> None:
        run_exports(self.settings, self.sessions, str(self.owner),
                    on_attempt=lambda outcome: self.metrics.export_attempts.labels(outcome).inc(),
                    on_takeover=self.metrics.lease_takeovers.labels("export").inc)

    def tick_agreements(self) -> None:
        """Dice and volume agreement for reference SEGs that are pending or waiting for a node result."""
        compute_pending(self.sessions, self.settings.files)

    def tick_retention(self) -> None:
        """Delete spool files of studies finished more than ``retention_days`` ago, and stale temp files."""
        cutoff = utcnow() - dt.timedelta(days=self.settings.storage.retention_days)
        with self.sessions.begin() as session:
            # A study is kept while any of its versions is unfinished or finished recently: later versions
            # process all instances of the study cumulatively.
            recent = select(Job.study_id).where(
                (Job.state.in_(JOB_UNFINISHED)) | (Job.finished_at >= cutoff))
            rows = session.scalars(select(Instance).where(
                Instance.purged_at.is_(None), Instance.study_id.not_in(recent)).limit(10000))
            for inst in rows:
                self.settings.files.spool_file(inst.path).unlink(missing_ok=True)
                inst.purged_at = utcnow()
            # Reference SEGs: the file goes after the same time; the comparison results stay. One that never
            # found a node result is given up (expired).
            refs = session.scalars(select(ReferenceSeg).where(
                ReferenceSeg.path != "", ReferenceSeg.received_at < cutoff).limit(10000))
            for ref in refs:
                self.settings.files.spool_file(ref.path).unlink(missing_ok=True)
                ref.path = ""
                if ref.state in (ReferenceState.PENDING, ReferenceState.UNMATCHED):
                    transition(ref, ReferenceState.EXPIRED)
                    ref.reason = f"no node result within {self.settings.storage.retention_days:g} days"
        for tmp in self.settings.spool_dir.rglob(".*.tmp"):
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink(missing_ok=True)

    # -- convenience for the CLI, the demo and tests ------------------------------------------------------
    def serve_forever(self) -> None:
        """Run until SIGTERM (``systemctl stop``, ``kill``) or Ctrl-C, then stop cleanly (:meth:`stop`): no new
        associations, the export in progress finishes, so nothing a peer confirmed is sent again after a
        restart; a running job is ready again at once. A second SIGTERM is ignored (systemd's SIGKILL after
        ``TimeoutStopSec`` ends a stop that hangs on a stalled peer) by a handler, not ``SIG_IGN``: a worker
        started in the meantime must not inherit an ignored SIGTERM."""
        self.start()
        signal.signal(signal.SIGTERM, _stop_requested)
        try:
            while True:
                time.sleep(3600)
        except (KeyboardInterrupt, StopRequested) as exc:
            log.info("stopping (%s)", "SIGTERM" if isinstance(exc, StopRequested) else "interrupted")
            signal.signal(signal.SIGTERM, _ignored)
        finally:
            self.stop()


def _report_stacks_after(seconds: float) -> None:
    """Have faulthandler write every thread's stack to the process's standard error after ``seconds`` (until
    cancelled); it needs a file descriptor, which a replaced ``sys.stderr`` (an embedding host, a test's
    capture) may lack: then the original one, and without either no report."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            faulthandler.dump_traceback_later(seconds, file=stream)
            return
        except (AttributeError, ValueError, RuntimeError, io.UnsupportedOperation):
            continue


class StopRequested(Exception):
    """SIGTERM reached the serving process."""


def _stop_requested(signum: int, frame: object) -> None:
    raise StopRequested


def _ignored(signum: int, frame: object) -> None:
    """SIGTERM while stopping: already under way."""
