"""Start-up recovery of spool files that have no database row.

A file reaches the spool (synchronised write, rename) before its row is committed. If the node dies in between, the
instance was never acknowledged and the sender will retry; and with SQLite in WAL mode with
``synchronous=NORMAL`` a power cut can roll back the last commits while the synced files survive. Either way
the bytes are on disk: registering them again at start-up means an acknowledged instance is never lost, and
a resend of the same bytes is then recognised as a duplicate.
"""
from __future__ import annotations

import hashlib
import logging

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.schema import Instance
from node.registry import ReceivedInstance, add_event, record_instance
from node.spool import is_valid_uid
from node.storage import Storage

log = logging.getLogger(__name__)


def recover_orphans(session: Session, files: Storage) -> int:
    """Register every spool file that no instance row points to; returns how many were registered."""
    known = {files.spool_file(p) for p in session.scalars(select(Instance.path))}
    recovered = 0
    for path in sorted(files.spool_dir.glob("*/*/*.dcm")):
        if path in known:
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            if not all(map(is_valid_uid, uids)) or path.parts[-3:] != (uids[0], uids[1], f"{uids[2]}.dcm"):
                raise ValueError("file name does not match its UIDs")
            data = path.read_bytes()
        except Exception as exc:  # not ours or damaged: leave it for an administrator, say so
            log.warning("spool file %s not recovered: %s", path.name, exc)
            add_event(session, "spool_orphan_unreadable", f"{path}: {exc}")
            continue
        record_instance(session, ReceivedInstance(
            study_instance_uid=uids[0], series_instance_uid=uids[1], sop_instance_uid=uids[2],
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=files.spool_name(path), size=len(data), sha256=hashlib.sha256(data).hexdigest(),
            modality=str(ds.get("Modality", "")), series_description=str(ds.get("SeriesDescription", "")),
            patient_id=str(ds.get("PatientID", "")), accession_number=str(ds.get("AccessionNumber", ""))))
        add_event(session, "instance_recovered", f"spool file without a database row: {uids[2]}",
                  study_uid=uids[0])
        recovered += 1
    return recovered
