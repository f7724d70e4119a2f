"""Attacks from the network: every hostile connection is dropped within the configured limits of size and
time, leaves an audit row with the reason, and the node goes on serving (docs/reliability.md, "Attacks from
the network"). Raw sockets and pynetdicom clients on 127.0.0.1; each test is bounded in time."""
from __future__ import annotations

import socket
import struct
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from node.db.schema import Event, Instance
from node.dicom.status import DropReason, StoreStatus
from node.dicom.transport import AE_TITLES_END, ASSOCIATE_RQ_MAX_LENGTH
from node.listener import Listener
from node.spool import DiskGuard, DiskState
from tests.builders import ct_slice
from tests.util import seconds_until_closed

pytestmark = pytest.mark.integration

ACSE, NETWORK = 2.0, 3.0
MB = 1024**2


@pytest.fixture
def make_listener(start_listener):
    """A listener that accepts "SENDER", with short timeouts and ``node`` settings on top."""
    return lambda **node: start_listener(node={"allowed_calling_aets": ["SENDER"], "acse_timeout": ACSE,
                                               "network_timeout": NETWORK, "dimse_timeout": NETWORK, **node})


def requestor(calling: str = "SENDER") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.network_timeout = ae.dimse_timeout = None  # only the node's timers may end the association
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae


