"""The listener's connections under pynetdicom's server: every byte a peer sends is bounded in size and time
before pynetdicom buffers it.

pynetdicom 3 reads a whole PDU into memory whatever length it declares, checks callers only once the whole
A-ASSOCIATE-RQ is in, waits in ``recv()`` for as long as a peer keeps trickling bytes, and runs the TLS
handshake in its accept loop. :func:`harden` replaces, on one server, ``get_request`` and
``process_request_thread`` (``AssociationServer``), the request handler's ``_create_association`` and,
on each accepted connection, ``AssociationSocket.recv``/``ready``, so that:

* the peer address is checked against the allow-list as the connection is accepted, and one address holds
  at most ``node.max_associations_per_peer`` connections;
* the TLS handshake and the whole A-ASSOCIATE-RQ must arrive within ``node.acse_timeout`` of the
  connection (a peer that sends nothing, or trickles, is dropped then); the request may declare at most
  :data:`ASSOCIATE_RQ_MAX_LENGTH` bytes, and the called and calling AE titles are checked as soon as the
  first :data:`AE_TITLES_END` bytes are in (an A-ASSOCIATE-RJ, as pynetdicom would send);
* after that, each PDU must arrive whole within ``node.network_timeout`` of its first byte, declare at most
  the node's maximum PDU size (plus :data:`PDU_LENGTH_SLACK`), be of a type a requestor may send, and carry
  data only for negotiated presentation contexts.

A peer that breaks a rule gets an A-ABORT (or A-ASSOCIATE-RJ) and the connection is closed at once; each is
reported to ``audit`` with the reason (:class:`~node.dicom.status.DropReason`).
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pynetdicom.transport import AssociationSocket, RequestHandler

from node.config import NodeSettings
from node.dicom.access import address_allowed, association_refusal
from node.dicom.status import DropReason
from node.dicom.tls import ServerContexts

log = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ length field accepted (bytes after the 6-byte header); real requests are a few
#: hundred bytes to a few KiB (one presentation context item per SOP class and transfer syntaxes).
ASSOCIATE_RQ_MAX_LENGTH = 64 * 1024
PDU_HEADER_LENGTH = 6
#: The A-ASSOCIATE-RQ's fixed part up to the end of its reserved field (PS3.8 9.3.2): called AE title at
#: bytes 10-25, calling AE title at 26-41; checked before the rest of the request is read.
AE_TITLES_END = 74
_CALLED, _CALLING = slice(10, 26), slice(26, 42)
#: Bytes a PDU's length field may exceed the node's maximum PDU size by (item headers some peers count out).
PDU_LENGTH_SLACK = 1024
#: At most this long is spent sending an A-ABORT/A-ASSOCIATE-RJ to a dropped peer and reading what it had
#: already sent (so the kernel closes with FIN, not RST, and the peer reads the answer).
FAREWELL_SECONDS = 1.0
_RECV_CHUNK = 64 * 1024

Audit = Callable[[str, str, str, str], None]  # (event kind, detail, peer "host:port", calling AE)


class PduType(IntEnum):
    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


#: PDU types a requestor may send once its A-ASSOCIATE-RQ is in.
_AFTER_REQUEST = {PduType.P_DATA_TF, PduType.RELEASE_RQ, PduType.RELEASE_RP, PduType.ABORT}


class AbortReason(IntEnum):
    """A-ABORT reason/diag. when the source is the service provider (PS3.8 9.3.8)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


def abort_pdu(reason: AbortReason) -> bytes:
    """A-ABORT from the service provider (source 2)."""
    return struct.pack(">BBLBBBB", PduType.ABORT, 0, 4, 0, 0, 2, reason)


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return struct.pack(">BBLBBBB", PduType.ASSOCIATE_RJ, 0, 4, 0, result, source, diagnostic)


