"""Alembic environment: runs migrations against the URL set by node.db.alembic_config."""
from alembic import context

from node.db import make_engine
from node.db.schema import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(url)
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode rebuilds a table as a copy: dropping the original must not trip (or, with ON DELETE,
            # act on) the foreign keys of the rows that reference it. The pragma only works outside a
            # transaction, hence the commit; the integrity check below runs once the tables are in place.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            connection.commit()
            if broken:
                raise RuntimeError(f"foreign keys broken after the migration: {broken[:5]}")
    engine.dispose()
