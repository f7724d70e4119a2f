"""The DIMSE transport: result files sent by C-STORE over one association per batch (optionally DICOM TLS),
and ``ctnode echo`` (C-ECHO)."""
from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import Destination, Settings
from node.dicom.status import STORED, StoreStatus
from node.dicom.tls import client_tls_args
from node.exporters.outcome import SendOutcome, all_failed


def _ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.export.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.export.timeout
    return ae


def echo(settings: Settings, dest: Destination) -> SendOutcome:
    """C-ECHO a destination (``ctnode echo``)."""
    ae = _ae(settings)
    ae.add_requested_context(Verification)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=client_tls_args(dest))
    if not assoc.is_established:
        return SendOutcome(False, "association rejected or peer unreachable" + (" (TLS)" if dest.tls else ""))
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == StoreStatus.SUCCESS
        return SendOutcome(ok, "" if ok else f"C-ECHO status {getattr(status, 'Status', 'none')}")
    finally:
        assoc.release()


def send_files(settings: Settings, dest: Destination, paths: list[Path]) -> list[SendOutcome]:
    """C-STORE ``paths`` to ``dest`` over one association; one outcome per path, in order. Every failure is
    transient (retried with backoff up to ``export.max_attempts``)."""
    datasets = [dcmread(p) for p in paths]
    ae = _ae(settings)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=client_tls_args(dest))
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "peer unreachable or association aborted"
        if dest.tls and not assoc.is_rejected:
            reason += " (TLS: check the peer certificate, tls_ca_file and tls_server_name)"
        return all_failed(len(paths), reason)
    outcomes = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:
                outcomes.append(SendOutcome(False, f"{type(exc).__name__}: {exc}"))
                continue
            code = getattr(status, "Status", None)
            if code is None:
                outcomes.append(SendOutcome(False, "no response (timeout or aborted)"))
            elif code in STORED:  # success or warning
                outcomes.append(SendOutcome(True, warning="" if code == StoreStatus.SUCCESS
                                            else f"C-STORE status 0x{code:04X}"))
            else:
                outcomes.append(SendOutcome(False, f"C-STORE status 0x{code:04X} {status.get('ErrorComment', '')}".strip()))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
