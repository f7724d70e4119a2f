"""What a transport reports for each object it was asked to send."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SendOutcome:
    """``ok``: the destination confirmed it stored the object (a warning included). Otherwise ``permanent``
    says whether sending the same object again can help: a transient failure (peer down, out of resources)
    is retried with backoff, a permanent one (the destination rejected the object itself) is not."""

    ok: bool
    error: str = ""
    permanent: bool = False
    warning: str = ""  # a success with a warning: what the destination said


def all_failed(n: int, error: str, *, permanent: bool = False) -> list[SendOutcome]:
    """The same failure for each of ``n`` objects."""
    return [SendOutcome(False, error, permanent=permanent)] * n
