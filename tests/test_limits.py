"""Limits: instance and study size, PDU size, association count, receive-to-disk, the disk guard."""
from __future__ import annotations

import hashlib
import logging
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from node.config import ConfigError
from node.db.schema import Event, Instance
from node.spool import DiskGuard, DiskState
from tests.builders import ct_slice
from tests.nodes import make_settings

pytestmark = pytest.mark.integration

GB = 1024**3


@pytest.fixture
def make_listener(start_listener):
    """A listener that accepts the calling AE "SENDER", with ``node`` settings on top."""
    return lambda name="a", **node: start_listener(name, node={"allowed_calling_aets": ["SENDER"], **node})


def associate(port, calling="SENDER"):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="CTNODE")


def store(port, *datasets):
    assoc = associate(port)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def events(lst, kind):
    with lst.sessions() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind)))


def test_instance_above_max_instance_mb_is_refused(make_listener):
    lst = make_listener(max_instance_mb=0.004)  # ~4 KB: a 64x64 int16 slice (8 KB) is too big
    small, big = ct_slice(size=16), ct_slice(size=64)
    ok, refused = store(lst.port, small, big)
    assert ok.Status == 0x0000
    assert refused.Status == 0xA700 and "max_instance_mb" in refused.ErrorComment
    assert any("max_instance_mb" in e.detail for e in events(lst, "instance_refused"))
    with lst.sessions() as s:
        assert [i.sop_instance_uid for i in s.scalars(select(Instance))] == [small.SOPInstanceUID]


def test_study_above_max_study_gb_is_refused(make_listener):
    lst = make_listener(max_study_gb=20_000 / GB, max_instance_mb=0.015)  # ~20 KB per study
    study = generate_uid()
    series = generate_uid()
    slices = [ct_slice(study_uid=study, series_uid=series, z=z, size=64) for z in range(3)]  # ~8.5 KB each
    statuses = store(lst.port, *slices, ct_slice(size=64))  # the last one: another study
    assert [s.Status for s in statuses] == [0, 0, 0xA700, 0]
    assert "max_study_gb" in statuses[2].ErrorComment


def test_receive_to_disk_spools_identical_bytes_and_enforces_limits(make_listener):
    ds = ct_slice(size=64)
    big = ct_slice(size=128)
    in_memory = make_listener("mem")
    store(in_memory.port, ds)
    try:
        on_disk = make_listener("disk", receive_to_disk=True, max_instance_mb=0.02)
        assert pynetdicom_config.STORE_RECV_CHUNKED_DATASET
        ok, refused = store(on_disk.port, ds, big)
    finally:
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = False  # process-wide switch: leave it as found
    assert ok.Status == 0 and refused.Status == 0xA700

    def spooled(lst):
        with lst.sessions() as s:
            inst = s.scalars(select(Instance)).one()
        return lst.settings.files.spool_file(inst.path).read_bytes(), inst.sha256

    (a, sha_a), (b, sha_b) = spooled(in_memory), spooled(on_disk)
    assert a == b and sha_a == sha_b
    assert sha_a == hashlib.sha256(a).hexdigest()  # the recorded digest is the spooled file's
    assert a.endswith(ds.PixelData)


def test_max_pdu_size_is_announced(make_listener):
    lst = make_listener(max_pdu_size=4096)
    assoc = associate(lst.port)
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == 4096
        assert assoc.send_c_store(ct_slice(size=64)).Status == 0  # fragmented into 4 KB PDUs
    finally:
        assoc.release()


