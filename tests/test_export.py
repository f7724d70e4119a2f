"""The outbox: success, retries with backoff, dead-letter, operator retry."""
from __future__ import annotations

import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from node.demo import Receiver, free_port
from node.export import backoff, run_exports
from node.reports import retry
from tests.nodes import export_row, make_settings, setup_export

pytestmark = pytest.mark.integration


def test_sent_once(tmp_path):
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        settings, sessions = setup_export(tmp_path, pacs.port)
        assert run_exports(settings, sessions) == 1
        assert run_exports(settings, sessions) == 0  # nothing sent twice
        assert len(pacs.received) == 1
    row = export_row(sessions)
    assert row.state == "sent" and row.attempts == 1 and row.sent_at is not None


def test_down_destination_backs_off_then_dead_then_retry(tmp_path):
    port = free_port()  # nobody listens
    settings, sessions = setup_export(tmp_path, port, max_attempts=3)
    run_exports(settings, sessions)
    row = export_row(sessions)
    assert row.state == "pending" and row.attempts == 1 and row.last_error
    assert run_exports(settings, sessions) == 0 and export_row(sessions).attempts == 1  # not due yet
    for _ in range(2):
        time.sleep(settings.export.backoff_max + 0.1)
        run_exports(settings, sessions)
    row = export_row(sessions)
    assert row.state == "dead" and row.attempts == 3
    with sessions.begin() as s:
        assert retry(s, None) == 1
    with Receiver(tmp_path / "pacs", ae_title="PACS", port=port) as pacs:
        assert run_exports(settings, sessions) == 1
        assert len(pacs.received) == 1
    assert export_row(sessions).state == "sent"


def test_failure_status_is_retried(tmp_path):
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    try:
        settings, sessions = setup_export(tmp_path, port)
        run_exports(settings, sessions)
    finally:
        server.shutdown()
    row = export_row(sessions)
    assert row.state == "pending" and "0xA700" in row.last_error


def test_backoff_is_exponential_and_capped(tmp_path):
    settings = make_settings(tmp_path, export={"backoff_base": 10, "backoff_max": 60})
    assert [backoff(settings, n).total_seconds() for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
