"""How the database names files: relative to the spool or results folder, so that hosts mounting the shared
storage at different paths find the same files; rows stored absolute still resolve."""
from __future__ import annotations

import pytest

from node.storage import Storage

pytestmark = pytest.mark.unit


def test_names_are_relative_to_their_folder_and_resolve_on_another_mount(tmp_path):
    here = Storage(tmp_path / "a" / "spool", tmp_path / "a" / "results")
    file = here.spool_dir / "1.2" / "3.4" / "5.6.dcm"
    assert here.spool_name(file) == "1.2/3.4/5.6.dcm"
    assert here.results_name(here.results_dir / "1.2" / "v1" / "seg-7.dcm") == "1.2/v1/seg-7.dcm"
    # another host mounts the same storage at another path (here: a symbolic link to it)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "a")
    there = Storage(tmp_path / "b" / "spool", tmp_path / "b" / "results")
    assert there.spool_file(here.spool_name(file)) == tmp_path / "b" / "spool" / "1.2" / "3.4" / "5.6.dcm"
    # the same file reached through the other mount is named the same
    assert here.spool_name(tmp_path / "b" / "spool" / "1.2" / "3.4" / "5.6.dcm") == "1.2/3.4/5.6.dcm"


def test_absolute_names_resolve_to_themselves(tmp_path):
    files = Storage(tmp_path / "spool", tmp_path / "results")
    old = str(tmp_path / "elsewhere" / "x.dcm")  # a row written with absolute paths, or a file outside the folder
    assert files.spool_file(old) == tmp_path / "elsewhere" / "x.dcm"
    assert files.spool_name(tmp_path / "elsewhere" / "x.dcm") == old
    assert files.results_file(old) == tmp_path / "elsewhere" / "x.dcm"
