"""The DICOM listener: Verification, CT Image Storage and (reference) Segmentation Storage SCP (pynetdicom).

A C-STORE is acknowledged with success only after the bytes, exactly as received, are in the spool (atomic
write) and the instance is committed to the database. Anything the node cannot process is refused with a
DICOM failure status and an ErrorComment, and the refusal is in the audit log.

Connection and association gate (in this order; :mod:`node.dicom.transport`): peer address allowed at
all, connections per peer address, TLS handshake, then, on the A-ASSOCIATE-RQ's first bytes, calling AE
allow-list, its address binding (``node.allowed_peers``) and the called AE title; then (here) the disk
guard (spool filesystem too full: transient rejection) and pynetdicom's association limit. Every rejection
is an ``association_rejected`` event with the calling AE, the peer address and why; a connection dropped
before that (size, time, protocol) is a ``connection_dropped`` event. Optional DICOM TLS (``[tls]``) wraps
every association.

A Segmentation (Modality SEG) is a *reference* to audit the node against (e.g. a radiologist's corrected
SEG): it is spooled and acknowledged the same way, under ``<spool>/references/``, and recorded in
``reference_segs``; it never starts or joins a processing job (:mod:`node.agreement` compares it later).

Log lines never carry patient identifiers: refusal reasons are built from fixed text and sanitised code
strings only; UIDs are not logged (the audit table holds them).
"""
from __future__ import annotations

import logging
import os
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
from pynetdicom import AE, _config as pynetdicom_config, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, SegmentationStorage, Verification
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.schema import Instance, Study
from node.dicom.headers import referenced_series_uid, safe_code, validate_instance, validate_reference
from node.dicom.part10 import part10_header
from node.dicom.status import REJECT_REASONS, StoreStatus, status_dataset
from node.dicom.tls import ServerContexts, server_ssl_context
from node.dicom.transport import harden
from node.registry import ReceivedInstance, ReceivedReference, add_event, record_instance, record_reference
from node.logredact import install_log_redaction
from node.spool import STAGING_DIR, DiskGuard, Stager, is_valid_uid, place, sha256_of, spool_path

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit,
]

def _peer(event: Any) -> tuple[str, str]:
    req = event.assoc.requestor
    aet = req.ae_title
    if req.primitive is not None and req.primitive.calling_ae_title:  # set before negotiation copies it
        aet = req.primitive.calling_ae_title
    return str(aet).strip(), f"{req.address}:{req.port}"


def _db_error(exc: Exception) -> str:
    """An error description without SQL parameters (SQLAlchemy's str() includes them: patient IDs)."""
    if isinstance(exc, DBAPIError):
        return f"{type(exc).__name__}: {exc.orig}"
    return type(exc).__name__


CHUNK = 1 << 20
REFERENCES_DIR = "references"  # spool sub-folder for reference SEGs (never a UID, so never a study folder)


