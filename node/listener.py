"""The DICOM listener: Verification, CT Image Storage and (reference) Segmentation Storage SCP (pynetdicom).

A C-STORE is acknowledged with success only after the bytes, exactly as received, are in the spool (atomic
write) and the instance is committed to the database. Anything the node cannot process is refused with a
DICOM failure status and an ErrorComment, and the refusal is in the audit log.

Association gate (in this order): disk guard (spool filesystem too full: transient rejection), peer-address
binding (``node.allowed_peers``), then pynetdicom's calling-AE allow-list, called-AE check and association
limit. Every rejection is an ``association_rejected`` event with the calling AE, the peer address and why.
Optional DICOM TLS (``[tls]``) wraps every association.

A Segmentation (Modality SEG) is a *reference* to audit the node against (e.g. a radiologist's corrected
SEG): it is spooled and acknowledged the same way, under ``<spool>/references/``, and recorded in
``reference_segs``; it never starts or joins a processing job (:mod:`node.agreement` compares it later).

Log lines never carry patient identifiers: refusal reasons are built from fixed text and sanitised code
strings only; UIDs are not logged (the audit table holds them).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)
from pynetdicom import (AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
                        _config as pynetdicom_config, evt)
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, SegmentationStorage, Verification
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.schema import Instance, Study
from node.registry import ReceivedInstance, ReceivedReference, add_event, record_instance, record_reference
from node.pipeline.volume import numbers_of
from node.logredact import install_log_redaction
from node.security import peer_allowed, server_ssl_context
from node.spool import STAGING_DIR, DiskGuard, Stager, is_valid_uid, place, sha256_of, spool_path

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit,
]

# DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4.2.1.4)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def _peer(event: Any) -> tuple[str, str]:
    req = event.assoc.requestor
    aet = req.ae_title
    if req.primitive is not None and req.primitive.calling_ae_title:  # set before negotiation copies it
        aet = req.primitive.calling_ae_title
    return str(aet).strip(), f"{req.address}:{req.port}"


_CS_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def _safe_code(value: object) -> str:
    """A code string (Modality...) for a log line or comment, or "invalid" when it is not a plain CS value:
    a sender could put anything in a refused element, including a patient's name."""
    text = str(value).strip()
    return text if _CS_RE.match(text) else "invalid"


def _db_error(exc: Exception) -> str:
    """An error description without SQL parameters (SQLAlchemy's str() includes them: patient IDs)."""
    if isinstance(exc, DBAPIError):
        return f"{type(exc).__name__}: {exc.orig}"
    return type(exc).__name__


# A-ASSOCIATE-RJ (result, source, diagnostic) -> why, for the audit log (PS3.8 9.3.4)
_REJECT_REASONS = {
    (1, 3): "calling AE title not allowed (node.allowed_calling_aets / node.allowed_peers)",
    (1, 7): "called AE title is not this node's",
    (3, 2): "too many associations (node.max_associations)",
    (3, 1): "temporary congestion",
    (2, 1): "ACSE: no reason given (user identity?)",
}

CHUNK = 1 << 20
PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 7.1


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in Explicit VR Little Endian (OB has the long form: 2 reserved bytes, 4-byte length)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble and File Meta Information for a received data set, byte for byte what pynetdicom's
    ``encode_file_meta(event.file_meta)`` gives (tested), built without a pydicom data set: it runs for every
    instance while the sender waits, and pydicom's writer costs more than the rest of the header work."""
    def ui(uid: str) -> bytes:
        raw = uid.encode("ascii", "replace")  # a peer's Affected SOP Instance UID is not validated here
        return raw + b"\x00" * (len(raw) % 2)

    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", ui(sop_class)),
        _meta_element(0x0003, b"UI", ui(sop_instance)),
        _meta_element(0x0010, b"UI", ui(transfer_syntax)),
        _meta_element(0x0012, b"UI", ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),
    ))
    return PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


NATIVE_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return None