class Dropped(Exception):
    """The peer broke a rule: audit ``kind``/``detail``, send ``reply``, read up to ``drain`` bytes, close."""

    def __init__(self, reason: DropReason | None, detail: str, reply: bytes = b"", *, kind: str = "connection_dropped",
                 calling_aet: str = "", drain: int = 0):
        self.reason, self.kind, self.reply, self.calling_aet, self.drain = reason, kind, reply, calling_aet, drain
        self.detail = f"{reason.value}: {detail}" if reason is not None else detail
        super().__init__(self.detail)


class PeerClosed(Exception):
    """The peer closed the connection (or aborted) before its request was complete: nothing to report."""


class _Reader:
    """Reads exactly n bytes before ``deadline`` (time.monotonic()); each wait is cut to the time left, so a
    peer sending a byte at a time cannot extend it. Raises TimeoutError or PeerClosed; ``received`` counts
    every byte that arrived."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline, self.received = sock, deadline, 0

    def read(self, n: int) -> bytearray:
        buf = bytearray()
        while len(buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(n - len(buf), _RECV_CHUNK))
            except (TimeoutError, socket.timeout):
                raise TimeoutError from None
            except OSError as exc:
                raise PeerClosed from exc
            if not chunk:
                raise PeerClosed
            buf += chunk
            self.received += len(chunk)
        return buf


def _farewell(sock: socket.socket, reply: bytes, drain: int) -> None:
    """Best effort: send ``reply``, read (and discard) up to ``drain`` bytes, for FAREWELL_SECONDS at most."""
    end = time.monotonic() + FAREWELL_SECONDS
    try:
        if reply:
            sock.settimeout(FAREWELL_SECONDS)
            sock.sendall(reply)
        while drain > 0:
            left = end - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(min(drain, _RECV_CHUNK))
            if not chunk:
                break
            drain -= len(chunk)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _ae_title(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


@dataclass(frozen=True)
class Limits:
    acse_timeout: float
    network_timeout: float
    max_pdu_length: int       # largest PDU length field accepted once the request is in
    per_peer: int

    @classmethod
    def of(cls, node: NodeSettings) -> Limits:
        # max_pdu_size 0 (no limit negotiated): a PDU is still never larger than the largest instance
        biggest = node.max_pdu_size or int(node.max_instance_mb * 1024**2)
        return cls(node.acse_timeout, node.network_timeout, biggest + PDU_LENGTH_SLACK, node.max_associations_per_peer)


class PeerSlots:
    """Connections held per peer address (from acceptance until the association thread ends)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, ip: str) -> bool:
        with self._lock:
            if self._held[ip] >= self.limit:
                return False
            self._held[ip] += 1
            return True

    def release(self, ip: str) -> None:
        with self._lock:
            self._held[ip] -= 1
            if self._held[ip] <= 0:
                del self._held[ip]


