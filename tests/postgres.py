"""A PostgreSQL server for the tests that need one: ``$CTNODE_TEST_POSTGRES_URL`` (``.ci/run`` starts a
server and sets it), else a throwaway cluster made with ``initdb`` in a temporary folder (run as the
``postgres`` user when the tests run as root, which PostgreSQL refuses to be). Each test gets an empty schema."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import text

from node.db import make_engine
from node.db.schema import Base
from tests.peers import free_port
from tests.support import skip_or_fail

URL_ENV = "CTNODE_TEST_POSTGRES_URL"
START_TIMEOUT_S = 60


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def throwaway_cluster(folder: Path) -> Iterator[str]:
    """Start a PostgreSQL cluster in ``folder`` on a free loopback port; yields its URL, stops it after."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        skip_or_fail(f"no PostgreSQL server: set {URL_ENV} or install PostgreSQL (initdb, pg_ctl)")
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        for parent in folder.parents:  # the server user must reach its data folder
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
    data, port = folder / "data", free_port()
    subprocess.run(_as_server_user([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=START_TIMEOUT_S)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = folder / "server.log"
    started = subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-o", options, "-l", str(log),
                                              "-w", "-t", str(START_TIMEOUT_S), "start"]),
                             capture_output=True, text=True, timeout=START_TIMEOUT_S + 10)
    if started.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no server log)"
        raise RuntimeError(f"PostgreSQL did not start: {started.stdout}{started.stderr}\n{tail}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=START_TIMEOUT_S)


def empty_schema(url: str) -> str:
    """Drop the node's tables at ``url`` (a test starts from nothing); returns ``url``."""
    engine = make_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(text(f'DROP TABLE IF EXISTS "{table.name}" CASCADE'))
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    return url