def validate_instance(ds: Dataset, sop_class: str, transfer_syntax: str) -> tuple[int, str] | None:
    """Instance-level checks done before an instance is stored: (status, reason) to refuse it, or None.

    Only what no series could ever use is refused here (cheap header checks; the listener stays fast).
    Geometry and series consistency (positions, orientation, spacing, tilt, duplicates) are judged later
    by series selection, where the job ends "skipped" or "failed" with the reason. Raises nothing for any
    header (a malformed value is a refusal, not an exception).
    """
    try:
        return _validate_instance(ds, sop_class, transfer_syntax)
    except Exception as exc:  # a value pydicom cannot convert: the instance is not understood
        return CANNOT_UNDERSTAND, f"cannot read header values: {type(exc).__name__}"


def _identity_problem(ds: Dataset, sop_class: str, modality: str) -> tuple[int, str] | None:
    """Checks every stored object passes (CT and reference SEG alike): SOP class, Modality, UIDs usable
    for spool paths, Pixel Data present."""
    if str(ds.get("SOPClassUID", "")) != sop_class:
        return DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID does not match the context"
    found = str(ds.get("Modality", ""))
    if found != modality:
        return DOES_NOT_MATCH_SOP_CLASS, f"Modality {_safe_code(found) if found else 'missing'}, expected {modality}"
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_valid_uid(str(ds.get(key, ""))):
            return CANNOT_UNDERSTAND, f"invalid {key}"
    if "PixelData" not in ds:
        return DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data"
    return None


def _validate_instance(ds: Dataset, sop_class: str, transfer_syntax: str) -> tuple[int, str] | None:
    if sop_class == EnhancedCTImageStorage:
        return SOP_CLASS_NOT_SUPPORTED, "Enhanced CT not supported: send CT Image Storage"
    problem = _identity_problem(ds, sop_class, "CT")
    if problem is not None:
        return problem
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return DOES_NOT_MATCH_SOP_CLASS, (f"not a greyscale image (SamplesPerPixel {samples}, "
                                          f"{_safe_code(photometric)}); CT must be MONOCHROME")
    rows, cols, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
    if not rows or not cols or rows < 0 or cols < 0:
        return CANNOT_UNDERSTAND, "Rows/Columns missing, zero or malformed"
    if bits not in (8, 16, 32):
        return CANNOT_UNDERSTAND, f"BitsAllocated {bits} not supported (8, 16 or 32)"
    for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        # Absent or degenerate geometry is a series-level question (the job is skipped with the reason);
        # a present element that is not `count` finite numbers is a malformed instance.
        if keyword in ds and ds[keyword].value not in (None, "") and numbers_of(ds, keyword, count) is None:
            return CANNOT_UNDERSTAND, f"{keyword} is not {count} numbers"
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        return CANNOT_UNDERSTAND, "NumberOfFrames is not a positive number"
    if transfer_syntax in NATIVE_SYNTAXES:
        element = ds.get_item("PixelData")  # a raw element knows its length without reading a deferred value
        length = getattr(element, "length", None)
        if length is None or length == 0xFFFFFFFF:
            value = element.value
            length = len(value) if isinstance(value, (bytes, bytearray)) else None
        expected = rows * cols * frames * bits // 8
        if not length:
            return CANNOT_UNDERSTAND, "Pixel Data is empty"
        if length is not None and not expected <= length <= expected + 1:
            word = "shorter" if length < expected else "longer"
            return CANNOT_UNDERSTAND, f"Pixel Data {word} than Rows x Columns ({length} vs {expected} bytes)"
    return None


REFERENCES_DIR = "references"  # spool sub-folder for reference SEGs (never a UID, so never a study folder)


def referenced_series_uid(ds: Dataset) -> str:
    """The source series a SEG segments: the first valid SeriesInstanceUID of its ReferencedSeriesSequence."""
    for item in ds.get("ReferencedSeriesSequence", None) or []:
        uid = str(item.get("SeriesInstanceUID", ""))
        if is_valid_uid(uid):
            return uid
    return ""