def read_associate_rq(sock: socket.socket, node: NodeSettings, ip: str, deadline: float) -> bytes:
    """The peer's A-ASSOCIATE-RQ PDU, whole, once its size, callers and timing passed; raises Dropped or
    PeerClosed otherwise."""
    reader = _Reader(sock, deadline)
    try:
        header = reader.read(PDU_HEADER_LENGTH)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type == PduType.ABORT:
            raise PeerClosed
        if pdu_type != PduType.ASSOCIATE_RQ:
            known = pdu_type in PduType._value2member_map_
            raise Dropped(DropReason.UNKNOWN_PDU, f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", abort_pdu(
                AbortReason.UNEXPECTED_PDU if known else AbortReason.UNRECOGNIZED_PDU))
        if length > ASSOCIATE_RQ_MAX_LENGTH:
            raise Dropped(DropReason.ASSOCIATE_TOO_LONG, f"{length} bytes declared, at most {ASSOCIATE_RQ_MAX_LENGTH}",
                          abort_pdu(AbortReason.INVALID_PDU_PARAMETER_VALUE))
        if length < AE_TITLES_END - PDU_HEADER_LENGTH:
            raise Dropped(DropReason.MALFORMED_PDU, f"A-ASSOCIATE-RQ of {length} bytes",
                          abort_pdu(AbortReason.INVALID_PDU_PARAMETER_VALUE))
        fixed = header + reader.read(AE_TITLES_END - PDU_HEADER_LENGTH)
        calling, called = _ae_title(fixed[_CALLING]), _ae_title(fixed[_CALLED])
        refused = association_refusal(node, calling, called, ip)
        if refused is not None:
            raise Dropped(None, refused.why, reject_pdu(refused.result, refused.source, refused.diagnostic),
                          kind="association_rejected", calling_aet=calling,
                          drain=length + PDU_HEADER_LENGTH - AE_TITLES_END)
        return bytes(fixed + reader.read(length + PDU_HEADER_LENGTH - AE_TITLES_END))
    except TimeoutError:
        if reader.received == 0:
            raise Dropped(DropReason.SILENT, "nothing received") from None
        raise Dropped(DropReason.ASSOCIATE_TOO_SLOW, f"{reader.received} bytes received",
                      abort_pdu(AbortReason.NOT_SPECIFIED)) from None


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket for one accepted connection: first hands out the A-ASSOCIATE-RQ the guard read,
    then reads each PDU within the limits (pynetdicom's DUL reads a PDU as ``recv(6)`` then
    ``recv(length)``)."""

    _prefix: bytearray
    _limits: Limits
    _audit: Audit
    _peer: str
    _calling_aet: str
    _body_left: int
    _pdu_type: int
    _deadline: float
    _dropped: bool

    def guard(self, prefix: bytes, limits: Limits, audit: Audit, peer: str, calling_aet: str) -> None:
        self._prefix, self._limits, self._audit = bytearray(prefix), limits, audit
        self._peer, self._calling_aet = peer, calling_aet
        self._body_left, self._pdu_type, self._deadline, self._dropped = 0, 0, 0.0, False

    @property
    def ready(self) -> bool:
        return bool(self._prefix) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if self._prefix:
            out = self._prefix[:nr_bytes]
            del self._prefix[:nr_bytes]
            return out
        if self._dropped:
            return bytearray()
        try:
            if self._body_left == 0:
                return self._header(nr_bytes)
            return self._body(nr_bytes)
        except Dropped as drop:
            self._drop(drop)
        except TimeoutError:
            self._drop(Dropped(DropReason.PDU_TOO_SLOW, f"{self._limits.network_timeout:g} s",
                               abort_pdu(AbortReason.NOT_SPECIFIED)))
        except PeerClosed:
            self._dropped = True
        return bytearray()  # pynetdicom reads a short PDU as "transport connection closed" (Evt17)

    def _header(self, nr_bytes: int) -> bytearray:
        self._deadline = time.monotonic() + self._limits.network_timeout
        header = _Reader(self.socket, self._deadline).read(nr_bytes)
        if nr_bytes != PDU_HEADER_LENGTH:  # not pynetdicom 3's reading pattern: pass the bytes through
            return header
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _AFTER_REQUEST:
            known = pdu_type in PduType._value2member_map_
            raise Dropped(DropReason.UNKNOWN_PDU, f"PDU type 0x{pdu_type:02X} in an association", abort_pdu(
                AbortReason.UNEXPECTED_PDU if known else AbortReason.UNRECOGNIZED_PDU))
        if length > self._limits.max_pdu_length:
            raise Dropped(DropReason.PDU_TOO_LONG, f"{length} bytes declared, at most {self._limits.max_pdu_length}",
                          abort_pdu(AbortReason.INVALID_PDU_PARAMETER_VALUE))
        self._body_left, self._pdu_type = length, pdu_type
        return header

    def _body(self, nr_bytes: int) -> bytearray:
        body = _Reader(self.socket, self._deadline).read(min(nr_bytes, self._body_left))
        self._body_left -= len(body)
        if self._pdu_type == PduType.P_DATA_TF:
            self._check_contexts(body)
        return body

    def _check_contexts(self, body: bytearray) -> None:
        """Every presentation data value item names a negotiated presentation context (PS3.8 9.3.5)."""
        accepted = {cx.context_id for cx in self.assoc.accepted_contexts}
        offset = 0
        while offset + 5 <= len(body):
            item_length = struct.unpack_from(">L", body, offset)[0]
            context_id = body[offset + 4]
            if accepted and context_id not in accepted:
                raise Dropped(DropReason.UNKNOWN_CONTEXT, f"context ID {context_id}",
                              abort_pdu(AbortReason.INVALID_PDU_PARAMETER_VALUE))
            offset += 4 + item_length

    def _drop(self, drop: Dropped) -> None:
        self._dropped = True
        log.warning("connection from %s dropped: %s", self._peer, drop.detail)
        self._audit(drop.kind, drop.detail, self._peer, self._calling_aet)
        _farewell(self.socket, drop.reply, 0)
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _peer_text(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def _tls_reason(exc: Exception) -> str:
    # e.g. "certificate revoked" (verify_message), "CERTIFICATE_VERIFY_FAILED", "timed out"
    return str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__)


def harden(server: Any, node: NodeSettings, contexts: ServerContexts, audit: Audit) -> None:
    """Guard every connection ``server`` (a started pynetdicom ``AssociationServer``) accepts (see the module)."""
    limits = Limits.of(node)
    slots = PeerSlots(limits.per_peer)
    original_thread = server.process_request_thread
    handing_over = threading.local()  # the connection thread's read request, for _create_association

    class GuardedRequestHandler(RequestHandler):
        def _create_association(self) -> Any:
            assoc = super()._create_association()
            prefix, peer, calling_aet, ip = handing_over.request
            sock = assoc.dul.socket
            sock.__class__ = GuardedSocket  # the same object, with the guarded recv/ready
            sock.guard(prefix, limits, audit, peer, calling_aet)
            run = assoc.run

            def run_then_free_slot() -> None:
                try:
                    run()
                finally:
                    slots.release(ip)

            assoc.run = run_then_free_slot
            handing_over.handed = True
            return assoc

    server.RequestHandlerClass = GuardedRequestHandler

    def get_request() -> tuple[socket.socket, Any]:
        sock, address = server.socket.accept()
        sock.settimeout(limits.network_timeout)
        context = contexts.current()
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def drop(request: socket.socket, address: Any, reason: DropReason, detail: str) -> None:
        log.warning("connection from %s dropped: %s: %s", _peer_text(address), reason.value, detail)
        audit("connection_dropped", f"{reason.value}: {detail}", _peer_text(address), "")
        _close(request)

    def process_request_thread(request: socket.socket, address: Any) -> None:
        deadline = time.monotonic() + limits.acse_timeout
        ip = str(address[0]) if isinstance(address, tuple) else str(address)
        if not address_allowed(node, ip):
            drop(request, address, DropReason.PEER_NOT_ALLOWED, ip)
            return
        if not slots.acquire(ip):
            drop(request, address, DropReason.TOO_MANY_FROM_PEER, f"{slots.limit} held")
            return
        handing_over.handed = False
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(max(deadline - time.monotonic(), 0.001))
                    request.do_handshake()
                except (OSError, ValueError) as exc:
                    why = _tls_reason(exc)
                    log.warning("TLS handshake with %s failed: %s", _peer_text(address), why)
                    audit("tls_handshake_failed", why, _peer_text(address), "")
                    _close(request)
                    return
            try:
                rq = read_associate_rq(request, node, ip, deadline)
            except PeerClosed:
                _close(request)
                return
            except Dropped as exc:
                log.warning("connection from %s dropped: %s", _peer_text(address), exc.detail)
                audit(exc.kind, exc.detail, _peer_text(address), exc.calling_aet)
                _farewell(request, exc.reply, exc.drain)
                _close(request)
                return
            request.settimeout(limits.network_timeout)
            handing_over.request = (rq, _peer_text(address), _ae_title(rq[_CALLING]), ip)
            original_thread(request, address)
        finally:
            if not handing_over.handed:
                slots.release(ip)
            handing_over.request = None

    server.get_request = get_request
    server.process_request_thread = process_request_thread
