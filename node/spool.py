"""The spool: received instances stored byte for byte, written atomically.

Paths are built only from UIDs that passed :func:`is_valid_uid` (digits and dots, at most 64 characters),
so no peer can steer a file name ("../", "/", NUL are impossible by construction).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """A DICOM UID (PS3.5 9.1): dot-separated numeric components without leading zeros, 1-64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def spool_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    for uid in (study_uid, series_uid, sop_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"refusing to build a path from an invalid UID: {uid!r}")
    return spool_dir / study_uid / series_uid / f"{sop_uid}.dcm"


def atomic_write(path: Path, chunks: list[bytes] | tuple[bytes, ...]) -> tuple[int, str]:
    """Write ``chunks`` to ``path`` via a temporary file, fsync, rename, fsync the folder.

    Returns (size in bytes, sha256 hex). A crash leaves either the old file or the new one, never a torn one;
    stray temporary files (``.*.tmp``) are removed by the retention job.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size, digest.hexdigest()