class Listener:
    """Owns the pynetdicom AE; ``start()`` returns at once, ``stop()`` shuts the server down."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 on_event: Callable[[str, str], None] | None = None):
        self.settings = settings
        self.sessions = sessions
        self.on_event = on_event  # (kind, detail) of every audit event, e.g. for metrics (node.metrics)
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
        harden(self._server, s, ServerContexts(self.settings.tls, ssl_context), self._audit_connection)
        log.info("listening as %s on %s:%d%s", s.ae_title, s.host, self.port,
                 " (TLS" + (", client certificates required)" if self.settings.tls.require_client_cert else ")")
                 if self.settings.tls.enabled else "")

    def _audit_connection(self, kind: str, detail: str, peer: str, calling_aet: str) -> None:
        """An audit row about a connection the transport guard refused or dropped (no association yet)."""
        if self.on_event is not None:
            self.on_event(kind, detail)
        try:
            with self._db_lock, self.sessions.begin() as session:
                add_event(session, kind, detail, calling_aet=calling_aet, peer=peer)
        except Exception as exc:  # the audit log must never take the listener down
            log.error("could not write audit event %s: %s", kind, _db_error(exc))

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
        if self.on_event is not None:
            self.on_event(kind, detail)
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

    def _on_rejected(self, event: Any) -> None:
        aet, peer = _peer(event)
        rj = event.assoc.acceptor.primitive
        key = (getattr(rj, "result_source", None), getattr(rj, "diagnostic", None))
        why = REJECT_REASONS.get(key, f"rejected (source {key[0]}, diagnostic {key[1]})")
        if key == (1, 7):
            called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
            why = f"called AE title {safe_code(called) if called else 'empty'} is not {self.settings.node.ae_title}"
        log.warning("association rejected: calling AE %s from %s: %s", aet, peer, why)
        self._audit("association_rejected", event, why)

    def _on_aborted(self, event: Any) -> None:
        self._audit("association_aborted", event)

    # -- DIMSE ------------------------------------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        return StoreStatus.SUCCESS

    def _refuse(self, event: Any, code: int, reason: str, study_uid: str = "") -> Dataset:
        log.warning("instance refused (0x%04X): %s", code, reason)
        self._audit("instance_refused", event, f"0x{code:04X} {reason}", study_uid if is_valid_uid(study_uid) else "")
        return status_dataset(code, reason)

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
            return status_dataset(StoreStatus.OUT_OF_RESOURCES, "database unavailable, retry later")

    def _spool_failed(self, event: Any, exc: OSError, study_uid: str = "") -> Dataset:
        log.error("spool write failed: %s", exc.strerror or type(exc).__name__)
        return self._refuse(event, StoreStatus.OUT_OF_RESOURCES, f"cannot write spool: {exc.strerror}", study_uid)

    def _store_reference(self, event: Any, ds: Dataset, uids: dict[str, str], digest: tuple[int, str],
                         staged: futures.Future[Path]) -> Dataset | int:
        """A reference Segmentation: validate, spool, record; no study, instance or job row is touched."""
        study_uid = uids["StudyInstanceUID"]
        problem = validate_reference(ds, str(event.context.abstract_syntax), max_decoded=self.max_instance_bytes)
        if problem is not None:
            return self._refuse(event, problem[0], problem[1], study_uid)
        path = spool_path(self.settings.spool_dir / REFERENCES_DIR, *uids.values())
        aet, _ = _peer(event)

        def record(session: Session, size: int, digest: str) -> str:
            return record_reference(session, ReceivedReference(
                study_instance_uid=study_uid, series_instance_uid=uids["SeriesInstanceUID"],
                sop_instance_uid=uids["SOPInstanceUID"], source_series_uid=referenced_series_uid(ds),
                path=self.settings.files.spool_name(path), size=size, sha256=digest, calling_aet=aet))

        outcome = self._record(event, path, study_uid, digest, staged, record, ct_instance=False)
        return outcome if isinstance(outcome, Dataset) else StoreStatus.SUCCESS

    def handle_store(self, event: Any) -> Dataset | int:
        size, tmp_path = self._received_size(event)
        if size > self.max_instance_bytes:
            return self._refuse(event, StoreStatus.OUT_OF_RESOURCES,
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
            return self._refuse(event, StoreStatus.CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}")
        if str(event.request.AffectedSOPInstanceUID) != uids["SOPInstanceUID"]:
            # the file's meta header is built from the request: both must name the same instance
            return self._refuse(event, StoreStatus.CANNOT_UNDERSTAND,
                                "SOPInstanceUID is not the request's Affected SOP Instance UID", study_uid)
        if sop_class == SegmentationStorage:
            return self._store_reference(event, ds, uids, digest, staged)
        problem = validate_instance(ds, sop_class, str(context.transfer_syntax), max_decoded=self.max_instance_bytes)
        if problem is not None:
            return self._refuse(event, problem[0], problem[1], study_uid)
        try:
            study_bytes = self._study_bytes(study_uid)
        except Exception as exc:  # the database is down: the sender must retry, not give up (0xC211)
            log.error("database error while checking the study size: %s", _db_error(exc))
            return status_dataset(StoreStatus.OUT_OF_RESOURCES, "database unavailable, retry later")
        if study_bytes + size > self.max_study_bytes:
            return self._refuse(event, StoreStatus.OUT_OF_RESOURCES, "study above node.max_study_gb", study_uid)

        path = spool_path(self.settings.spool_dir, *uids.values())
        aet, _ = _peer(event)

        def record(session: Session, size: int, digest: str) -> str:
            return record_instance(session, ReceivedInstance(
                study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
                sop_instance_uid=uids["SOPInstanceUID"], sop_class_uid=sop_class,
                transfer_syntax_uid=str(context.transfer_syntax), path=self.settings.files.spool_name(path),
                size=size, sha256=digest, calling_aet=aet, modality=modality, series_description=series_description,
                patient_id=patient_id, accession_number=accession))

        outcome = self._record(event, path, study_uid, digest, staged, record, ct_instance=True)
        return outcome if isinstance(outcome, Dataset) else StoreStatus.SUCCESS
