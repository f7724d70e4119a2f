"""Roles (node.roles, ``ctnode serve --roles``): a listener-only process receives and records, a worker and
exporter process on the same database processes and sends."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from node.db.schema import Event, Export, Job
from node.demo import Receiver, send_study
from node.service import Node
from tests.nodes import make_settings
from tests.util import wait_for


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    from node.phantom import make_phantom, write_phantom_study

    phantom = make_phantom(rows=96, cols=96, slices=16, pixel_spacing=3.5, slice_spacing=10.0, seed=5)
    return write_phantom_study(phantom, tmp_path_factory.mktemp("study"))


@pytest.mark.integration
@pytest.mark.slow
def test_listener_only_records_and_a_worker_process_takes_the_job(tmp_path, small_study):
    with Receiver(tmp_path / "pacs", ae_title="PACS") as pacs:
        dest = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
        front = Node(make_settings(tmp_path, node={"roles": ["listener"], "name": "front"}, destinations=dest))
        back = Node(make_settings(tmp_path, node={"roles": ["worker", "exporter"], "name": "back"},
                                  destinations=dest))
        assert back.listener is None
        front.start()
        try:
            assert send_study(small_study, "127.0.0.1", front.listener.port, "CTNODE", progress=False) == len(small_study)

            def state():
                with front.sessions() as s:
                    return s.scalars(select(Job.state)).one()

            wait_for(lambda: state() == "ready", 30, "the study to be ready")
            time.sleep(1.0)  # five check intervals: the listener-only process does not claim it
            assert state() == "ready" and not front.running
            back.start()
            try:
                wait_for(lambda: len(pacs.received) >= 2, 120, "the SEG and SR at the destination")
            finally:
                back.stop()
        finally:
            front.stop()
        with front.sessions() as s:
            job = s.scalars(select(Job)).one()
            assert job.state == "done" and job.owner is None
            assert [e.state for e in s.scalars(select(Export))] == ["sent", "sent"]
            claims = [e.detail for e in s.scalars(select(Event).where(Event.kind == "job_processing"))]
            assert len(claims) == 1 and ", back/" in claims[0]  # claimed by the worker process


@pytest.mark.unit
def test_serve_refuses_an_unknown_role(capsys, monkeypatch):
    from node.cli import main

    monkeypatch.delenv("CTNODE_CONFIG", raising=False)
    assert main(["serve", "--roles", "worker,gpu"]) == 2
    assert "--roles: unknown role 'gpu' (known: listener, worker, exporter)" in capsys.readouterr().err


@pytest.mark.unit
def test_roles_are_validated_in_the_configuration():
    from node.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="node.roles"):
        load_settings(env={"CTNODE_NODE_ROLES": "listener, scanner"})
    assert load_settings(env={}).node.roles == ["listener", "worker", "exporter"]
