"""Command-line parsing: options before or after the sub-command."""
import pytest

from node.cli import build_parser

pytestmark = pytest.mark.unit


def test_config_before_or_after_the_subcommand():
    for argv in (["--config", "x.toml", "serve"], ["serve", "--config", "x.toml"]):
        assert build_parser().parse_args(argv).config == "x.toml"
    assert getattr(build_parser().parse_args(["serve"]), "config", None) is None
