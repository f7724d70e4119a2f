"""The listener over real associations (pynetdicom SCU on loopback)."""
from __future__ import annotations

import logging
import time

import pytest
from pydicom import dcmread
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from node.db import open_database
from node.db.schema import Event, Instance, Job
from node.listener import Listener
from tests.builders import ct_slice
from tests.nodes import make_settings
from tests.util import captured_logs

pytestmark = pytest.mark.integration


@pytest.fixture
def listener(tmp_path):
    settings = make_settings(tmp_path, node={"allowed_calling_aets": ["SENDER", "MODALITY2"]})
    sessions = open_database(settings.storage.database_url)
    lst = Listener(settings, sessions)
    lst.start()
    yield lst
    lst.stop()


def send(listener, *datasets, calling="SENDER", sop_class=CTImageStorage):
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CTNODE")
    if not assoc.is_established:
        return None
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def events(listener, kind):
    with listener.sessions() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind)))


def test_store_writes_bytes_and_records_before_success(listener):
    ds = ct_slice()
    [status] = send(listener, ds)
    assert status.Status == 0x0000
    with listener.sessions() as s:
        inst = s.scalars(select(Instance)).one()
        job = s.get(Job, inst.job_id)
    assert inst.sop_instance_uid == ds.SOPInstanceUID and job.state == "received" and job.version == 1
    # the database names the file relative to the spool folder (hosts may mount it at other paths)
    assert inst.path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm" and inst.size > 0
    stored = dcmread(listener.settings.files.spool_file(inst.path))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PixelData == ds.PixelData
    assert events(listener, "association_accepted")


@pytest.mark.parametrize("sop_instance, syntax", [
    ("1.2.3.4", ExplicitVRLittleEndian),  # even length
    ("1.2.3.45", ImplicitVRLittleEndian),  # odd: padded with NUL
    ("2.25.123456789012345678901234567890123", "1.2.840.10008.1.2.4.90"),
])
def test_part10_header_is_pynetdicoms_file_meta(sop_instance, syntax):
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from node.dicom.part10 import PREAMBLE, part10_header

    expected = PREAMBLE + encode_file_meta(create_file_meta(
        sop_class_uid=UID(CTImageStorage), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax)))
    assert part10_header(CTImageStorage, sop_instance, syntax) == expected


def test_spool_file_is_the_received_bytes(listener):
    """Byte for byte: the Part 10 header pynetdicom would write, then the data set exactly as it was sent."""
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

    from node.dicom.part10 import PREAMBLE

    ds = ct_slice()
    [status] = send(listener, ds)  # the first context offered: Explicit VR Little Endian
    assert status.Status == 0x0000
    with listener.sessions() as s:
        path = listener.settings.files.spool_file(s.scalars(select(Instance.path)).one())
    meta = create_file_meta(sop_class_uid=UID(CTImageStorage), sop_instance_uid=UID(ds.SOPInstanceUID),
                            transfer_syntax=ExplicitVRLittleEndian)
    assert open(path, "rb").read() == PREAMBLE + encode_file_meta(meta) + encode(ds, False, True)


def test_row_commits_only_after_the_file_is_durable(listener, monkeypatch):
    """The bytes are staged (written, fsynced) in a spool thread while the row is prepared; the file is placed
    under its final name, folder fsynced, before the commit: checked from another connection right then."""
    import node.listener

    real_place = node.listener.place
    seen_when_placed = []

    def place(staged, path):
        assert staged.parent == listener.settings.spool_dir / ".incoming"
        real_place(staged, path)
        assert path.exists() and not staged.exists()
        with listener.sessions() as s:
            seen_when_placed.append(s.scalars(select(Instance)).all())

    monkeypatch.setattr(node.listener, "place", place)
    [status] = send(listener, ct_slice())
    assert status.Status == 0x0000 and seen_when_placed == [[]]
    with listener.sessions() as s:
        assert len(s.scalars(select(Instance)).all()) == 1
    # left in the staging folder: at most the empty file made in advance for the next instance
    assert [f.stat().st_size for f in (listener.settings.spool_dir / ".incoming").iterdir()] in ([], [0])


