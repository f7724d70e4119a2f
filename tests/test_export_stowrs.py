"""The STOW-RS transport against a scripted local HTTP server: the HTTP answer mapped to one outcome per
instance, authentication and TLS, and the outbox's states, retries and audit events for STOW-RS rows."""
from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset
from sqlalchemy import select

from node.config import ConfigError, HttpAuth, Transport, load_settings
from node.db import open_database
from node.db.schema import Event, Export
from node.demo import free_port
from node.export import run_exports, send_files
from node.reports import retry
from tests.builders import ct_slice, write
from tests.nodes import add_done_job, export_row, make_settings

pytestmark = pytest.mark.integration

DICOM_JSON = "application/dicom+json"
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Answer:
    status: int
    body: Dataset | None = None
    content_type: str = DICOM_JSON


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StowServer:
    """Answers each POST with the next scripted :class:`Answer` (the last one again when they run out) and
    records the requests."""

    answers: list[Answer]
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self.port}/dicom-web"


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    yield from _serve(None)


def _serve(tls: ssl.SSLContext | None) -> Iterator[StowServer]:
    state = StowServer(answers=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(Request(self.path, dict(self.headers), body))
            answer = state.answers.pop(0) if len(state.answers) > 1 else state.answers[0]
            payload = b"" if answer.body is None else json.dumps(answer.body.to_json_dict()).encode()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port, state.scheme = server.server_address[1], "http" if tls is None else "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def stow_destination(url: str, **extra: object) -> dict[str, object]:
    return {"name": "web", "transport": "stow-rs", "url": url, **extra}


def sop_item(uid: str, **reason: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = SOP_CLASS, uid
    for keyword, value in reason.items():
        setattr(item, keyword, value)
    return item


def store_response(stored: dict[str, int | None], failed: dict[str, int]) -> Dataset:
    """A STOW-RS response dataset: ``stored`` {uid: WarningReason or None}, ``failed`` {uid: FailureReason}."""
    ds = Dataset()
    if stored:
        ds.ReferencedSOPSequence = [sop_item(uid, **({} if w is None else {"WarningReason": w}))
                                    for uid, w in stored.items()]
    if failed:
        ds.FailedSOPSequence = [sop_item(uid, FailureReason=r) for uid, r in failed.items()]
    return ds


def files(tmp_path: Path, n: int) -> tuple[list[Path], list[str]]:
    datasets = [ct_slice() for _ in range(n)]
    return [write(ds, tmp_path / "out") for ds in datasets], [str(ds.SOPInstanceUID) for ds in datasets]


def test_all_stored_in_one_request(tmp_path, stow_server):
    paths, uids = files(tmp_path, 3)
    stow_server.answers = [Answer(200, store_response({u: None for u in uids}, {}))]
    settings = make_settings(tmp_path, destinations=[stow_destination(stow_server.url)])
    outcomes = send_files(settings, settings.destinations[0], paths)
    assert [(o.ok, o.permanent, o.warning) for o in outcomes] == [(True, False, "")] * 3
    (request,) = stow_server.requests
    assert request.path == "/dicom-web/studies"
    assert request.headers["Content-Type"].startswith("multipart/related") and 'type="application/dicom"' in \
        request.headers["Content-Type"]
    assert "Transfer-Encoding" not in request.headers  # sent with a Content-Length (no chunked encoding)
    assert all(uid.encode() in request.body for uid in uids)


def test_partial_answer_decides_per_instance(tmp_path, stow_server):
    paths, (warned, unsupported, busy, unlisted) = files(tmp_path, 4)
    stow_server.answers = [Answer(202, store_response({warned: 0xB000}, {unsupported: 0x0122, busy: 0xA700}))]
    settings = make_settings(tmp_path, destinations=[stow_destination(stow_server.url)])
    o_warned, o_unsupported, o_busy, o_unlisted = send_files(settings, settings.destinations[0], paths)
    assert o_warned.ok and "0xB000" in o_warned.warning
    assert not o_unsupported.ok and o_unsupported.permanent and "0x0122" in o_unsupported.error
    assert not o_busy.ok and not o_busy.permanent and "0xA700" in o_busy.error
    assert not o_unlisted.ok and not o_unlisted.permanent and "not confirmed" in o_unlisted.error


@pytest.mark.parametrize("status", [400, 409, 415])
def test_rejected_request_is_a_permanent_failure(tmp_path, stow_server, status):
    paths, uids = files(tmp_path, 2)
    body = store_response({}, {uids[0]: 0xA900}) if status == 409 else None
    stow_server.answers = [Answer(status, body, DICOM_JSON if body else "text/plain")]
    settings = make_settings(tmp_path, destinations=[stow_destination(stow_server.url)])
    outcomes = send_files(settings, settings.destinations[0], paths)
    assert [(o.ok, o.permanent) for o in outcomes] == [(False, True)] * 2
    assert all(f"HTTP {status}" in o.error for o in outcomes)
    if status == 409:
        assert "0xA900" in outcomes[0].error


@pytest.mark.parametrize("status", [401, 500, 503])
def test_other_statuses_are_transient(tmp_path, stow_server, status):
    paths, _ = files(tmp_path, 2)
    stow_server.answers = [Answer(status, content_type="text/plain")]
    settings = make_settings(tmp_path, destinations=[stow_destination(stow_server.url)])
    outcomes = send_files(settings, settings.destinations[0], paths)
    assert [(o.ok, o.permanent) for o in outcomes] == [(False, False)] * 2
    assert len(stow_server.requests) == 1  # the library does not retry by itself: the outbox does


def test_unreachable_destination_is_transient(tmp_path):
    paths, _ = files(tmp_path, 1)
    settings = make_settings(tmp_path, destinations=[stow_destination(f"http://127.0.0.1:{free_port()}")])
    [outcome] = send_files(settings, settings.destinations[0], paths)
    assert not outcome.ok and not outcome.permanent and "ConnectionError" in outcome.error


def test_bearer_and_basic_authentication_come_from_the_environment(tmp_path, stow_server):
    paths, uids = files(tmp_path, 1)
    stow_server.answers = [Answer(200, store_response({uids[0]: None}, {}))]
    base = make_settings(tmp_path)
    overrides = {"storage": {"spool_dir": base.storage.spool_dir, "results_dir": base.storage.results_dir,
                             "database_url": base.storage.database_url}}
    env = {"PACS_TOKEN": "t0ken", "PACS_PASSWORD": "s3cret"}
    bearer = load_settings(env=env, overrides={**overrides, "destinations": [
        stow_destination(stow_server.url, auth="bearer", token_env="PACS_TOKEN")]})
    basic = load_settings(env=env, overrides={**overrides, "destinations": [
        stow_destination(stow_server.url, auth="basic", username="ctnode", password_env="PACS_PASSWORD")]})
    assert bearer.destinations[0].auth == HttpAuth.BEARER and "t0ken" not in repr(bearer.destinations[0])
    for settings in (bearer, basic):
        assert send_files(settings, settings.destinations[0], paths)[0].ok
    assert stow_server.requests[0].headers["Authorization"] == "Bearer t0ken"
    assert stow_server.requests[1].headers["Authorization"] == "Basic " + base64.b64encode(b"ctnode:s3cret").decode()
    with pytest.raises(ConfigError, match=r"^destinations\[0\]\.token_env: environment variable PACS_TOKEN"):
        load_settings(env={}, overrides={"destinations": [
            stow_destination(stow_server.url, auth="bearer", token_env="PACS_TOKEN")]})


@pytest.mark.parametrize(("entry", "key"), [
    ({"url": "ftp://pacs/dicom-web"}, r"destinations\[0\]\.url"),
    ({"url": "https://user:pw@pacs/dicom-web"}, r"destinations\[0\]\.url"),
    ({"auth": "digest"}, r"destinations\[0\]\.auth"),
    ({"auth": "basic", "password_env": "X"}, r"destinations\[0\]\.username"),
    ({"ae_title": "PACS"}, r"destinations\[0\]\.ae_title: unknown key for transport stow-rs"),
    ({"transport": "wado"}, r"destinations\[0\]\.transport"),
])
def test_stow_destination_errors_name_the_key(entry, key):
    dest = {**stow_destination("https://pacs.example.org/dicom-web"), **entry}
    with pytest.raises(ConfigError, match="^" + key):
        load_settings(env={"X": "x"}, overrides={"destinations": [dest]})


def test_dimse_is_the_default_transport(tmp_path):
    settings = make_settings(tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 1}])
    assert settings.destinations[0].transport == Transport.DIMSE


