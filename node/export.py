"""The outbox: results are sent to every configured destination, with capped retries.

Each (job, destination, object) is one ``exports`` row, claimed with a lease by the process sending it
(several processes may share the database, :mod:`node.lease`), so no two processes send it at once. A
destination's transport (:mod:`node.exporters`: C-STORE or STOW-RS) sends a batch and answers one
:class:`SendOutcome` per object; this module alone turns outcomes into states, retries and audit events, the
same way for every transport. A row is marked ``sent`` in the same scheduler tick right after the peer
confirmed it, so a restart never sends a confirmed object again; a crash in the instant between the peer's
success and that commit can cause one resend of the same SOP Instance UID, which PACS treat as an idempotent
overwrite. A transient failure is retried after :func:`backoff`; after ``export.max_attempts`` failures, or at
once when the destination rejected the object itself (a permanent failure), a row is ``dead`` until
``ctnode jobs retry``.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from node.config import Destination, Settings, Transport
from node.db.schema import Export, utcnow
from node.db.states import ExportState, transition
from node.exporters import cstore, stowrs
from node.exporters.outcome import SendOutcome, all_failed
from node.lease import this_process
from node.registry import add_event, claim_due_exports

log = logging.getLogger(__name__)

Sender = Callable[[Settings, Destination, list[Path]], list[SendOutcome]]
#: The transport of each kind of destination.
SENDERS: dict[Transport, Sender] = {Transport.DIMSE: cstore.send_files, Transport.STOW_RS: stowrs.send_files}


def send_files(settings: Settings, dest: Destination, paths: list[Path]) -> list[SendOutcome]:
    """Send ``paths`` to ``dest`` with its transport; one outcome per path, in order."""
    return SENDERS[dest.transport](settings, dest, paths)


def backoff(settings: Settings, attempts: int) -> dt.timedelta:
    e = settings.export
    return dt.timedelta(seconds=min(e.backoff_base * 2 ** max(attempts - 1, 0), e.backoff_max))


def run_exports(settings: Settings, sessions: sessionmaker[Session], owner: str | None = None,
                on_attempt: Callable[[str], None] | None = None,
                on_takeover: Callable[[int], None] | None = None) -> int:
    """Claim the due exports for ``owner`` (default: a new identity of this process), send them, record each
    outcome and free its claim; returns how many were sent. ``on_attempt`` gets each attempt's outcome
    ("sent", "failed" or "dead"), ``on_takeover`` how many claims were taken over from expired leases (e.g.
    for metrics)."""
    destinations = {d.name: d for d in settings.destinations}
    owner = owner or str(this_process(settings))
    sent = 0
    with sessions() as session:
        rows, taken_over = claim_due_exports(session, owner, settings.processing.lease_s)
        session.commit()  # the claims are visible to every other process before anything is sent
        if taken_over and on_takeover is not None:
            on_takeover(taken_over)
        by_dest: dict[str, list[Export]] = {}
        for row in rows:
            by_dest.setdefault(row.destination, []).append(row)
        for name, group in by_dest.items():
            dest = destinations.get(name)
            if dest is None:
                outcomes = all_failed(len(group), f"destination {name!r} is no longer configured")
            else:
                try:
                    outcomes = send_files(settings, dest, [settings.files.results_file(r.path) for r in group])
                except Exception as exc:  # e.g. a result file removed by hand
                    outcomes = all_failed(len(group), f"{type(exc).__name__}: {exc}")
            for row, outcome in zip(group, outcomes):
                row.attempts += 1
                row.owner = row.lease_until = None
                if outcome.ok:
                    transition(row, ExportState.SENT)
                    row.sent_at, row.last_error = utcnow(), ""
                    sent += 1
                    warning = f" (warning: {outcome.warning})" if outcome.warning else ""
                    add_event(session, "export_sent", f"{row.sop_instance_uid} to {name}{warning}", job_id=row.job_id)
                elif outcome.permanent:
                    transition(row, ExportState.DEAD)
                    row.last_error = outcome.error
                    log.error("export %d to %s was rejected (not retried): %s", row.id, name, outcome.error)
                    add_event(session, "export_dead", f"rejected by {name} (not retried): {outcome.error}",
                              job_id=row.job_id)
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
