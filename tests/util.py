"""Small helpers shared by the tests that drive a running node."""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def seconds_until_closed(sock: socket.socket, limit: float = 20.0) -> float | None:
    """Seconds until the peer closes ``sock`` (None: still open after ``limit``); what it sends is read and
    dropped."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


class LogRecords(logging.Handler):
    """Collects log records (the suite runs with ``-p no:logging``, so pytest's caplog is not there)."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@contextlib.contextmanager
def captured_logs(level: int = logging.INFO) -> Iterator[LogRecords]:
    """Attach a :class:`LogRecords` to the root logger at ``level`` for the duration of the block."""
    handler = LogRecords(level)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(min(old, level) if old else level)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
