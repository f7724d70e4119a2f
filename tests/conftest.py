"""Shared fixtures: settings in a temporary folder, a running listener, and the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from node.config import Settings, load_settings

IN_CI = os.environ.get("CI") == "true"

# Property-based tests replay a fixed sequence under CI (no flaky failures from a new random example or a
# slow shared machine); locally they explore.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, database=None)
if IN_CI:
    hypothesis_settings.load_profile("ci")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def skip_or_fail(reason: str) -> None:
    """Outside CI a missing peer or data set skips the test; under CI=true it is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def make_settings(tmp_path: Path, **sections) -> Settings:
    base = {
        "node": {"port": 0, "ae_title": "CTNODE"},
        "storage": {"spool_dir": str(tmp_path / "spool"), "results_dir": str(tmp_path / "results"),
                    "database_url": f"sqlite:///{tmp_path / 'ctnode.db'}"},
        "processing": {"stable_after": 0.5, "check_interval": 0.2, "engine": "threshold"},
        "export": {"backoff_base": 0.2, "backoff_max": 1.0, "timeout": 5.0},
    }
    for key, values in sections.items():
        if key == "destinations":
            base["destinations"] = values
        else:
            base.setdefault(key, {}).update(values)
    return load_settings(overrides=base, env={})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """`node.cli.main` calls logging.basicConfig, which binds a handler to pytest's captured stderr; remove
    it after the test so later tests do not log into a closed stream."""
    import logging

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)