def test_max_associations(make_listener):
    lst = make_listener(max_associations=1)
    first = associate(lst.port)
    assert first.is_established
    try:
        second = associate(lst.port)
        assert not second.is_established and second.is_rejected
    finally:
        first.release()
    deadline = time.monotonic() + 5
    while not (rows := events(lst, "association_rejected")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows and "node.max_associations" in rows[0].detail


# -- disk guard ------------------------------------------------------------------------------------------

class FakeDisk:
    def __init__(self, free_gb, total_gb=100):
        self.free, self.total, self.calls = free_gb, total_gb, 0

    def __call__(self, path):
        self.calls += 1
        return DiskState(int(self.free * GB), int(self.total * GB))


def test_disk_guard_refuses_associations_then_recovers(make_listener, monkeypatch):
    disk = FakeDisk(free_gb=1)
    monkeypatch.setattr("node.spool.disk_state", disk)
    lst = make_listener(min_free_gb=2, max_used_percent=95)
    lst.disk_guard.cache_s = 0  # evaluate every association in this test
    alarms = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: alarms.append(record.getMessage())
    logging.getLogger("node.spool").addHandler(handler)
    logging.getLogger("node.spool").setLevel(logging.INFO)
    try:
        assoc = associate(lst.port)
        assert not assoc.is_established and assoc.is_rejected
        disk.free = 4  # 96 % used: still refused
        assert not associate(lst.port).is_established
        disk.free = 50
        assoc = associate(lst.port)
        assert assoc.is_established
        assert assoc.send_c_store(ct_slice()).Status == 0
        assoc.release()
    finally:
        logging.getLogger("node.spool").removeHandler(handler)
    rows = events(lst, "association_rejected")
    assert len(rows) == 2 and all(r.calling_aet == "SENDER" and r.peer.startswith("127.0.0.1") for r in rows)
    assert "below node.min_free_gb" in rows[0].detail and "above node.max_used_percent" in rows[1].detail
    assert any(m.startswith("ALARM disk guard") for m in alarms)
    assert any("disk guard cleared" in m for m in alarms)
    assert sum("ALARM" in m for m in alarms) == 1  # one alarm per episode, not per association


def test_disk_guard_is_cached(tmp_path):
    disk = FakeDisk(free_gb=50)
    guard = DiskGuard(tmp_path, min_free_gb=2, max_used_percent=95, cache_s=60, probe=disk)
    assert all(guard.problem() == "" for _ in range(1000))
    assert disk.calls == 1
    guard0 = DiskGuard(tmp_path, min_free_gb=0, max_used_percent=0, probe=FakeDisk(free_gb=0))
    assert guard0.problem() == ""  # both checks disabled
    real = DiskGuard(tmp_path / "not" / "yet", min_free_gb=0.0001, max_used_percent=100)
    assert real.problem() == ""  # statvfs on the nearest existing parent


@pytest.mark.parametrize("node, key", [
    ({"max_pdu_size": 100}, "node.max_pdu_size"),
    ({"max_instance_mb": 0}, "node.max_instance_mb"),
    ({"max_study_gb": -1}, "node.max_study_gb"),
    ({"max_instance_mb": 2048, "max_study_gb": 1}, "node.max_instance_mb"),
    ({"min_free_gb": -1}, "node.min_free_gb"),
    ({"max_used_percent": 101}, "node.max_used_percent"),
    ({"receive_to_disk": "perhaps"}, "node.receive_to_disk"),
])
def test_limit_settings_are_validated(tmp_path, node, key):
    with pytest.raises(ConfigError) as err:
        make_settings(tmp_path, node=node)
    assert str(err.value).startswith(key)


@pytest.mark.peer
@pytest.mark.slow
def test_a_300_mb_instance_is_spooled_from_disk_with_flat_memory(make_listener, tmp_path):
    """A real instance of several hundred MB (12288 x 12288 x 16 bit = 302 MB) from DCMTK storescu: with
    receive_to_disk it is stored byte for byte while the listener's memory stays flat; with the default
    in-memory mode and a 256 MB max_instance_mb it is refused 0xA700; the listener keeps serving."""
    import subprocess
    import sys
    from pathlib import Path

    from tests import peers

    peers.require_peer("storescu")
    big = tmp_path / "big.dcm"
    # written by a child process, so this process (the listener's) never holds the 300 MB
    subprocess.run([sys.executable, "-c", (
        "import sys; from tests.builders import ct_slice; import numpy as np\n"
        "ds = ct_slice(size=16)\n"
        "ds.Rows = ds.Columns = 12288\n"
        "ds.PixelData = np.full((12288, 12288), 24, np.int16).tobytes()\n"
        f"ds.save_as({str(big)!r}, enforce_file_format=True)\n")], check=True, cwd=Path(__file__).parents[1],
        timeout=300)
    def data_set_sha256(path) -> str:
        """SHA-256 of the data set (what travels on the wire), after the file meta each side writes itself."""
        from pydicom import dcmread

        meta_length = int(dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            fh.seek(128 + 4 + 12 + meta_length)  # preamble, "DICM", the group length element, the group
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
        return digest.hexdigest()

    def rss_mb() -> float:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

    try:
        on_disk = make_listener("disk", receive_to_disk=True, max_instance_mb=512)
        before = rss_mb()
        sent = peers.storescu("127.0.0.1", on_disk.port, [big], calling_aet="SENDER", timeout=300)
        grown = rss_mb() - before
    finally:
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = False  # process-wide switch: leave it as found
    assert sent.returncode == 0, sent.stdout[-2000:]
    with on_disk.sessions() as s:
        inst = s.scalars(select(Instance)).one()
    assert data_set_sha256(on_disk.settings.files.spool_file(inst.path)) == data_set_sha256(big)
    assert grown < 100, f"listener RSS grew {grown:.0f} MB while receiving a 302 MB instance"

    in_memory = make_listener("mem", max_instance_mb=256)
    refused = peers.storescu("127.0.0.1", in_memory.port, [big], calling_aet="SENDER", timeout=300)
    assert "Received Store Response (Refused: OutOfResources)" in refused.stdout, refused.stdout[-500:]
    assert any("max_instance_mb" in e.detail for e in events(in_memory, "instance_refused"))
    assert store(in_memory.port, ct_slice(size=16))[0].Status == 0x0000  # still serving


def test_spool_write_failure_is_refused_a700_and_leaves_nothing(make_listener, monkeypatch):
    """The disk fills up between the disk guard's check and the write (ENOSPC at the synchronised write, as on
    a thin-provisioned or network volume): 0xA700 with the reason, audited, no temporary file and no row; the
    next one is stored."""
    import errno
    import os

    import node.spool

    lst = make_listener()
    real_writev = os.writev

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(node.spool.os, "writev", full)
    refused = store(lst.port, ct_slice())[0]
    monkeypatch.setattr(node.spool.os, "writev", real_writev)
    assert refused.Status == 0xA700 and refused.ErrorComment == "cannot write spool: No space left on device"
    assert [e.detail for e in events(lst, "instance_refused")] == ["0xA700 cannot write spool: No space left on device"]
    spool = lst.settings.spool_dir
    # the temporary file was removed (what stays is the empty one made in advance for the next instance)
    assert not [p for p in spool.rglob("*") if p.is_file() and p.stat().st_size]
    with lst.sessions() as s:
        assert s.scalars(select(Instance)).all() == []
    assert store(lst.port, ct_slice())[0].Status == 0x0000
