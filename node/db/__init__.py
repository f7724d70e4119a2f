"""Database access: engine creation, migrations (Alembic), and the session factory."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
#: PostgreSQL advisory lock key held while migrating: processes starting together migrate one at a time.
MIGRATION_LOCK_KEY = 0x63746E6F6465  # "ctnode"


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite files get WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, safe against corruption
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    return engine


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (idempotent)."""
    from alembic import command

    if not url.startswith("postgresql"):
        command.upgrade(alembic_config(url), "head")
        return
    engine = make_engine(url)
    try:
        with engine.connect() as lock:  # a session-level lock on a connection of its own
            lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                command.upgrade(alembic_config(url), "head")
            finally:
                lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


def open_database(url: str, *, migrate: bool = True) -> sessionmaker[Session]:
    """Migrate (unless told not to) and return a session factory."""
    if migrate:
        upgrade(url)
    return sessionmaker(make_engine(url), expire_on_commit=False)
