"""The outbox: results are sent by C-STORE to every configured destination, with capped retries.

Each (job, destination, object) is one ``exports`` row, claimed with a lease by the process sending it
(several processes may share the database, :mod:`node.lease`), so no two processes send it at once. A row is
marked ``sent`` in the same scheduler tick right after the peer answered success, so a restart never sends a confirmed object again; a crash in the
instant between the peer's success and that commit can cause one resend of the same SOP Instance UID, which
PACS treat as an idempotent overwrite. After ``export.max_attempts`` failures a row is ``dead`` until
``ctnode jobs retry``.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker

from node.config import Destination, Settings
from node.db.schema import Export, utcnow
from node.db.states import ExportState, transition
from node.lease import this_process
from node.registry import add_event, claim_due_exports
from node.dicom.status import STORED, StoreStatus
from node.dicom.tls import client_tls_args

log = logging.getLogger(__name__)


@dataclass
class SendOutcome:
    ok: bool
    error: str = ""


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
    """C-STORE ``paths`` to ``dest`` over one association; one outcome per path, in order."""
    datasets = [dcmread(p) for p in paths]
    ae = _ae(settings)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=client_tls_args(dest))
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "peer unreachable or association aborted"
        if dest.tls and not assoc.is_rejected:
            reason += " (TLS: check the peer certificate, tls_ca_file and tls_server_name)"
        return [SendOutcome(False, reason)] * len(paths)
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
                outcomes.append(SendOutcome(True))
            else:
                outcomes.append(SendOutcome(False, f"C-STORE status 0x{code:04X} {status.get('ErrorComment', '')}".strip()))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def backoff(settings: Settings, attempts: int) -> dt.timedelta:
    e = settings.export
    return dt.timedelta(seconds=min(e.backoff_base * 2 ** max(attempts - 1, 0), e.backoff_max))


def run_exports(settings: Settings, sessions: sessionmaker[Session], owner: str | None = None,
                on_attempt: Callable[[str], None] | None = None) -> int:
    """Claim the due exports for ``owner`` (default: a new identity of this process), send them, record each
    outcome and free its claim; returns how many were sent. ``on_attempt`` gets each attempt's outcome
    ("sent", "failed" or "dead"), e.g. for metrics."""
    destinations = {d.name: d for d in settings.destinations}
    owner = owner or str(this_process(settings))
    sent = 0
    with sessions() as session:
        rows = claim_due_exports(session, owner, settings.processing.lease_s)
        session.commit()  # the claims are visible to every other process before anything is sent
        by_dest: dict[str, list[Export]] = {}
        for row in rows:
            by_dest.setdefault(row.destination, []).append(row)
        for name, group in by_dest.items():
            dest = destinations.get(name)
            if dest is None:
                outcomes = [SendOutcome(False, f"destination {name!r} is no longer configured")] * len(group)
            else:
                try:
                    outcomes = send_files(settings, dest, [Path(r.path) for r in group])
                except Exception as exc:  # e.g. a result file removed by hand
                    outcomes = [SendOutcome(False, f"{type(exc).__name__}: {exc}")] * len(group)
            for row, outcome in zip(group, outcomes):
                row.attempts += 1
                row.owner = row.lease_until = None
                if outcome.ok:
                    transition(row, ExportState.SENT)
                    row.sent_at, row.last_error = utcnow(), ""
                    sent += 1
                    add_event(session, "export_sent", f"{row.sop_instance_uid} to {name}", job_id=row.job_id)
                elif row.attempts >= settings.export.max_attempts:
                    transition(row, ExportState.DEAD)
                    row.last_error = outcome.error
                    log.error("export %d to %s is dead after %d attempts: %s", row.id, name, row.attempts, outcome.error)
                    add_event(session, "export_dead", f"to {name} after {row.attempts} attempts: {outcome.error}",
                              job_id=row.job_id)
                else:
                    row.last_error = outcome.error
                    row.next_attempt_at = utcnow() + backoff(settings, row.attempts)
                    log.warning("export %d to %s failed (attempt %d): %s", row.id, name, row.attempts, outcome.error)
                    add_event(session, "export_failed", f"to {name}, attempt {row.attempts}: {outcome.error}",
                              job_id=row.job_id)
                session.commit()  # one commit per object: a crash never forgets a confirmed send
                if on_attempt is not None:
                    on_attempt("sent" if outcome.ok else "dead" if row.state == ExportState.DEAD else "failed")
    return sent