def echo_ok(port: int) -> bool:
    assoc = requestor().associate("127.0.0.1", port, ae_title="CTNODE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def drops(lst: Listener, kind: str = "connection_dropped") -> list[Event]:
    with lst.sessions() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def wait_drops(lst: Listener, n: int, kind: str = "connection_dropped", limit: float = 10.0) -> list[Event]:
    deadline = time.monotonic() + limit
    while len(rows := drops(lst, kind)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


def vm_rss() -> int:
    """This process's resident set (bytes), from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def associate_rq_head(calling: str = "SENDER", called: str = "CTNODE", length: int = 200) -> bytes:
    """The first AE_TITLES_END bytes of an A-ASSOCIATE-RQ declaring ``length`` bytes (PS3.8 9.3.2)."""
    head = struct.pack(">BBLHH16s16s32s", 0x01, 0, length, 1, 0, called.ljust(16).encode(),
                       calling.ljust(16).encode(), b"\x00" * 32)
    assert len(head) == AE_TITLES_END
    return head


def flood(sock: socket.socket, header: bytes, total: int, limit: float = 20.0) -> int:
    """Send ``header`` then up to ``total`` zero bytes; returns how many the node took before closing."""
    chunk = b"\x00" * MB
    sent = 0
    sock.settimeout(limit)
    try:
        sock.sendall(header)
        while sent < total:
            sent += sock.send(chunk)
    except OSError:  # broken pipe / reset: the node closed the connection
        pass
    return sent


def test_huge_associate_rq_is_refused_from_its_header(make_listener):
    lst = make_listener()
    before = vm_rss()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", lst.port)) as sock:
        sent = flood(sock, b"\x01\x00\xff\xff\xff\xff", 100 * MB)  # claims 4 GiB
    assert time.monotonic() - start < 10
    assert sent < 100 * MB, "the node kept reading"
    assert vm_rss() - before < 50 * MB
    [row] = wait_drops(lst, 1)
    assert DropReason.ASSOCIATE_TOO_LONG.value in row.detail and row.peer.startswith("127.0.0.1:")
    assert echo_ok(lst.port)


def test_huge_pdu_inside_an_association_is_aborted(make_listener):
    lst = make_listener()
    assoc = requestor().associate("127.0.0.1", lst.port, ae_title="CTNODE")
    assert assoc.is_established
    before = vm_rss()
    sent = flood(assoc.dul.socket.socket, b"\x04\x00\xff\xff\xff\xff", 100 * MB)  # P-DATA claiming 4 GiB
    assert sent < 100 * MB, "the node kept reading"
    assert vm_rss() - before < 50 * MB
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    [row] = wait_drops(lst, 1)
    assert DropReason.PDU_TOO_LONG.value in row.detail and row.calling_aet == "SENDER"
    assert echo_ok(lst.port)


def test_unknown_caller_is_rejected_on_the_fixed_header(make_listener):
    """The calling AE title is checked on the request's first 74 bytes: the rest (here never sent) is not
    awaited, and the answer is the A-ASSOCIATE-RJ pynetdicom would send (rejected-permanent, user, 3)."""
    lst = make_listener()
    with socket.create_connection(("127.0.0.1", lst.port)) as sock:
        sock.sendall(associate_rq_head("INTRUDER", length=ASSOCIATE_RQ_MAX_LENGTH))
        sock.settimeout(ACSE / 2)
        answer = sock.recv(10)
    assert answer == bytes.fromhex("03000000000400010103")
    [row] = wait_drops(lst, 1, "association_rejected")
    assert row.calling_aet == "INTRUDER" and "calling AE title not allowed" in row.detail


def test_address_outside_every_binding_is_dropped_on_accept(make_listener):
    lst = make_listener(allowed_calling_aets=[], allowed_peers=["SENDER@10.1.2.0/24"])
    with socket.create_connection(("127.0.0.1", lst.port)) as sock:
        assert (seconds_until_closed(sock, 5) or 99) < 1.0
    [row] = wait_drops(lst, 1)
    assert DropReason.PEER_NOT_ALLOWED.value in row.detail


def test_slowloris_connections_are_dropped_and_the_node_serves(make_listener):
    """12 connections trickle an A-ASSOCIATE-RQ a byte at a time: the ones over the per-address limit are
    dropped at once, the others when acse_timeout has passed since they connected; then a C-ECHO works."""
    per_peer = 4
    lst = make_listener(max_associations_per_peer=per_peer)
    request = associate_rq_head(length=1000)
    socks = [socket.create_connection(("127.0.0.1", lst.port)) for _ in range(12)]
    start = time.monotonic()
    try:
        for i in range(len(request)):
            if time.monotonic() - start > ACSE + 2:
                break
            for sock in socks:
                try:
                    sock.send(request[i:i + 1])
                except OSError:
                    pass
            time.sleep(0.25)
        rows = wait_drops(lst, 12)
        assert time.monotonic() - start < ACSE + 4
        reasons = [r.detail.split(":")[0] for r in rows]
        assert reasons.count(DropReason.TOO_MANY_FROM_PEER.value) == 12 - per_peer
        assert reasons.count(DropReason.ASSOCIATE_TOO_SLOW.value) == per_peer
        for sock in socks:
            assert seconds_until_closed(sock, 2) is not None
    finally:
        for sock in socks:
            sock.close()
    assert echo_ok(lst.port)
    assert echo_ok(lst.port)  # the slots were given back


def test_trickled_pdu_inside_an_association_is_aborted_after_network_timeout(make_listener):
    lst = make_listener()
    assoc = requestor().associate("127.0.0.1", lst.port, ae_title="CTNODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    start = time.monotonic()
    raw.sendall(b"\x04\x00" + struct.pack(">I", 1000))
    while assoc.is_alive() and time.monotonic() - start < NETWORK + 5:
        try:
            raw.send(b"\x00")  # a byte every 0.2 s: each read sees progress, the whole PDU never arrives
        except OSError:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 5
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted and elapsed < NETWORK + 2, elapsed
    [row] = wait_drops(lst, 1)
    assert DropReason.PDU_TOO_SLOW.value in row.detail
    assert echo_ok(lst.port)


@pytest.mark.parametrize("pdu", [b"\x09\x00\x00\x00\x00\x04abcd", b"\x02\x00\x00\x00\x00\x04abcd"])
def test_unknown_pdu_type_before_association_is_dropped_at_once(make_listener, pdu):
    lst = make_listener()
    with socket.create_connection(("127.0.0.1", lst.port)) as sock:
        sock.sendall(pdu)
        assert (seconds_until_closed(sock, 5) or 99) < 1.0
    [row] = wait_drops(lst, 1)
    assert DropReason.UNKNOWN_PDU.value in row.detail and f"0x{pdu[0]:02X}" in row.detail


def test_unknown_pdu_type_and_context_inside_an_association_abort_at_once(make_listener):
    lst = make_listener()
    for pdu, reason in ((b"\x09\x00\x00\x00\x00\x04abcd", DropReason.UNKNOWN_PDU),
                        # a P-DATA-TF whose one PDV names presentation context 99 (never negotiated)
                        (b"\x04\x00\x00\x00\x00\x08" + struct.pack(">IBB", 4, 99, 0x03) + b"\x00\x00",
                         DropReason.UNKNOWN_CONTEXT)):
        assoc = requestor().associate("127.0.0.1", lst.port, ae_title="CTNODE")
        assert assoc.is_established
        start = time.monotonic()
        assoc.dul.socket.socket.sendall(pdu)
        while assoc.is_alive() and time.monotonic() - start < 5:
            time.sleep(0.02)
        assert assoc.is_aborted and time.monotonic() - start < 1.5
        assert reason.value in wait_drops(lst, 1)[-1].detail
        with lst.sessions() as s:
            s.execute(Event.__table__.delete().where(Event.kind == "connection_dropped"))
            s.commit()
    assert echo_ok(lst.port)


def test_silent_connection_is_closed_after_acse_timeout_and_audited(make_listener):
    lst = make_listener()
    with socket.create_connection(("127.0.0.1", lst.port)) as sock:
        elapsed = seconds_until_closed(sock, 10)
    assert elapsed is not None and ACSE - 0.5 < elapsed < ACSE + 1.5, elapsed
    [row] = wait_drops(lst, 1)
    assert DropReason.SILENT.value in row.detail
    assert echo_ok(lst.port)


def test_peer_that_closes_before_requesting_leaves_no_row(make_listener):
    lst = make_listener()
    socket.create_connection(("127.0.0.1", lst.port)).close()  # e.g. a port check
    assert echo_ok(lst.port)
    time.sleep(0.3)
    assert drops(lst) == []


# -- hostile data sets ---------------------------------------------------------------------------------------


@pytest.fixture
def raw_files(monkeypatch):
    """pynetdicom sends a file's data set bytes as they are on disk (not decoded and encoded again)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def store_file(port: int, path, syntaxes=(ExplicitVRLittleEndian,)) -> tuple[int, str]:
    ae = requestor()
    ae.requested_contexts = []
    ae.add_requested_context(CTImageStorage, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title="CTNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return status.Status, str(status.get("ErrorComment", ""))
    finally:
        assoc.release()


def instance_rows(lst: Listener) -> int:
    with lst.sessions() as s:
        return len(s.scalars(select(Instance)).all())


def test_pixel_data_cut_short_is_refused_before_success(make_listener, tmp_path, raw_files):
    """A file cut off inside its Pixel Data, the element's length intact, sent as it is."""
    lst = make_listener()
    path = tmp_path / "cut.dcm"
    ct_slice(size=64).save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes()[:-1000])
    status, comment = store_file(lst.port, path)
    assert status == StoreStatus.CANNOT_UNDERSTAND and comment == "Pixel Data cut short (7192 of 8192 bytes)"
    assert instance_rows(lst) == 0
    [row] = wait_drops(lst, 1, "instance_refused")
    assert "cut short" in row.detail


def test_affected_sop_instance_uid_must_be_the_data_sets(make_listener, tmp_path, raw_files):
    """pynetdicom takes the Affected SOP Instance UID of a file from its meta header: here another UID."""
    lst = make_listener()
    ds = ct_slice()
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.preamble = b"\x00" * 128
    path = tmp_path / "other.dcm"
    ds.save_as(path)  # as it is: enforce_file_format would copy the data set's UID into the meta header
    status, comment = store_file(lst.port, path)
    assert status == StoreStatus.CANNOT_UNDERSTAND and "Affected SOP Instance UID" in comment
    assert instance_rows(lst) == 0
    [row] = wait_drops(lst, 1, "instance_refused")
    assert "Affected SOP Instance UID" in row.detail and row.study_instance_uid == ds.StudyInstanceUID


def test_compressed_image_decoding_beyond_the_limit_is_refused(make_listener, tmp_path, raw_files):
    """A few KB of RLE whose header says 12000 x 12000: ~275 MB once decoded, over max_instance_mb = 64."""
    lst = make_listener(max_instance_mb=64)
    ds = ct_slice(size=64)
    ds.compress(RLELossless)
    ds.Rows = ds.Columns = 12000
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    status, comment = store_file(lst.port, path, [RLELossless])
    assert status == StoreStatus.OUT_OF_RESOURCES and comment == "decoded Pixel Data 275 MB above node.max_instance_mb"
    assert instance_rows(lst) == 0
    small = ct_slice(size=64)
    small.compress(RLELossless)
    small.save_as(path, enforce_file_format=True)
    assert store_file(lst.port, path, [RLELossless]) == (StoreStatus.SUCCESS, "")


@pytest.mark.parametrize(("free", "text"), [(32 * MB, "32 MB free"), (int(1.5 * 1024**3), "1.5 GB free")])
def test_disk_guard_names_megabytes_under_a_gigabyte(tmp_path, free, text):
    guard = DiskGuard(tmp_path, min_free_gb=2, max_used_percent=0, probe=lambda _: DiskState(free, 100 * 1024**3))
    assert text in guard.problem()
