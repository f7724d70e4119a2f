"""Helpers for the tests that run the node: settings in a temporary folder, a node configuration file, the
node as a child process, a C-STORE from a reading workstation, and an outbox row ready to export."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import SegmentationStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings, load_settings
from node.db import open_database
from node.db.schema import Export, Job, Study
from tests.builders import ct_slice, write

HOST = "127.0.0.1"
NODE_START_TIMEOUT = 60.0  # seconds for a node process to accept connections
NODE_STOP_TIMEOUT = 30.0  # seconds for a node process to end after SIGTERM


def make_settings(folder: Path, *, env: Mapping[str, str] | None = None, **sections) -> Settings:
    """Settings for a node whose spool, results and SQLite database live in ``folder``; it listens on a free
    port, checks often and uses the threshold engine. ``sections`` update the named sections (``destinations``
    replaces the list); ``env`` is the environment the settings read (none of the test process's)."""
    base = {
        "node": {"port": 0, "ae_title": "CTNODE"},
        "storage": {"spool_dir": str(folder / "spool"), "results_dir": str(folder / "results"),
                    "database_url": f"sqlite:///{folder / 'ctnode.db'}"},
        "processing": {"stable_after": 0.5, "check_interval": 0.2, "engine": "threshold"},
        "export": {"backoff_base": 0.2, "backoff_max": 1.0, "timeout": 5.0},
        "http": {"port": 0},
    }
    for key, values in sections.items():
        if key == "destinations":
            base["destinations"] = values
        else:
            base.setdefault(key, {}).update(values)
    return load_settings(overrides=base, env=env or {})


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(tmp_path: Path, port: int, pacs_port: int, *, stable_after: float = 4.0,
                 export_timeout: float = 30.0, storage: Path | None = None, database_url: str | None = None,
                 **sections: dict[str, object]) -> Path:
    """A node configuration file in ``tmp_path``: listens on ``port``, exports to a peer "PACS" on
    ``pacs_port``; spool and results under ``storage`` (default ``tmp_path``), the SQLite database in
    ``tmp_path`` unless ``database_url`` says otherwise. ``sections`` add or replace keys of the named
    sections (e.g. ``node={"name": "a"}``)."""
    storage = storage or tmp_path
    config: dict[str, dict[str, object]] = {
        "node": {"port": port},
        "storage": {"spool_dir": str(storage / "spool"), "results_dir": str(storage / "results"),
                    "database_url": database_url or f"sqlite:///{tmp_path / 'ctnode.db'}"},
        "processing": {"stable_after": stable_after, "check_interval": 0.2, "engine": "threshold"},
        "export": {"backoff_base": 0.5, "backoff_max": 1.0, "timeout": export_timeout},
        "http": {"port": 0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    lines = []
    for name, values in config.items():
        lines += [f"[{name}]", *(f"{key} = {_toml(value)}" for key, value in values.items())]
    lines += ["[[destinations]]", 'name = "pacs"', 'ae_title = "PACS"', f'host = "{HOST}"', f"port = {pacs_port}"]
    cfg = tmp_path / "node.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


class NodeProcess:
    """``ctnode serve`` with the configuration file ``cfg`` as a child process (its own session, so
    :meth:`stop` ends its workers too)."""

    def __init__(self, cfg: Path, port: int):
        self.cfg, self.port = cfg, port
        self.log = cfg.parent / "node.log"  # every run's output, appended: printed when the node ends
        self._printed = 0  # how much of the log has been printed
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the node and wait until it accepts connections on ``port``."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--config", str(self.cfg), "serve"],
                                         start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + NODE_START_TIMEOUT
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("node did not start")

    def kill(self) -> None:
        """SIGKILL the node process, as a crash would."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)  # only the node: its worker must notice and end by itself
        self.proc.wait(10)
        self.print_output()

    def kill_all(self) -> None:
        """SIGKILL the node and its workers at once, as the loss of its host would (nothing when none of them
        is left)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.print_output()

    def stop(self) -> None:
        """SIGTERM the node's process group, if it is still running; its output goes to this test's captured
        output. A node still stopping after ``NODE_STOP_TIMEOUT`` fails the test with its last lines (by then the
        node has logged where each of its threads is: ``node.service.STOP_REPORT_AFTER_S``)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(NODE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                tail = self.log.read_text(errors="replace").splitlines()[-120:]
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"{self.cfg.parent.name}: the node did not stop within {NODE_STOP_TIMEOUT} s "
                                     "of SIGTERM; its last lines:\n" + "\n".join(tail)) from None
        self.print_output()

    def print_output(self) -> None:
        """Print what the node wrote since the last call (pytest shows it when a test fails)."""
        if self.log.is_file():
            with self.log.open("rb") as f:
                f.seek(self._printed)
                new = f.read()
            self._printed += len(new)
            print(new.decode(errors="replace"), end="")


def c_store(port: int, *datasets: Dataset) -> list[int]:
    """Send SEG ``datasets`` to the node on ``port`` as the workstation "READER"; the C-STORE statuses."""
    ae = AE(ae_title="READER")
    ae.add_requested_context(SegmentationStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, port, ae_title="CTNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def setup_export(tmp_path: Path, port: int, max_attempts: int = 3) -> tuple[Settings, sessionmaker[Session]]:
    """Settings with one destination "PACS" on ``port``, and a database holding one done job with one pending
    export (a small CT file)."""
    settings = make_settings(tmp_path, export={"max_attempts": max_attempts},
                             destinations=[{"name": "pacs", "ae_title": "PACS", "host": HOST, "port": port}])
    sessions = open_database(settings.storage.database_url)
    add_done_job(sessions, "pacs", [("1.2.3.4", write(ct_slice(), tmp_path / "out"))])
    return settings, sessions


def add_done_job(sessions: sessionmaker[Session], destination: str, objects: list[tuple[str, Path]]) -> None:
    """A study with one done job and a pending export to ``destination`` of each (SOP Instance UID, path)."""
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, version=1, state="done")
        s.add(job)
        s.flush()
        s.add_all(Export(job_id=job.id, destination=destination, sop_instance_uid=uid, path=str(path))
                  for uid, path in objects)


def export_row(sessions: sessionmaker[Session]) -> Export:
    """The one export row."""
    with sessions() as s:
        return s.scalars(select(Export)).one()


def wait_first_job_finished(node, timeout: float) -> None:
    """Wait until the first job of a running :class:`node.service.Node` is done, skipped or failed."""
    from node.db.states import JOB_FINISHED
    from tests.util import wait_for

    def finished() -> bool:
        with node.sessions() as s:
            job = s.scalars(select(Job)).first()
            return job is not None and job.state in JOB_FINISHED

    wait_for(finished, timeout, "the job to finish")