@pytest.mark.parametrize("change, code, words", [
    (lambda ds: setattr(ds, "Modality", "MR"), 0xA900, "Modality MR"),
    (lambda ds: delattr(ds, "PixelData"), 0xA900, "no Pixel Data"),
    (lambda ds: setattr(ds, "StudyInstanceUID", "1.2.03"), 0xC000, "invalid StudyInstanceUID"),
    (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2/../3"), 0xC000, "invalid SeriesInstanceUID"),
    (lambda ds: setattr(ds, "StudyInstanceUID", "1." + "2" * 70), 0xC000, "invalid StudyInstanceUID"),
])
def test_refusals_have_status_comment_and_audit(listener, change, code, words):
    ds = ct_slice()
    change(ds)
    [status] = send(listener, ds)
    assert status.Status == code
    assert words in status.ErrorComment
    with listener.sessions() as s:
        assert s.scalars(select(Instance)).first() is None
    assert any(words in e.detail for e in events(listener, "instance_refused"))
    assert not [p for p in listener.settings.spool_dir.rglob("*") if p.is_file() and p.stat().st_size]  # nor staged


def test_enhanced_ct_is_refused_with_a_reason(listener):
    ds = ct_slice()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    [status] = send(listener, ds, sop_class=EnhancedCTImageStorage)
    assert status.Status == 0x0122 and "Enhanced CT" in status.ErrorComment


def test_unknown_caller_is_rejected_and_logged(listener):
    assert send(listener, ct_slice(), calling="INTRUDER") is None
    deadline = time.monotonic() + 5  # the server logs the rejection just after the peer sees it
    while not (rejected := events(listener, "association_rejected")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rejected and rejected[0].calling_aet == "INTRUDER"


def test_echo(listener):
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CTNODE")
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_database_failure_is_not_acknowledged(listener, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def broken(*a, **k):
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr("node.listener.record_instance", broken)
    [status] = send(listener, ct_slice())
    assert status.Status == 0xA700


def test_one_study_over_several_associations_and_late_instance(listener):
    study = generate_uid()
    series = generate_uid()
    send(listener, ct_slice(study_uid=study, series_uid=series, z=0))
    send(listener, ct_slice(study_uid=study, series_uid=series, z=1), calling="MODALITY2")  # another sender
    with listener.sessions.begin() as s:
        jobs = list(s.scalars(select(Job)))
        assert len(jobs) == 1 and jobs[0].version == 1
        assert sorted(i.calling_aet for i in s.scalars(select(Instance))) == ["MODALITY2", "SENDER"]
        jobs[0].state = "done"  # as if processed
    send(listener, ct_slice(study_uid=study, series_uid=series, z=2))
    with listener.sessions() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.version)))
    assert [j.version for j in jobs] == [1, 2] and jobs[1].state == "received"


def test_identical_resend_is_a_duplicate_and_changed_content_replaces(listener):
    ds = ct_slice()
    send(listener, ds)
    send(listener, ds)
    with listener.sessions() as s:
        assert len(list(s.scalars(select(Instance)))) == 1
    ds.PixelData = bytes(len(ds.PixelData))
    [status] = send(listener, ds)
    assert status.Status == 0
    assert events(listener, "instance_replaced")


def test_transfer_syntax_the_node_cannot_decode_is_not_negotiated(listener):
    """CT offered only in HTJ2K (not among the node's syntaxes): the presentation context is rejected at
    association time, which is how a sender learns to convert or route elsewhere; nothing is stored, and
    the association still serves what was accepted (C-ECHO)."""
    htj2k_lossless = "1.2.840.10008.1.2.4.201"
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, [htj2k_lossless])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CTNODE")
    assert assoc.is_established
    try:
        assert [c.abstract_syntax for c in assoc.rejected_contexts] == [CTImageStorage]
        assert assoc.send_c_echo().Status == 0x0000
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(ct_slice())
    finally:
        assoc.release()
    with listener.sessions() as s:
        assert s.scalars(select(Instance)).all() == []


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_pynetdicom_describes_each_message_only_at_debug(tmp_path, level):
    """pynetdicom's per-message log handlers (a line per instance, a copy of each data set) run only when
    its DEBUG output is wanted (``ctnode -v``); the audit table records every instance either way."""
    pynetdicom_log = logging.getLogger("pynetdicom")
    old_level, old_handlers = pynetdicom_log.level, pynetdicom_config.LOG_HANDLER_LEVEL
    pynetdicom_log.setLevel(level)
    try:
        settings = make_settings(tmp_path, node={"allowed_calling_aets": ["SENDER"]})
        lst = Listener(settings, open_database(settings.storage.database_url))
        lst.start()
        try:
            with captured_logs(level) as logs:
                [status] = send(lst, ct_slice())
        finally:
            lst.stop()
    finally:
        pynetdicom_log.setLevel(old_level)
        pynetdicom_config.LOG_HANDLER_LEVEL = old_handlers  # process-wide: leave it as found
    assert status.Status == 0x0000
    described = "Received Store Request" in logs.text()
    assert described == (level == logging.DEBUG), logs.text()[-2000:]
    assert len(events(lst, "association_accepted")) == 1
