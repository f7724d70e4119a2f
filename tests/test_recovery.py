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
