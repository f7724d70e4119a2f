"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (``[http]``: loopback by default).

- ``/healthz``: 200 while the process serves requests (for systemd watchdogs and liveness probes);
- ``/readyz``: 200 when the database answers, the storage folders are writable and (worker role) the
  configured engine builds; else 503. The JSON body gives each check and its reason;
- ``/metrics``: Prometheus text format (:mod:`node.metrics`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.metrics import NodeMetrics

log = logging.getLogger(__name__)

Check = Callable[[], str]  # "" when fine, else why not


def database_check(sessions: sessionmaker[Session]) -> Check:
    def check() -> str:
        try:
            with sessions() as s:
                s.execute(text("SELECT 1"))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
        return ""
    return check


def writable_check(folder: Path) -> Check:
    def check() -> str:
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".readyz-", suffix=".tmp") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            return f"{folder} is not writable: {exc}"
        return ""
    return check


def engine_check(name: str) -> Check:
    """The configured engine builds (on the CPU, once; the result is kept): weights present and intact."""
    outcome: list[str] = []
    lock = threading.Lock()

    def check() -> str:
        with lock:
            if not outcome:
                from node.pipeline.engines import EngineUnavailable, build_engine
                try:
                    build_engine(name, device="cpu")  # "auto" falling back to the threshold engine is ready
                    outcome.append("")
                except (EngineUnavailable, ValueError, OSError, RuntimeError) as exc:  # missing or corrupt weights
                    outcome.append(f"engine {name!r} cannot be built: {exc}")
            return outcome[0]
    return check


def node_checks(settings: Settings, sessions: sessionmaker[Session], roles: frozenset[str]) -> dict[str, Check]:
    checks = {"database": database_check(sessions)}
    if "listener" in roles:
        checks["spool"] = writable_check(settings.spool_dir)
    if roles & {"worker", "exporter"}:
        checks["results"] = writable_check(settings.results_dir)
    if "worker" in roles:
        checks["engine"] = engine_check(settings.processing.engine)
    return checks


class HealthServer:
    """The HTTP endpoints in a daemon thread; :attr:`port` is the bound port (``http.port`` 0: a free one)."""

    def __init__(self, host: str, port: int, metrics: NodeMetrics, checks: dict[str, Check]):
        self.metrics, self.checks = metrics, checks
        self._server = ThreadingHTTPServer((host, port), self._handler())  # OSError: port taken
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ctnode-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        results = {name: check() for name, check in self.checks.items()}
        return all(not why for why in results.values()), {k: v or "ok" for k, v in results.items()}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, "application/json", json.dumps({"status": "alive"}).encode())
                elif path == "/readyz":
                    ready, checks = server.readiness()
                    body = json.dumps({"status": "ready" if ready else "not ready", "checks": checks})
                    self._send(200 if ready else 503, "application/json", body.encode())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(server.metrics.registry))
                else:
                    self._send(404, "application/json", json.dumps({"error": "not found"}).encode())

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: not logged
                log.debug("http %s", format % args)

        return Handler