def validate_reference(ds: Dataset, sop_class: str) -> tuple[int, str] | None:
    """Checks for a reference Segmentation before it is stored: (status, reason) to refuse it, or None."""
    try:
        problem = _identity_problem(ds, sop_class, "SEG")
        if problem is not None:
            return problem
        if not referenced_series_uid(ds):
            return CANNOT_UNDERSTAND, "SEG without ReferencedSeriesSequence"
    except Exception as exc:
        return CANNOT_UNDERSTAND, f"cannot read header values: {type(exc).__name__}"
    return None


class _TLSContexts:
    """The listener's TLS context, rebuilt when ``tls.crl_file`` changes on disk (a refreshed revocation
    list takes effect for the next connection, without a restart). A CRL file that cannot be loaded keeps
    the previous context and logs an error."""

    def __init__(self, tls: Any, context: ssl.SSLContext | None):
        self.tls, self.context = tls, context
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.tls.crl_file)
            return st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def current(self) -> ssl.SSLContext | None:
        if self.context is None or not self.tls.crl_file:
            return self.context
        stamp = self._stamp()
        if stamp != self.stamp:
            try:
                self.context = server_ssl_context(self.tls)
                log.info("TLS: revocation list %s reloaded", self.tls.crl_file)
            except (OSError, ssl.SSLError) as exc:
                log.error("TLS: cannot load the revocation list %s (%s); the previous one stays in force",
                          self.tls.crl_file, exc)
            self.stamp = stamp
        return self.context


