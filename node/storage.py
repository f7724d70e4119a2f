"""Where the node's files live, and how the database names them.

Two folders hold every file the node keeps: the spool (received instances, reference SEGs) and the results
(SEG, SR, key images). Several hosts mount them from one shared storage root (docs/scaling.md), not
necessarily at the same path, so the database stores each file's path **relative to its folder**
(``1.2.3/1.2.4/1.2.5.dcm``) and every host resolves it against its own configured folder. A path stored
absolute (rows written before paths were relative, or a file outside its folder) resolves to itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Storage:
    spool_dir: Path
    results_dir: Path

    def spool_name(self, path: Path) -> str:
        """What the database stores for the spool file ``path``."""
        return _stored(self.spool_dir, path)

    def results_name(self, path: Path) -> str:
        """What the database stores for the result file ``path``."""
        return _stored(self.results_dir, path)

    def spool_file(self, stored: str) -> Path:
        """The spool file the database names ``stored``, on this host."""
        return _resolve(self.spool_dir, stored)

    def results_file(self, stored: str) -> Path:
        """The result file the database names ``stored``, on this host."""
        return _resolve(self.results_dir, stored)


def _stored(folder: Path, path: Path) -> str:
    path = Path(path)
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:  # not below the folder as written: compare the real locations
        try:
            return path.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())


def _resolve(folder: Path, stored: str) -> Path:
    if not stored:
        raise ValueError("no file recorded")
    return folder / stored  # an absolute ``stored`` replaces ``folder``
