from pathlib import Path

import pytest

from node.config import ConfigError, load_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def test_example_config_loads_and_matches_defaults():
    assert load_settings(REPO / "config" / "node.toml", env={}) == load_settings(env={}).__class__(
        source=str(REPO / "config" / "node.toml"))


def test_environment_overrides_file(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('[node]\nport = 4000\n[processing]\nstable_after = 3\n')
    s = load_settings(cfg, env={"CTNODE_NODE_PORT": "5000", "CTNODE_NODE_ALLOWED_CALLING_AETS": "A, B"})
    assert s.node.port == 5000
    assert s.node.allowed_calling_aets == ["A", "B"]
    assert s.processing.stable_after == 3.0


@pytest.mark.parametrize("text, key", [
    ('[node]\nport = 70000\n', "node.port"),
    ('[node]\nport = "x"\n', "node.port"),
    ('[node]\nae_title = "THIS-TITLE-IS-TOO-LONG"\n', "node.ae_title"),
    ('[node]\nbogus = 1\n', "node.bogus"),
    ('[procesing]\nx = 1\n', "procesing"),
    ('[storage]\ndatabase_url = "ctnode.db"\n', "storage.database_url"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\n', "destinations[0]"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 0\n', "destinations[0].port"),
    ('[export]\nbackoff_base = 100\nbackoff_max = 10\n', "export.backoff_base"),
])
def test_errors_name_the_key(tmp_path, text, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert str(err.value).startswith(key)


def test_env_error_names_variable():
    with pytest.raises(ConfigError, match="CTNODE_PROCESSING_WORKERS"):
        load_settings(env={"CTNODE_PROCESSING_WORKERS": "many"})
