"""Timeouts: a peer that stalls (before associating, halfway through a PDU, inside an association, or in the
TLS handshake) costs one connection for at most the configured timeout, and never stops the listener."""
from __future__ import annotations

import socket
import struct
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from node.db.schema import Event
from tests.tls_ca import client_ctx, tls_node
from tests.util import seconds_until_closed

pytestmark = pytest.mark.integration

ACSE, NETWORK = 1.0, 2.0


@pytest.fixture
def listener(start_listener):
    """A listener with short timeouts (``network_timeout`` also the DIMSE timeout) and ``node`` on top."""
    def start(network_timeout=NETWORK, node=None, **sections):
        return start_listener(node={"acse_timeout": ACSE, "network_timeout": network_timeout,
                                    "dimse_timeout": network_timeout, **(node or {})}, **sections)
    return start


def requestor(timeouts: bool = True) -> AE:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = 10
    if not timeouts:  # only the node's timers may end the association
        ae.network_timeout = ae.dimse_timeout = None
    return ae


def wait_dead(assoc, limit: float = 20.0) -> float:
    start = time.monotonic()
    while assoc.is_alive() and time.monotonic() - start < limit:
        time.sleep(0.05)
    return time.monotonic() - start


def still_serving(port: int, tls=None) -> None:
    assoc = requestor().associate("127.0.0.1", port, ae_title="CTNODE", tls_args=tls)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def aborted_events(lst) -> int:
    with lst.sessions() as s:
        return len(s.scalars(select(Event).where(Event.kind == "association_aborted")).all())


def test_tcp_connection_that_never_associates_is_closed(listener):
    lst = listener()
    with socket.create_connection(("127.0.0.1", lst.port)) as sock:
        elapsed = seconds_until_closed(sock)
    assert elapsed is not None and elapsed < ACSE + 3, elapsed
    still_serving(lst.port)


def test_peer_stalling_inside_a_pdu_is_dropped(listener):
    """Half a PDU header, then nothing: pynetdicom alone would wait forever in recv()."""
    lst = listener()
    with socket.create_connection(("127.0.0.1", lst.port)) as sock:
        sock.sendall(b"\x01\x00\x00\x00")  # A-ASSOCIATE-RQ type, the length never completed
        elapsed = seconds_until_closed(sock)
    assert elapsed is not None and elapsed < NETWORK + 3, elapsed
    still_serving(lst.port)


def test_association_stalling_inside_a_pdu_is_aborted(listener):
    lst = listener()
    assoc = requestor(timeouts=False).associate("127.0.0.1", lst.port, ae_title="CTNODE")
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">I", 1000) + b"\x00" * 10)  # P-DATA cut short
    elapsed = wait_dead(assoc)
    assert assoc.is_aborted and elapsed < NETWORK + 3, elapsed
    still_serving(lst.port)


def test_idle_association_is_aborted_and_audited(listener):
    lst = listener()
    assoc = requestor(timeouts=False).associate("127.0.0.1", lst.port, ae_title="CTNODE")
    assert assoc.is_established
    elapsed = wait_dead(assoc)
    assert assoc.is_aborted and NETWORK - 0.5 < elapsed < NETWORK + 3, elapsed
    deadline = time.monotonic() + 5
    while aborted_events(lst) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted_events(lst) == 1
    still_serving(lst.port)


def test_silent_tcp_connection_does_not_block_tls_clients(listener, pki):  # noqa: F811
    """pynetdicom runs the TLS handshake in its accept loop; the node moves it to the connection's thread."""
    lst = listener(network_timeout=4.0, node={"allowed_calling_aets": ["SENDER"]}, tls=tls_node(pki))
    with socket.create_connection(("127.0.0.1", lst.port)) as silent:
        start = time.monotonic()
        still_serving(lst.port, tls=(client_ctx(pki), "localhost"))  # while the silent one is still open
        assert time.monotonic() - start < 3.0
        elapsed = seconds_until_closed(silent)
    assert elapsed is not None and elapsed < 4.0 + 3, elapsed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with lst.sessions() as s:
            failures = s.scalars(select(Event).where(Event.kind == "tls_handshake_failed")).all()
        if failures:
            break
        time.sleep(0.05)
    assert len(failures) == 1 and "timed out" in failures[0].detail
