"""/healthz, /readyz and /metrics over HTTP ([http]), from a running node."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.config import ConfigError
from node.demo import Receiver, send_study
from node.service import Node
from tests.nodes import make_settings
from tests.util import wait_for

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=96, cols=96, slices=16, pixel_spacing=3.5, slice_spacing=10.0, seed=6)
    return write_phantom_study(phantom, tmp_path_factory.mktemp("study"))


@pytest.mark.slow
def test_health_ready_and_metrics_of_a_working_node(tmp_path, small_study):
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(make_settings(tmp_path, destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]))
        node.start()
        try:
            port = node.http.port
            assert get(port, "/healthz") == (200, '{"status": "alive"}')
            status, body = get(port, "/readyz")
            assert status == 200 and json.loads(body) == {
                "status": "ready", "checks": {"database": "ok", "spool": "ok", "results": "ok", "engine": "ok"}}
            assert get(port, "/nothing")[0] == 404
            before = samples(port)
            assert before[("ctnode_studies_received_total", ())] == 0
            assert send_study(small_study, "127.0.0.1", node.listener.port, "CTNODE", progress=False) == len(small_study)
            wait_for(lambda: len(pacs.received) >= 2, 120, "the SEG and SR at the destination")
            done = ("ctnode_job_duration_seconds_count", (("outcome", "done"),))  # once the worker is reaped
            wait_for(lambda: samples(port).get(done) == 1, 10, "the job's duration")
            after = samples(port)
        finally:
            node.stop()
    assert after[("ctnode_studies_received_total", ())] == 1
    assert after[("ctnode_instances_received_total", ())] == len(small_study)
    assert after[("ctnode_jobs", (("state", "done"),))] == 1
    assert after[("ctnode_jobs", (("state", "ready"),))] == 0
    assert after[("ctnode_exports", (("state", "sent"),))] == 2
    assert after[("ctnode_job_duration_seconds_sum", (("outcome", "done"),))] > 0
    assert after[("ctnode_lease_takeovers_total", (("claim", "job"),))] == 0
    assert after[("ctnode_lease_takeovers_total", (("claim", "export"),))] == 0
    assert after[("ctnode_stage_seconds_count", (("stage", "infection"),))] == 1
    assert after[("ctnode_stage_seconds_count", (("stage", "lungs"),))] == 1
    assert after[("ctnode_export_attempts_total", (("outcome", "sent"),))] == 2
    assert after[("ctnode_listener_events_total", (("kind", "association_accepted"),))] == 1
    assert after[("ctnode_storage_free_bytes", ())] > 0


def test_not_ready_names_what_is_wrong(tmp_path):
    node = Node(make_settings(tmp_path, processing={"engine": "nosuch"}))
    node.start_http()
    try:
        shutil.rmtree(node.settings.results_dir)
        node.settings.results_dir.write_text("a file where the results folder should be")
        status, body = get(node.http.port, "/readyz")
    finally:
        node.http.stop()
    checks = json.loads(body)["checks"]
    assert status == 503 and checks["database"] == "ok" and checks["spool"] == "ok"
    assert "is not writable" in checks["results"]
    assert checks["engine"].startswith("engine 'nosuch' cannot be built: unknown infection engine 'nosuch'")


def test_a_taken_http_port_is_a_configuration_error(tmp_path):
    first = Node(make_settings(tmp_path / "a"))
    first.start_http()
    try:
        second = Node(make_settings(tmp_path / "b", http={"port": first.http.port}))
        with pytest.raises(ConfigError, match=f"http.port: cannot listen on 127.0.0.1:{first.http.port}"):
            second.start_http()
    finally:
        first.http.stop()


@pytest.mark.unit
def test_refused_instances_are_counted_by_status(tmp_path):
    from node.db import open_database
    from node.metrics import NodeMetrics

    metrics = NodeMetrics(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"), tmp_path)
    metrics.listener_event("instance_refused", "0xA700 study above node.max_study_gb")
    metrics.listener_event("instance_refused", "0xC000 Rows missing")
    metrics.listener_event("instance_refused", "0xA700 study above node.max_study_gb")
    metrics.listener_event("association_rejected", "calling AE title not allowed")
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
           for s in family.samples}
    assert got[("ctnode_instances_refused_total", (("status", "0xA700"),))] == 2
    assert got[("ctnode_instances_refused_total", (("status", "0xC000"),))] == 1
    assert got[("ctnode_listener_events_total", (("kind", "association_rejected"),))] == 1
    assert got[("ctnode_listener_events_total", (("kind", "instance_refused"),))] == 3
