"""Spool files without a database row (a crash between fsync and commit) are registered at start-up."""
import pytest
from sqlalchemy import select

from node.db import open_database
from node.db.schema import Instance, Job
from node.recovery import recover_orphans
from node.spool import atomic_write, spool_path
from tests.builders import ct_slice, write
from tests.nodes import make_settings

pytestmark = pytest.mark.unit


def test_orphans_are_registered_once(tmp_path):
    settings = make_settings(tmp_path)
    sessions = open_database(settings.storage.database_url)
    ds = ct_slice()
    src = write(ds, tmp_path / "src")
    path = spool_path(settings.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    atomic_write(path, [src.read_bytes()])
    (settings.spool_dir / "1.2" / "3.4").mkdir(parents=True)
    (settings.spool_dir / "1.2" / "3.4" / "5.6.dcm").write_bytes(b"not dicom")
    with sessions.begin() as s:
        assert recover_orphans(s, settings.files) == 1
    with sessions.begin() as s:
        assert recover_orphans(s, settings.files) == 0  # idempotent
    with sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.sop_instance_uid == ds.SOPInstanceUID and s.get(Job, inst.job_id).state == "received"


def test_stager_writes_files_and_survives_its_spare_file_being_removed(tmp_path):
    """The Stager keeps an empty file ready for the next instance; if the retention job removes it while it
    waits (older than an hour), the next instance gets a new file instead of a write into an unlinked one."""
    import time

    from node.spool import Stager

    stager = Stager(tmp_path / ".incoming", threads=2)
    first = stager.submit([b"abc", b"def"]).result()
    assert first.read_bytes() == b"abcdef"
    deadline = time.monotonic() + 5
    while len(list((tmp_path / ".incoming").iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the spare file is made in the background
    spare = [p for p in (tmp_path / ".incoming").iterdir() if p != first]
    assert len(spare) == 1 and spare[0].stat().st_size == 0
    spare[0].unlink()  # as the retention job would
    second = stager.submit([b"xyz"]).result()
    assert second.exists() and second.read_bytes() == b"xyz" and second != spare[0]
    stager.close()
    assert sorted((tmp_path / ".incoming").iterdir()) == sorted([first, second])  # spare files removed


def test_staged_files_are_written_synchronously_in_whole(tmp_path, monkeypatch):
    """Staged files are opened O_DSYNC (each write durable when it returns: no fsync follows) with mode 0600,
    and a write that takes only part of the bytes, as a regular file may, is continued, not truncated."""
    import fcntl
    import os
    import stat

    import node.spool
    from node.spool import _new_temp, stage

    fd, tmp = _new_temp(tmp_path)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DSYNC == os.O_DSYNC
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600 and tmp.name.startswith(".") and tmp.suffix == ".tmp"
    finally:
        os.close(fd)
    chunks = [b"head", memoryview(bytes(range(256)) * 40), b"", bytearray(b"tail")]
    expected = b"".join(bytes(c) for c in chunks)
    real_writev = os.writev
    calls = []

    def at_most_1000_bytes(fd, buffers):
        calls.append(1)
        left, part = 1000, []
        for b in buffers:
            part.append(b[:left])
            left -= len(part[-1])
        return real_writev(fd, part)

    monkeypatch.setattr(node.spool.os, "writev", at_most_1000_bytes)
    assert stage(tmp_path / "a", chunks).read_bytes() == expected and len(calls) == 11
    # a write that ends exactly where a chunk ends
    assert stage(tmp_path / "c", [b"a" * 1000, b"b" * 500]).read_bytes() == b"a" * 1000 + b"b" * 500

    monkeypatch.setattr(node.spool.os, "writev", lambda fd, buffers: 0)  # no progress: an error, not a loop
    with pytest.raises(OSError, match="no progress"):
        stage(tmp_path / "b", [b"x"])
    assert list((tmp_path / "b").iterdir()) == []  # the temporary file is removed