@pytest.fixture
def tls_stow_server(pki) -> Iterator[StowServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    yield from _serve(ctx)


def test_https_verifies_the_server_certificate(tmp_path, pki, tls_stow_server):
    paths, uids = files(tmp_path, 1)
    tls_stow_server.answers = [Answer(200, store_response({uids[0]: None}, {}))]
    trusted = make_settings(tmp_path, destinations=[stow_destination(tls_stow_server.url, tls_ca_file=str(pki.ca))])
    assert send_files(trusted, trusted.destinations[0], paths)[0].ok
    untrusted = make_settings(tmp_path, destinations=[stow_destination(tls_stow_server.url)])  # system trust store
    [outcome] = send_files(untrusted, untrusted.destinations[0], paths)
    assert not outcome.ok and not outcome.permanent and outcome.error.startswith("TLS:")
    wrong_ca = make_settings(tmp_path, destinations=[stow_destination(tls_stow_server.url,
                                                                      tls_ca_file=str(pki.other_ca))])
    assert not send_files(wrong_ca, wrong_ca.destinations[0], paths)[0].ok
    assert len(tls_stow_server.requests) == 1  # nothing reached the server without a verified certificate


# -- the outbox: the same states, retries and audit events as C-STORE ---------------------------------------------


def stow_outbox(tmp_path: Path, url: str, n: int, max_attempts: int = 3):
    """Settings with one STOW-RS destination "web" and a done job with ``n`` pending exports to it."""
    settings = make_settings(tmp_path, export={"max_attempts": max_attempts}, destinations=[stow_destination(url)])
    sessions = open_database(settings.storage.database_url)
    paths, uids = files(tmp_path, n)
    add_done_job(sessions, "web", list(zip(uids, paths)))
    return settings, sessions, uids


def rows_and_events(sessions):
    with sessions() as s:
        rows = {r.sop_instance_uid: (r.state, r.attempts) for r in s.scalars(select(Export))}
        events = [(e.kind, e.detail) for e in s.scalars(select(Event).order_by(Event.id))
                  if e.kind.startswith("export_")]
    return rows, events


def test_outbox_sends_once_and_dead_letters_a_rejected_instance_at_once(tmp_path, stow_server):
    settings, sessions, (good, bad) = stow_outbox(tmp_path, stow_server.url, 2)
    stow_server.answers = [Answer(202, store_response({good: None}, {bad: 0x0122}))]
    assert run_exports(settings, sessions) == 1
    assert run_exports(settings, sessions) == 0  # nothing due: the sent one is never sent again, the rejected one
    rows, events = rows_and_events(sessions)     # waits for an operator
    assert rows == {good: ("sent", 1), bad: ("dead", 1)}
    assert len(stow_server.requests) == 1
    assert [kind for kind, _ in events] == ["export_sent", "export_dead"]
    assert "rejected by web (not retried)" in events[1][1] and "0x0122" in events[1][1]
    with sessions.begin() as s:  # `ctnode jobs retry` queues it again, like a dead C-STORE export
        assert retry(s, None) == 1
    stow_server.answers = [Answer(200, store_response({bad: None}, {}))]
    assert run_exports(settings, sessions) == 1
    assert rows_and_events(sessions)[0] == {good: ("sent", 1), bad: ("sent", 1)}


def test_outbox_retries_a_server_error_with_backoff_then_sends(tmp_path, stow_server):
    import time

    settings, sessions, (uid,) = stow_outbox(tmp_path, stow_server.url, 1)
    stow_server.answers = [Answer(503, content_type="text/plain"), Answer(200, store_response({uid: None}, {}))]
    assert run_exports(settings, sessions) == 0
    row = export_row(sessions)
    assert row.state == "pending" and row.attempts == 1 and "HTTP 503" in row.last_error
    assert run_exports(settings, sessions) == 0 and len(stow_server.requests) == 1  # not due before the backoff
    time.sleep(settings.export.backoff_max + 0.1)
    assert run_exports(settings, sessions) == 1
    rows, events = rows_and_events(sessions)
    assert rows == {uid: ("sent", 2)}
    assert [kind for kind, _ in events] == ["export_failed", "export_sent"]


def test_outbox_dead_after_max_attempts_of_transient_failures(tmp_path):
    import time

    settings, sessions, (uid,) = stow_outbox(tmp_path, f"http://127.0.0.1:{free_port()}", 1, max_attempts=2)
    run_exports(settings, sessions)
    time.sleep(settings.export.backoff_max + 0.1)
    run_exports(settings, sessions)
    rows, events = rows_and_events(sessions)
    assert rows == {uid: ("dead", 2)}
    assert [kind for kind, _ in events] == ["export_failed", "export_dead"]


def test_echo_names_the_transport_of_a_stow_destination(tmp_path, capsys):
    from node.cli import main

    cfg = tmp_path / "node.toml"
    cfg.write_text('[[destinations]]\nname = "web"\ntransport = "stow-rs"\nurl = "https://pacs.example.org/dicom-web"\n')
    assert main(["--config", str(cfg), "echo", "web"]) == 2
    assert "uses stow-rs: C-ECHO is for DIMSE destinations" in capsys.readouterr().err
