"""Spool files without a database row (a crash between fsync and commit) are registered at start-up."""
from sqlalchemy import select

from node.db import open_database
from node.db.schema import Instance, Job
from node.recovery import recover_orphans
from node.spool import atomic_write, spool_path
from tests.conftest import make_settings
from tests.factory import ct_slice, write


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
        assert recover_orphans(s, settings.spool_dir) == 1
    with sessions.begin() as s:
        assert recover_orphans(s, settings.spool_dir) == 0  # idempotent
    with sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.sop_instance_uid == ds.SOPInstanceUID and s.get(Job, inst.job_id).state == "received"


def test_stager_writes_fsynced_files_and_survives_its_spare_file_being_removed(tmp_path):
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
