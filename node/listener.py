"""The DICOM listener: Verification and CT Image Storage SCP (pynetdicom).

A C-STORE is acknowledged with success only after the bytes, exactly as received, are in the spool (atomic
write) and the instance is committed to the database. Anything the node cannot process is refused with a
DICOM failure status and an ErrorComment, and the refusal is in the audit log.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.registry import ReceivedInstance, add_event, record_instance
from node.spool import atomic_write, is_valid_uid, spool_path

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
    return str(req.ae_title).strip(), f"{req.address}:{req.port}"


class Listener:
    """Owns the pynetdicom AE; ``start()`` returns at once, ``stop()`` shuts the server down."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.settings = settings
        self.sessions = sessions
        self._db_lock = threading.Lock()  # one writer at a time: SQLite allows no more, and it keeps study upserts simple
        self._server = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings.node
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        if s.allowed_calling_aets:
            ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES)
        # Accepted at negotiation so that each instance gets a clear refusal instead of a silent context rejection.
        ae.add_supported_context(EnhancedCTImageStorage, TRANSFER_SYNTAXES)
        return ae

    # -- server lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        s = self.settings.node
        self._server = self.ae.start_server((s.host, s.port), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", s.ae_title, s.host, self.port)

    @property
    def port(self) -> int:
        if self._server is not None:
            return self._server.server_address[1]
        return self.settings.node.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- audit ------------------------------------------------------------------------------------------
    def _audit(self, kind: str, event: Any, detail: str = "", study_uid: str = "") -> None:
        aet, peer = _peer(event)
        try:
            with self._db_lock, self.sessions.begin() as session:
                add_event(session, kind, detail, calling_aet=aet, peer=peer, study_uid=study_uid)
        except Exception:  # the audit log must never take the listener down
            log.exception("could not write audit event %s", kind)

    def _on_accepted(self, event: Any) -> None:
        self._audit("association_accepted", event, f"called AE {event.assoc.acceptor.ae_title.strip()}")

    def _on_rejected(self, event: Any) -> None:
        aet, peer = _peer(event)
        log.warning("association rejected: calling AE %s from %s", aet, peer)
        self._audit("association_rejected", event, "calling AE not in node.allowed_calling_aets or called AE mismatch")

    def _on_aborted(self, event: Any) -> None:
        self._audit("association_aborted", event)

    # -- DIMSE ------------------------------------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        return SUCCESS

    def _refuse(self, event: Any, code: int, reason: str, study_uid: str = "") -> Dataset:
        log.warning("instance refused (0x%04X): %s", code, reason)
        self._audit("instance_refused", event, f"0x{code:04X} {reason}", study_uid if is_valid_uid(study_uid) else "")
        return _status(code, reason)

    def handle_store(self, event: Any) -> Dataset | int:
        context = event.context
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:  # undecodable element stream
            return self._refuse(event, CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}")
        sop_class = str(context.abstract_syntax)
        study_uid = str(ds.get("StudyInstanceUID", ""))
        if sop_class == EnhancedCTImageStorage:
            return self._refuse(event, SOP_CLASS_NOT_SUPPORTED,
                                "Enhanced CT not supported: send CT Image Storage", study_uid)
        if str(ds.get("SOPClassUID", "")) != sop_class:
            return self._refuse(event, DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID does not match the context", study_uid)
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            return self._refuse(event, DOES_NOT_MATCH_SOP_CLASS, f"Modality {modality or 'missing'}, expected CT", study_uid)
        uids = {k: ds.get(k, "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        for key, value in uids.items():
            if not is_valid_uid(str(value)):
                return self._refuse(event, CANNOT_UNDERSTAND, f"invalid {key}", study_uid)
        if "PixelData" not in ds:
            return self._refuse(event, DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data", study_uid)

        settings = self.settings
        path = spool_path(settings.spool_dir, *(str(v) for v in uids.values()))
        aet, _ = _peer(event)
        try:
            size, digest = atomic_write(path, [event.encoded_dataset(include_meta=True)])
        except OSError as exc:
            log.error("spool write failed: %s", exc)
            return self._refuse(event, OUT_OF_RESOURCES, f"cannot write spool: {exc.strerror}", study_uid)
        received = ReceivedInstance(
            study_instance_uid=str(uids["StudyInstanceUID"]), series_instance_uid=str(uids["SeriesInstanceUID"]),
            sop_instance_uid=str(uids["SOPInstanceUID"]), sop_class_uid=sop_class,
            transfer_syntax_uid=str(context.transfer_syntax), path=str(path), size=size, sha256=digest,
            calling_aet=aet, modality=modality, series_description=str(ds.get("SeriesDescription", "")),
            patient_id=str(ds.get("PatientID", "")), accession_number=str(ds.get("AccessionNumber", "")),
        )
        try:
            with self._db_lock, self.sessions.begin() as session:
                record_instance(session, received)
        except Exception as exc:
            # Not recorded => not acknowledged; the peer will retry. The spool file is kept (harmless: a
            # retry overwrites it atomically; retention removes files no instance row points to).
            log.error("database error while recording an instance: %s", exc)
            return _status(OUT_OF_RESOURCES, "database unavailable, retry later")
        return SUCCESS
