"""Security helpers: PHI-safe UID references for log lines and database file permissions (TLS contexts
and peer checks are in :mod:`node.dicom.tls` and :mod:`node.dicom.access`, log redaction in
:mod:`node.logredact`).

Nothing here logs a patient identifier. UIDs, where a log line needs to tell two objects apart, are
written as a short hash (:func:`uid_ref`): enough to correlate with the database (which holds the UID),
useless to someone who only reads the log.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def uid_ref(uid: object) -> str:
    """A short, stable, non-reversible reference to a UID for log lines (``uid#1a2b3c4d``)."""
    return "uid#" + hashlib.sha256(str(uid).encode()).hexdigest()[:8]


def restrict_sqlite_files(database_url: str) -> None:
    """chmod 0600 the SQLite database file and its WAL/SHM companions (no-op for other databases)."""
    if not database_url.startswith("sqlite:///") or database_url.startswith("sqlite:///:memory:"):
        return
    base = Path(database_url.removeprefix("sqlite:///"))
    for path in (base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm")):
        try:
            os.chmod(path, 0o600)
        except FileNotFoundError:
            pass
