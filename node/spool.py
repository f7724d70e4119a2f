"""The spool: received instances stored byte for byte, written atomically.

Paths are built only from UIDs that passed :func:`is_valid_uid` (digits and dots, at most 64 characters),
so no peer can steer a file name ("../", "/", NUL are impossible by construction).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """A DICOM UID (PS3.5 9.1): dot-separated numeric components without leading zeros, 1-64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def spool_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    for uid in (study_uid, series_uid, sop_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"refusing to build a path from an invalid UID: {uid!r}")
    return spool_dir / study_uid / series_uid / f"{sop_uid}.dcm"


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (``mkdir(parents=True)`` would give the
    parents the umask's mode)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(d, 0o700)  # mkdir's mode is masked by the umask


STAGING_DIR = ".incoming"  # spool sub-folder where received instances are written before they are placed


def stage(folder: Path, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to a new temporary file (``.*.tmp``) in ``folder``, durably; returns its path.

    On any error the temporary file is removed. Stray ones (a crash) are removed by the retention job.
    Runs in any thread: the file calls release the GIL.
    """
    make_private_dirs(folder)
    return _write_synced(*_new_temp(folder), chunks)


def _new_temp(folder: Path) -> tuple[int, Path]:
    """A new empty temporary file (``.*.tmp``, mode 0600) in ``folder``, open for synchronised writes: its
    descriptor and path.

    O_DSYNC: each write returns once its data, and the file size that finds it, are on disk (what fdatasync
    gives). A received instance is then written and made durable in one system call, so the spool thread
    takes the GIL back once instead of after a write, an fsync and a close (docs/performance.md).
    """
    while True:
        tmp = folder / f".{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DSYNC | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


_BATCH_BYTES = 8 << 20  # per synchronised write when the chunks are a stream (receive_to_disk: 1 MB chunks)
_MAX_BUFFERS = 1024  # per write: IOV_MAX on Linux


def _write_synced(fd: int, tmp: Path, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to ``fd`` (from :func:`_new_temp`) in as few writes as ``_BATCH_BYTES`` allows, close it."""
    try:
        try:
            batch: list[memoryview] = []
            size = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                batch.append(view)
                size += view.nbytes
                if size >= _BATCH_BYTES or len(batch) >= _MAX_BUFFERS:
                    _write_all(fd, batch)
                    batch, size = [], 0
            _write_all(fd, batch)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_all(fd: int, views: list[memoryview]) -> None:
    """``os.writev`` until every byte of ``views`` is written (a regular file may take fewer in one call);
    consumes ``views``."""
    while views:
        written = os.writev(fd, views)
        if written == 0 and any(v.nbytes for v in views):
            raise OSError(errno.EIO, "write made no progress")
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if views:
            views[0] = views[0][written:]


class Stager:
    """Stages received instances (as :func:`stage` does) from a pool of spool threads.

    Creating a file costs about as much as writing half a megabyte durably on the filesystems measured
    (docs/performance.md), so the file for the next instance is created in the background, while the
    association waits for that instance to arrive, and taken when it does.
    """

    def __init__(self, folder: Path, threads: int):
        self.folder = folder
        make_private_dirs(folder)
        self._threads = ThreadPoolExecutor(threads, "spool")
        self._ready: queue.SimpleQueue[tuple[int, Path]] = queue.SimpleQueue()
        self._threads.submit(self._create)

    def _create(self) -> None:
        self._ready.put(_new_temp(self.folder))

    def _take(self) -> tuple[int, Path]:
        """The file made in advance (and make the next one), or a new file when none is ready (another
        association took it and its replacement is still being made, or making it failed)."""
        try:
            fd, tmp = self._ready.get_nowait()
        except queue.Empty:
            return _new_temp(self.folder)
        self._threads.submit(self._create)
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)  # removed while it waited (the retention job removes old temporary files)
        return _new_temp(self.folder)

    def _stage(self, chunks: Iterable[bytes]) -> Path:
        fd, tmp = self._take()
        return _write_synced(fd, tmp, chunks)

    def submit(self, chunks: Iterable[bytes]) -> Future[Path]:
        """Write ``chunks`` durably to a temporary file in the staging folder; the future gives its path."""
        return self._threads.submit(self._stage, chunks)

    def close(self) -> None:
        """Wait for the writes in flight and remove the files made in advance."""
        self._threads.shutdown(wait=True)
        while True:
            try:
                fd, tmp = self._ready.get_nowait()
            except queue.Empty:
                return
            os.close(fd)
            tmp.unlink(missing_ok=True)


def place(staged: Path, path: Path) -> None:
    """Move a staged (durably written) file to ``path`` (same filesystem) and fsync ``path``'s folder.

    After this returns the file survives a power cut under its final name; a crash before leaves either
    the old file or the new one at ``path``, never a torn one.
    """
    make_private_dirs(path.parent)
    os.replace(staged, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically and durably: :func:`stage` beside it, then :func:`place`."""
    place(stage(path.parent, chunks), path)


def sha256_of(chunks: Iterable[bytes]) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of ``chunks``; hashlib releases the GIL, so this overlaps a write."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@dataclass(frozen=True)
class DiskState:
    free_bytes: int
    total_bytes: int

    @property
    def used_percent(self) -> float:
        return 100.0 * (1 - self.free_bytes / self.total_bytes) if self.total_bytes else 100.0


def disk_state(path: Path) -> DiskState:
    """Free/total bytes of the filesystem holding ``path`` (statvfs; the nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    usage = shutil.disk_usage(p)
    return DiskState(usage.free, usage.total)


def _size_text(n: int) -> str:
    """A free-space figure an administrator can act on: "32 MB" under 1 GB, "1.5 GB" above."""
    return f"{n / 1024**2:.0f} MB" if n < 1024**3 else f"{n / 1024**3:.1f} GB"


class DiskGuard:
    """Says whether the spool filesystem has room for new associations.

    Full when free space is below ``min_free_gb`` or usage above ``max_used_percent`` (0 disables either
    check). The statvfs result is cached for ``cache_s`` seconds so that a burst of associations costs one
    system call. An alarm is logged (ERROR) when the guard trips and an INFO line when it clears.
    """

    def __init__(self, path: Path, min_free_gb: float, max_used_percent: float, cache_s: float = 1.0,
                 probe: Callable[[Path], DiskState] | None = None):
        self.path = Path(path)
        self.min_free_bytes = int(min_free_gb * 1024**3)
        self.max_used_percent = max_used_percent
        self.cache_s = cache_s
        self.probe = probe
        self._lock = threading.Lock()
        self._checked = -1e18
        self._problem = ""

    def _evaluate(self) -> str:
        probe = self.probe or disk_state  # looked up at call time so tests can monkeypatch disk_state
        try:
            st = probe(self.path)
        except OSError as exc:
            return f"cannot check the spool filesystem: {exc.strerror or exc}"
        if self.min_free_bytes and st.free_bytes < self.min_free_bytes:
            return (f"spool filesystem has {_size_text(st.free_bytes)} free, "
                    f"below node.min_free_gb = {self.min_free_bytes / 1024**3:g}")
        if self.max_used_percent and st.used_percent > self.max_used_percent:
            return (f"spool filesystem is {st.used_percent:.1f}% used, "
                    f"above node.max_used_percent = {self.max_used_percent:g}")
        return ""

    def problem(self) -> str:
        """"" when there is room, otherwise why not."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.cache_s:
                self._checked = now
                problem = self._evaluate()
                if problem and not self._problem:
                    log.error("ALARM disk guard: refusing new associations: %s", problem)
                elif self._problem and not problem:
                    log.info("disk guard cleared: accepting associations again")
                self._problem = problem
            return self._problem
