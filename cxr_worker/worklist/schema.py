"""Schema migrations (Alembic), run by ``cxr-worker db upgrade`` and at ``serve`` start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, make_url

from cxr_worker.errors import CxrWorkerError

MIGRATIONS = Path(__file__).with_name("migrations")


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; returns the revision now in place."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine)


def downgrade(engine: Engine, revision: str) -> str | None:
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    return current_revision(engine)


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of an SQLite file URL (nothing for other databases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database \
            and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def open_database(url: str, migrate: bool = False) -> Engine:
    """The worklist engine, ready to use.

    The embedded SQLite file (and its folder) is created and migrated on first use; a server
    database is migrated only when ``migrate`` (``serve`` and ``db upgrade`` do), and otherwise
    must be at the head revision already.
    """
    from cxr_worker.worklist.queue import make_engine

    ensure_sqlite_folder(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = make_engine(url)
        upgrade(engine)
        return engine
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
        return engine
    current = current_revision(engine)
    if current != head_revision():
        raise CxrWorkerError(f"database schema at revision {current}, expected "
                             f"{head_revision()}: run 'cxr-worker db upgrade'")
    return engine