class Listener:
    """Owns the pynetdicom AE; ``start()`` returns at once, ``stop()`` shuts the server down."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.settings = settings
        self.sessions = sessions
        self._db_lock = threading.Lock()  # one writer at a time: SQLite allows no more, and it keeps study upserts simple
        # Bytes stored per study (for max_study_gb): read from the database once per study, then kept up to
        # date here, so the check costs no query per instance. Guarded by _db_lock.
        self._study_sizes: dict[str, int] = {}
        self._server = None
        self._stager: Stager | None = None  # made by start(): it creates the spool's staging folder
        install_log_redaction()
        s = settings.node
        self.disk_guard = DiskGuard(settings.spool_dir, s.min_free_gb, s.max_used_percent)
        self.max_instance_bytes = int(s.max_instance_mb * 1024**2)
        self.max_study_bytes = int(s.max_study_gb * 1024**3)
        if s.receive_to_disk:
            # Process-wide pynetdicom switch: data sets go to a temporary file while they arrive.
            pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's standard event handlers describe every PDU and DIMSE message (a "Received Store
        # Request" line per instance at INFO, a dump of each message at DEBUG) and copy each data set to do
        # so (without them 0.95-0.99 of the ingest time, docs/performance.md). The audit table records every
        # instance, so they run only when pynetdicom's DEBUG output is wanted (``ctnode -v``). Process-wide,
        # read by each association as it starts (the export's too).
        pynetdicom_config.LOG_HANDLER_LEVEL = (
            "standard" if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG) else "none")
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings.node
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.max_pdu_size
        ae.require_called_aet = s.require_called_aet
        allowed = s.effective_calling_aets()
        if allowed:
            ae.require_calling_aet = allowed
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES)
        # Accepted at negotiation so that each instance gets a clear refusal instead of a silent context rejection.
        ae.add_supported_context(EnhancedCTImageStorage, TRANSFER_SYNTAXES)
        ae.add_supported_context(SegmentationStorage, TRANSFER_SYNTAXES)  # references (node.agreement)
        return ae

    # -- server lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        s = self.settings.node
        ssl_context = server_ssl_context(self.settings.tls)
        self._stager = Stager(self.settings.spool_dir / STAGING_DIR, s.max_associations)
        self._server = self.ae.start_server((s.host, s.port), block=False, evt_handlers=handlers,
                                            ssl_context=ssl_context)
        self._harden(self._server, ssl_context)
        log.info("listening as %s on %s:%d%s", s.ae_title, s.host, self.port,
                 " (TLS" + (", client certificates required)" if self.settings.tls.require_client_cert else ")")
                 if self.settings.tls.enabled else "")

    def _harden(self, server: Any, ssl_context: ssl.SSLContext | None) -> None:
        """Make a stalled or hostile peer cost one thread for at most ``node.network_timeout`` seconds.

        pynetdicom accepts connections with blocking sockets and, with TLS, runs the handshake in the
        accept loop: a peer that stops halfway through a PDU would hold its thread forever, and one that
        opens a TCP connection to the TLS port and sends nothing would stop the node accepting anyone.
        Here each accepted socket gets the network timeout, and the TLS handshake moves to the
        connection's own thread, where a failure is audited ("tls_handshake_failed") and the connection
        closed.
        """
        timeout = self.settings.node.network_timeout
        original_thread = server.process_request_thread
        contexts = _TLSContexts(self.settings.tls, ssl_context)

        def get_request() -> tuple[socket.socket, Any]:
            sock, address = server.socket.accept()
            sock.settimeout(timeout)
            context = contexts.current()
            if context is not None:
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return sock, address

        def process_request_thread(request: Any, address: Any) -> None:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.do_handshake()
                except (OSError, ValueError) as exc:
                    self._audit_tls_failure(address, exc)
                    server.shutdown_request(request)
                    return
            original_thread(request, address)

        server.get_request = get_request
        server.process_request_thread = process_request_thread

    def _audit_tls_failure(self, address: Any, exc: Exception) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        # e.g. "certificate revoked" (verify_message), "CERTIFICATE_VERIFY_FAILED", "timed out"
        why = (getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
               or type(exc).__name__)
        log.warning("TLS handshake with %s failed: %s", peer, why)
        try:
            with self._db_lock, self.sessions.begin() as session:
                add_event(session, "tls_handshake_failed", str(why), peer=peer)
        except Exception as db_exc:
            log.error("could not write audit event tls_handshake_failed: %s", _db_error(db_exc))

    @property
    def port(self) -> int:
        if self._server is not None:
            return self._server.server_address[1]
        return self.settings.node.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # -- audit ------------------------------------------------------------------------------------------
    def _audit(self, kind: str, event: Any, detail: str = "", study_uid: str = "") -> None:
        aet, peer = _peer(event)
        try:
            with self._db_lock, self.sessions.begin() as session:
                add_event(session, kind, detail, calling_aet=aet, peer=peer, study_uid=study_uid)
        except Exception as exc:  # the audit log must never take the listener down
            log.error("could not write audit event %s: %s", kind, _db_error(exc))

    def _on_accepted(self, event: Any) -> None:
        self._audit("association_accepted", event, f"called AE {event.assoc.acceptor.ae_title.strip()}")

    def _reject(self, event: Any, result: int, source: int, diagnostic: int, why: str) -> None:
        """Reject an association from the EVT_REQUESTED handler (before any negotiation)."""
        aet, peer = _peer(event)
        log.warning("association rejected: calling AE %s from %s: %s", aet, peer, why)
        self._audit("association_rejected", event, why)
        event.assoc.acse.send_reject(result, source, diagnostic)
        event.assoc.kill()

    def _on_requested(self, event: Any) -> None:
        problem = self.disk_guard.problem()
        if problem:
            # transient, presentation related, temporary congestion: the sender retries later
            self._reject(event, 0x02, 0x03, 0x01, f"disk guard: {problem}")
            return
        aet, _ = _peer(event)
        address = str(event.assoc.requestor.address)
        if not peer_allowed(self.settings.node, aet, address):
            self._reject(event, 0x01, 0x01, 0x03, f"calling AE {aet} not allowed from {address} (node.allowed_peers)")

    def _on_rejected(self, event: Any) -> None:
        aet, peer = _peer(event)
        rj = event.assoc.acceptor.primitive
        key = (getattr(rj, "result_source", None), getattr(rj, "diagnostic", None))
        why = _REJECT_REASONS.get(key, f"rejected (source {key[0]}, diagnostic {key[1]})")
        if key == (1, 7):
            called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
            why = f"called AE title {_safe_code(called) if called else 'empty'} is not {self.settings.node.ae_title}"
        log.warning("association rejected: calling AE %s from %s: %s", aet, peer, why)
        self._audit("association_rejected", event, why)

    def _on_aborted(self, event: Any) -> None:
        self._audit("association_aborted", event)

    # -- DIMSE ------------------------------------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        return SUCCESS

    def _refuse(self, event: Any, code: int, reason: str, study_uid: str = "") -> Dataset:
        log.warning("instance refused (0x%04X): %s", code, reason)
        self._audit("instance_refused", event, f"0x{code:04X} {reason}", study_uid if is_valid_uid(study_uid) else "")
        return _status(code, reason)

    def _received_size(self, event: Any) -> tuple[int, Path | None]:
        """(data set bytes received, temporary file when receive_to_disk) without copying the data."""
        path = getattr(event.request, "_dataset_path", None)
        if path is not None:
            return os.path.getsize(path), Path(path)
        stream = getattr(event.request, "DataSet", None)
        return (stream.getbuffer().nbytes if stream is not None else 0), None

    @staticmethod
    def _file_chunks(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def _study_bytes(self, study_uid: str) -> int:
        with self._db_lock:
            if study_uid not in self._study_sizes:
                with self.sessions() as session:
                    total = session.scalar(
                        select(func.coalesce(func.sum(Instance.size), 0)).join(Study, Instance.study_id == Study.id)
                        .where(Study.study_instance_uid == study_uid, Instance.purged_at.is_(None)))
                self._study_sizes[study_uid] = int(total or 0)
            return self._study_sizes[study_uid]

    @contextmanager
    def _instance_bytes(self, event: Any, tmp_path: Path | None) -> Iterator[Callable[[], Iterable[bytes]]]:
        """The instance exactly as received, as a function giving a fresh iterator of chunks each call."""
        if tmp_path is not None:
            # pynetdicom wrote preamble + file meta (from the same request and context as event.file_meta)
            # + the data set as received: the same bytes as encoded_dataset().
            yield lambda: self._file_chunks(tmp_path)
            return
        request = event.request
        header = part10_header(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID,
                               event.context.transfer_syntax)
        # encoded_dataset() without its join: the data set is used from pynetdicom's buffer, uncopied.
        with request.DataSet.getbuffer() as data_set:
            yield lambda: (header, data_set)

    def _record(self, event: Any, path: Path, study_uid: str, digest: tuple[int, str],
                staged: futures.Future[Path], record: Callable[[Session, int, str], str],
                ct_instance: bool) -> Dataset | str:
        """Record the instance (``digest``: its file's size and SHA-256) and move its staged file to ``path``:
        the outcome of ``record``, or the status to answer. A stored ``ct_instance`` counts toward its study's
        size (node.max_study_gb).

        The file is placed (and its folder fsynced) inside the transaction, so the row commits only once the
        file is durable under its final name: a committed row always has its file.
        """
        size, sha256 = digest
        try:
            with self._db_lock:
                with self.sessions.begin() as session:
                    outcome = record(session, size, sha256)
                    place(staged.result(), path)  # an OSError (also the staging's) rolls the row back
                if ct_instance and outcome == "stored" and study_uid in self._study_sizes:
                    self._study_sizes[study_uid] += size
            return outcome
        except OSError as exc:  # the spool write
            return self._spool_failed(event, exc, study_uid)
        except Exception as exc:
            # Not recorded => not acknowledged; the peer will retry. If the file was placed it stays
            # (harmless: a retry overwrites it atomically; start-up recovery registers it otherwise).
            log.error("database error while recording an instance: %s", _db_error(exc))
            return _status(OUT_OF_RESOURCES, "database unavailable, retry later")

    def _spool_failed(self, event: Any, exc: OSError, study_uid: str = "") -> Dataset:
        log.error("spool write failed: %s", exc.strerror or type(exc).__name__)
        return self._refuse(event, OUT_OF_RESOURCES, f"cannot write spool: {exc.strerror}", study_uid)

    def _store_reference(self, event: Any, ds: Dataset, uids: dict[str, str], digest: tuple[int, str],
                         staged: futures.Future[Path]) -> Dataset | int:
        """A reference Segmentation: validate, spool, record; no study, instance or job row is touched."""
        study_uid = uids["StudyInstanceUID"]
        problem = validate_reference(ds, str(event.context.abstract_syntax))
        if problem is not None:
            return self._refuse(event, problem[0], problem[1], study_uid)
        path = spool_path(self.settings.spool_dir / REFERENCES_DIR, *uids.values())
        aet, _ = _peer(event)

        def record(session: Session, size: int, digest: str) -> str:
            return record_reference(session, ReceivedReference(
                study_instance_uid=study_uid, series_instance_uid=uids["SeriesInstanceUID"],
                sop_instance_uid=uids["SOPInstanceUID"], source_series_uid=referenced_series_uid(ds),
                path=str(path), size=size, sha256=digest, calling_aet=aet))

        outcome = self._record(event, path, study_uid, digest, staged, record, ct_instance=False)
        return outcome if isinstance(outcome, Dataset) else SUCCESS

    def handle_store(self, event: Any) -> Dataset | int:
        size, tmp_path = self._received_size(event)
        if size > self.max_instance_bytes:
            return self._refuse(event, OUT_OF_RESOURCES,
                                f"instance of {size / 1024**2:.0f} MB above node.max_instance_mb")
        with self._instance_bytes(event, tmp_path) as chunks:
            # The bytes go to the spool's staging folder (written durably) in a spool thread while this one
            # hashes, parses, validates and prepares the row: the wait for the disk overlaps work that does not
            # need it. Hashing first releases the GIL at once (hashlib does), so the spool thread starts its
            # write then rather than after the parse. A refused or unrecorded instance's staged file is removed.
            staged = self._stager.submit(chunks())
            try:
                try:
                    digest = sha256_of(chunks())
                except OSError as exc:  # receive_to_disk: reading the received file
                    return self._spool_failed(event, exc)
                return self._check_and_record(event, size, tmp_path, digest, staged)
            finally:
                futures.wait([staged])  # the chunks must outlive the write
                if staged.exception() is None:
                    staged.result().unlink(missing_ok=True)  # no-op once placed

    def _check_and_record(self, event: Any, size: int, tmp_path: Path | None, digest: tuple[int, str],
                          staged: futures.Future[Path]) -> Dataset | int:
        context = event.context
        try:
            if tmp_path is not None:  # receive_to_disk: parse the header only, pixel data stays on disk
                ds = dcmread(tmp_path, defer_size=4096)
            else:
                ds = event.dataset
            sop_class = str(context.abstract_syntax)
            study_uid = str(ds.get("StudyInstanceUID", ""))
            modality = str(ds.get("Modality", ""))
            uids = {k: str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
            series_description = str(ds.get("SeriesDescription", ""))
            patient_id, accession = str(ds.get("PatientID", "")), str(ds.get("AccessionNumber", ""))
        except Exception as exc:  # undecodable element stream
            return self._refuse(event, CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}")
        if sop_class == SegmentationStorage:
            return self._store_reference(event, ds, uids, digest, staged)
        problem = validate_instance(ds, sop_class, str(context.transfer_syntax))
        if problem is not None:
            return self._refuse(event, problem[0], problem[1], study_uid)
        try:
            study_bytes = self._study_bytes(study_uid)
        except Exception as exc:  # the database is down: the sender must retry, not give up (0xC211)
            log.error("database error while checking the study size: %s", _db_error(exc))
            return _status(OUT_OF_RESOURCES, "database unavailable, retry later")
        if study_bytes + size > self.max_study_bytes:
            return self._refuse(event, OUT_OF_RESOURCES, "study above node.max_study_gb", study_uid)

        path = spool_path(self.settings.spool_dir, *uids.values())
        aet, _ = _peer(event)

        def record(session: Session, size: int, digest: str) -> str:
            return record_instance(session, ReceivedInstance(
                study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
                sop_instance_uid=uids["SOPInstanceUID"], sop_class_uid=sop_class,
                transfer_syntax_uid=str(context.transfer_syntax), path=str(path), size=size, sha256=digest,
                calling_aet=aet, modality=modality, series_description=series_description,
                patient_id=patient_id, accession_number=accession))

        outcome = self._record(event, path, study_uid, digest, staged, record, ct_instance=True)
        return outcome if isinstance(outcome, Dataset) else SUCCESS
