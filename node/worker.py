"""The worker process: processes one job, records its result, queues its exports.

It runs in its own process (``multiprocessing`` spawn) so that a crash or an out-of-memory kill while
processing a study cannot take the listener down. Its final commit is guarded by the job's attempt number:
if the node released the job meanwhile (restart, lease expiry), the stale worker's result is discarded.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path

from node.config import Settings
from node.db import open_database
from node.db.schema import Export, Job
from node.db.states import JobState
from node.logredact import install_log_redaction
from node.registry import (add_event, instance_paths_for_job, reference_paths_for_study, release_job,
                           set_job_state)
from node.results import result_row

log = logging.getLogger(__name__)


TORCH_ALLOCATION_FAILURES = ("can't allocate memory", "CUDA out of memory")  # torch raises RuntimeError


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: numpy's MemoryError, or torch's RuntimeError from its CPU or CUDA allocator
    (the lung and infection networks allocate through torch)."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in TORCH_ALLOCATION_FAILURES))


def _exit_with_parent() -> None:
    """End this process when the node that started it dies (so a killed node leaves no stray worker)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def process_job(settings: Settings, job_id: int, attempt: int) -> str:
    """Process ``job_id`` (already claimed as ``attempt``) and commit its outcome; returns the final state."""
    from node.processing import analyse_with, write_outputs

    sessions = open_database(settings.storage.database_url, migrate=False)
    with sessions() as session:
        job = session.get(Job, job_id)
        study_uid, version = job.study.study_instance_uid, job.version
        paths = [settings.files.spool_file(p) for p in instance_paths_for_job(session, job)]
        lobe_maps = [p for p in map(settings.files.spool_file, reference_paths_for_study(session, job.study_id))
                     if p.exists()]
    unreadable = unreadable_files(paths)
    if unreadable:  # e.g. the shared storage is not mounted on this host: another attempt, maybe elsewhere
        path, why = unreadable[0]
        reason = (f"{len(unreadable)} of {len(paths)} instance file(s) cannot be read on {socket.gethostname()} "
                  f"(first: {path}: {why}); is the storage root mounted here?")
        log.error("job %d: %s", job_id, reason)
        with sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is not None and job.state == JobState.PROCESSING and job.attempts == attempt:
                release_job(session, job, reason, settings.processing.max_attempts)
                return job.state
        return "discarded"
    started = time.perf_counter()
    out: dict[str, Path] = {}
    try:
        analysis = analyse_with(settings.processing, paths, lobe_maps=lobe_maps)
        if analysis.status == "done":
            out = write_outputs(analysis, settings.results_dir / study_uid / f"v{version}")
        state, reason = JobState(analysis.status), analysis.reason
    except Exception as exc:
        analysis, state = None, JobState.FAILED
        tb = traceback.format_exc()
        if out_of_memory(exc):  # a real allocation failure under processing.worker_memory_gb: not retried
            log.exception("job %d ran out of memory", job_id)
            reason = (f"out of memory: the study needs more than processing.worker_memory_gb = "
                      f"{settings.processing.worker_memory_gb:g} GB")
        else:
            log.exception("job %d failed", job_id)
            reason = f"{type(exc).__name__}: {exc}"
    else:
        tb = ""
    elapsed = time.perf_counter() - started
    engine = getattr(getattr(analysis, "pipeline", None), "engine", None)  # None if it did not get that far

    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.PROCESSING or job.attempts != attempt:
            log.warning("job %d was released while this worker ran; its result is discarded", job_id)
            return "discarded"
        if analysis is not None and analysis.pipeline is not None:
            session.add(result_row(job.id, analysis, out, settings.files))
        if state == JobState.DONE:
            for dest in settings.destinations:
                for key, ds in analysis.objects():
                    session.add(Export(job_id=job.id, destination=dest.name, sop_instance_uid=str(ds.SOPInstanceUID),
                                       path=settings.files.results_name(out[key])))
        set_job_state(session, job, state, reason)
        device = getattr(engine, "device", "")
        if settings.processing.device == "cuda" and device.startswith("cpu"):
            add_event(session, "engine_on_cpu", f'processing.device is "cuda" but the engine ran on {device}: '
                      "CUDA could not be used in the worker process (its log says why)",
                      study_uid=study_uid, job_id=job.id)
        if analysis is not None and analysis.engine_fallback:
            add_event(session, "engine_fallback", analysis.engine_fallback, study_uid=study_uid, job_id=job.id)
        if tb:
            add_event(session, "job_traceback", tb, study_uid=study_uid, job_id=job.id)
        add_event(session, "job_elapsed", f"{state} in {elapsed:.1f} s", study_uid=study_uid, job_id=job.id,
                  elapsed_s=elapsed)
    return state


def unreadable_files(paths: list[str]) -> list[tuple[str, str]]:
    """(path, why) of each file in ``paths`` that cannot be opened for reading."""
    out = []
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            out.append((path, exc.strerror or type(exc).__name__))
    return out


def worker_main(settings: Settings, job_id: int, attempt: int, log_level: int = logging.INFO) -> None:
    """Entry point of the worker process; ``log_level``: the node's (``ctnode -v``: DEBUG), at least INFO."""
    logging.basicConfig(level=min(log_level, logging.INFO),
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    install_log_redaction()  # warnings into logging; patient values out of every record (node.logredact)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies at INFO
    _exit_with_parent()
    limit_memory(settings.processing.worker_memory_gb)
    process_job(settings, job_id, attempt)


def limit_memory(gigabytes: float) -> None:
    """Cap this process's data memory (RLIMIT_DATA: heap and private writable mappings, which is where numpy and
    torch allocate) so that one huge study fails with MemoryError instead of pushing the host into swap or the
    kernel's OOM killer (which could pick the listener). 0: no cap.

    Not the address space (RLIMIT_AS): the CUDA driver reserves far more address space than it uses (18 GB
    of it on an H200), so under an address-space cap CUDA fails to start and the engine runs on the CPU;
    reserved address space is not writable and RLIMIT_DATA does not count it (tests/test_gpu.py). Since Linux
    4.7 RLIMIT_DATA counts anonymous mappings too, not only the heap."""
    if gigabytes > 0:
        import resource

        cap = int(gigabytes * 1024**3)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
