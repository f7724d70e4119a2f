"""Shared fixtures (settings in a temporary folder, the shared data folder, a test PKI) and the test kinds.

Every test has exactly one kind, so that ``pytest -m unit`` runs the fast in-process tests:

* ``unit``: runs in the test process on data made in code, files in a temporary folder or the shared data
  sets; no network connection, no node started.
* ``integration``: runs the node or a part of it over the network on loopback (listener, exports, the
  whole node in process or as a child process).
* ``peer``: drives a real external program (DCMTK, Orthanc, dciodvfy, PostgreSQL).

A module states the kind of its tests (``pytestmark = pytest.mark.unit``); a test marked with another
kind (``@pytest.mark.peer`` on one test of a unit module) has that kind instead: the closest kind marker
wins. A test without one is a collection error. ``slow`` is independent of the kind.

Helpers live in modules of their own, imported by the tests (this file is not imported):
``tests/builders.py`` (test data), ``tests/nodes.py`` (settings, node processes, C-STORE, outbox rows),
``tests/support.py`` (shared data folder, skip or fail), ``tests/util.py`` (waiting, captured logs),
``tests/peers.py`` (real peers), ``tests/tls_ca.py`` (test PKI), ``tests/corpus.py`` (bad input).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from node.config import Settings
from tests.nodes import make_settings
from tests.support import IN_CI, SHARED_DATA, skip_or_fail
from tests.tls_ca import Pki, make_pki

KINDS = ("unit", "integration", "peer")

# Property-based tests replay a fixed sequence under CI (no flaky failures from a new random example or a
# slow shared machine); locally they explore.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, database=None)
if IN_CI:
    hypothesis_settings.load_profile("ci")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test exactly one kind marker: its closest one (test, then class, then module)."""
    kinds: dict[pytest.Item, str] = {}
    missing: set[str] = set()
    for item in items:
        closest = next((mark.name for mark in item.iter_markers() if mark.name in KINDS), None)
        if closest is None:
            missing.add(item.nodeid.split("::")[0])
        else:
            kinds[item] = closest
    if missing:
        raise pytest.UsageError(f"tests without a kind ({', '.join(KINDS)}) in {', '.join(sorted(missing))}: "
                                f"give the module a line such as `pytestmark = pytest.mark.unit`")
    for item in items:  # a module's or class's kind stays on the tests that do not have another one
        for node in item.listchain():
            node.own_markers[:] = [mark for mark in node.own_markers if mark.name not in KINDS]
    for item, kind in kinds.items():
        item.add_marker(kind)


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder (``$CTNODE_DATA``, else ``../shared/data`` next to the checkout)."""
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Node settings with spool, results and database in ``tmp_path`` (see ``tests.nodes.make_settings``)."""
    return make_settings(tmp_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with server and client certificates, shared by the tests of a module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_listener(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start node listeners on free loopback ports, each with its own settings folder under ``tmp_path``:
    ``start_listener(node={...}, **sections)`` (the sections as :func:`tests.nodes.make_settings` takes
    them) returns the running :class:`node.listener.Listener`; all are stopped after the test."""
    from node.db import open_database
    from node.listener import Listener

    started: list[Listener] = []

    def start(name: str | None = None, node: dict[str, Any] | None = None, **sections: Any) -> Listener:
        settings = make_settings(tmp_path / (name or f"listener{len(started)}"), node=node or {}, **sections)
        listener = Listener(settings, open_database(settings.storage.database_url))
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """`node.cli.main` calls logging.basicConfig, which binds a handler to pytest's captured stderr; remove
    it after the test so later tests do not log into a closed stream."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a PostgreSQL server (see :mod:`tests.postgres`), started once per test run if needed."""
    from tests.postgres import URL_ENV, throwaway_cluster

    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
    else:
        yield from throwaway_cluster(tmp_path_factory.mktemp("postgres"))


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A PostgreSQL URL with an empty schema for this test."""
    from tests.postgres import empty_schema

    return empty_schema(postgres_server)
