"""The states of jobs, exports and reference SEGs, and the only moves allowed between them.

Every write of a ``state`` column goes through :func:`transition` (or, for a guarded bulk update,
:func:`check_transition`), so a move the diagrams in :mod:`node.db.schema` do not show raises
:class:`TransitionError` instead of reaching the database. The database itself only accepts the values of
these enums (CHECK constraints, migration 0004).
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol, TypeVar


class JobState(enum.StrEnum):
    RECEIVED = "received"      # collecting instances
    READY = "ready"            # stable for ``processing.stable_after``: waiting for a worker
    PROCESSING = "processing"  # claimed by a worker (``attempts`` counts the claims)
    DONE = "done"
    SKIPPED = "skipped"        # nothing analysable (the reason says why)
    FAILED = "failed"


class ExportState(enum.StrEnum):
    PENDING = "pending"  # to be sent (again after ``next_attempt_at``)
    SENT = "sent"
    DEAD = "dead"        # ``export.max_attempts`` failures: waits for ``ctnode jobs retry``


class ReferenceState(enum.StrEnum):
    PENDING = "pending"      # received, not compared yet
    DONE = "done"            # compared with the node's latest result for its series
    UNMATCHED = "unmatched"  # no node result for its series yet: tried again on every tick
    FAILED = "failed"        # cannot be read or compared (the reason says why)
    ANATOMY = "anatomy"      # a lobe map, used for the zones of a result, not compared
    EXPIRED = "expired"      # still without a node result after ``storage.retention_days``: given up


State = TypeVar("State", JobState, ExportState, ReferenceState)

#: Jobs not finished yet (their study's files are kept).
JOB_UNFINISHED: tuple[JobState, ...] = (JobState.RECEIVED, JobState.READY, JobState.PROCESSING)
#: Jobs finished (``finished_at`` is set).
JOB_FINISHED: tuple[JobState, ...] = (JobState.DONE, JobState.SKIPPED, JobState.FAILED)
#: References the agreement tick still compares: waiting ones, and compared ones whose series got a newer result.
REFERENCE_OPEN: tuple[ReferenceState, ...] = (ReferenceState.PENDING, ReferenceState.UNMATCHED, ReferenceState.DONE)
#: What comparing a reference (or taking a lobe map) can make of it.
_COMPARED = frozenset({ReferenceState.UNMATCHED, ReferenceState.DONE, ReferenceState.FAILED, ReferenceState.ANATOMY})
#: A reference re-sent with other bytes is compared again, whatever it was.
_RESENT = frozenset({ReferenceState.PENDING})

_ALLOWED: Mapping[type[enum.StrEnum], Mapping[enum.StrEnum, frozenset[enum.StrEnum]]] = {
    JobState: {
        JobState.RECEIVED: frozenset({JobState.READY}),
        # more instances arrived before a worker took it: collecting again
        JobState.READY: frozenset({JobState.RECEIVED, JobState.PROCESSING}),
        # the worker's outcome; back to ready when the worker died or the node restarted (a retry)
        JobState.PROCESSING: frozenset({JobState.DONE, JobState.SKIPPED, JobState.FAILED, JobState.READY}),
        JobState.DONE: frozenset(),      # late instances start a new job version instead
        JobState.SKIPPED: frozenset(),
        JobState.FAILED: frozenset({JobState.READY}),  # ctnode jobs retry
    },
    ExportState: {
        ExportState.PENDING: frozenset({ExportState.SENT, ExportState.DEAD}),
        ExportState.SENT: frozenset(),
        ExportState.DEAD: frozenset({ExportState.PENDING}),  # ctnode jobs retry
    },
    ReferenceState: {
        ReferenceState.PENDING: _COMPARED | _RESENT | {ReferenceState.EXPIRED},
        ReferenceState.UNMATCHED: _COMPARED | _RESENT | {ReferenceState.EXPIRED},
        ReferenceState.DONE: _COMPARED | _RESENT,  # compared again with a newer result
        ReferenceState.FAILED: _RESENT,
        ReferenceState.ANATOMY: _RESENT,
        ReferenceState.EXPIRED: _RESENT,
    },
}


class TransitionError(ValueError):
    """A state change that the state machine does not allow."""


class HasState(Protocol):
    state: str


def allowed(old: State, new: State) -> bool:
    """Whether ``old -> new`` is an allowed move (both of the same enum)."""
    return new in _ALLOWED[type(new)][type(new)(old)]


def check_transition(old: State | str, new: State, what: str = "") -> None:
    """Raise :class:`TransitionError` unless ``old -> new`` is allowed (``old`` may be the stored string)."""
    kind = type(new)
    try:
        previous = kind(old)
    except ValueError:
        raise TransitionError(f"{what or kind.__name__}: unknown state {old!r}") from None
    if not allowed(previous, new):
        raise TransitionError(f"{what or kind.__name__}: {previous} -> {new} is not allowed")


def transition(row: HasState, new: State) -> State:
    """Move ``row`` (a Job, Export or ReferenceSeg) to ``new``; returns its previous state.

    Raises :class:`TransitionError` for a forbidden move and changes nothing then.
    """
    check_transition(row.state, new, f"{type(row).__name__} {getattr(row, 'id', None)}")
    old = type(new)(row.state)
    row.state = new
    return old
